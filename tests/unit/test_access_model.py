"""Who a client is and what it may do, as Service.handle with the kernel's
credentials handed in (docs/reliability.md, "Access"): the daemon's uid (1000 here) and
root administer; a member of --group (gid 4242) uses only its own."""

from __future__ import annotations

from dataclasses import replace

from shmarena.daemon.service import Creds, Service
from shmarena.protocol import PROTOCOL_VERSION, Op, decode, encode
from tests.unit.test_service import MIN, Peer, make_service

DAEMON_UID, GROUP, MEMBER = 1000, 4242, 2000


def service_with_group() -> Service:
    service = make_service()
    service.info = replace(service.info, uid=DAEMON_UID, group_gid=GROUP)
    return service


def test_hello_takes_the_kernels_pid_and_uid_not_the_claimed_pid() -> None:
    service = service_with_group()
    liar = Peer(service, b"l", pid=1, creds=Creds(MEMBER, GROUP, 4321))
    (row,) = [r for r in liar.ok(Op.CLIENTS)[0] if r["session"] == liar.session]
    assert (row["pid"], row["uid"]) == (4321, MEMBER)
    (event,) = [e for e in service.take_log() if e.event == "client_joined"]
    assert "pid 4321 (it said pid 1)" in event.message


def test_a_uid_outside_the_group_is_refused_at_hello() -> None:
    service = service_with_group()
    for creds, why in (
        (Creds(3000, 3000, 77), "members of group 4242"),
        (Creds(-1, -1, 0), "could not learn"),
    ):
        frame = encode([int(Op.HELLO), 1, PROTOCOL_VERSION, 77, 5, "x", []])
        reply = decode(service.handle(b"s", frame, 1.0, creds))
        assert reply[2] == "access_denied" and why in reply[3], reply
    assert service.admitted(Creds(3000, 3000, 77, groups=(GROUP,)))  # a supplementary group
    assert service.admitted(Creds(0, 0, 77)) and not service.admitted(Creds(3000, 3000, 77))
    assert service.ledger.sessions == {} and service.check() == []


def test_a_member_uses_its_own_but_may_not_administer() -> None:
    service = service_with_group()
    admin = Peer(service, b"a", creds=Creds(DAEMON_UID, DAEMON_UID, 10))
    member = Peer(service, b"m", creds=Creds(MEMBER, GROUP, 20))
    (theirs,) = admin.ok(Op.ALLOC, MIN, "admin-batch", True)
    admin.ok(Op.PUBLISH, "frame", theirs, True)
    (mine,) = member.ok(Op.ALLOC, MIN, "member-batch", True)
    member.ok(Op.FREE, [mine])
    member.ok(Op.RETAIN, [theirs])  # reading what others share is the point
    member.ok(Op.RELEASE, [theirs])
    for op, args, word in (
        (Op.SHUTDOWN, (), "stop the daemon"),
        (Op.QUOTA, ("", 0), "per-session quota"),
        (Op.QUOTA, ("member-batch", 1 << 20), "quota of owner"),
        (Op.OWNER, ("member-batch", True, 1 << 20), "quota of owner"),
        (Op.RECYCLE, ("admin-batch",), "created by uid 1000"),
        (Op.FREE, ([theirs],), "uid 1000"),
        (Op.ALLOC, (MIN, "admin-batch", True), "created by uid 1000"),
        (Op.UNPUBLISH, ("frame",), "created by uid 1000"),
    ):
        code, message = member.err(op, *args)
        assert code == "access_denied" and f"uid {MEMBER}" in message, (op, message)
        assert word in message, (op, message)
    assert not service.stopping and service.ledger.session_quota == 0
    assert {o["name"]: o["bytes"] for o in admin.ok(Op.OWNERS)[0]}["admin-batch"] == MIN
    admin.ok(Op.RECYCLE, "member-batch")  # the administrator may
    admin.ok(Op.QUOTA, "", 1 << 20)
    admin.ok(Op.SHUTDOWN)
    assert service.stopping and service.check() == []


def test_a_session_resumes_only_for_the_same_uid() -> None:
    service = service_with_group()
    member = Peer(service, b"m", pid=20, creds=Creds(MEMBER, GROUP, 20))
    token = service.tokens[member.session]
    hello = [int(Op.HELLO), 1, PROTOCOL_VERSION, 20, 5, "t", [member.session, token]]
    # the token and pid of the member, but another user's connection: a new session
    other = decode(service.handle(b"x", encode(hello), 1.0, Creds(DAEMON_UID, DAEMON_UID, 20)))
    assert other[2]["session"] != member.session and not other[2]["resumed"]
    same = decode(service.handle(b"y", encode(hello), 1.0, Creds(MEMBER, GROUP, 20)))
    assert same[2]["session"] == member.session and same[2]["resumed"]
    assert service.stats(0)["access"] == {"admin_uids": [0, DAEMON_UID], "group_gid": GROUP}
    assert service.check() == []
