"""Who a client is comes from the kernel, and what another user may do.

A client's pid and uid are the ones the kernel reports for its connection
(SO_PEERCRED, which ZeroMQ attaches to each message of an ipc connection),
not the ones its hello claims. The raw-socket clients here lie on purpose.

The access model (docs/reliability.md, "Access"): the daemon's own uid and root are
administrators; another uid gets in only through `--group` and may use the
data path for its own owners and blocks, but not shut the daemon down, set
quotas, or recycle or free what another uid's owners hold.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable

import pytest

import shmarena
from tests.conftest import Daemon, wait_for
from tests.faults.test_access import GROUP, NOBODY, needs_root

# A client that speaks the wire protocol by hand over a raw DEALER socket and
# claims to be process `claimed_pid` (with that process's start time, so a
# daemon that believed it would watch that process). It allocates 64 KiB,
# then runs the ops given as JSON lines on stdin, one reply printed per line.
RAW_CLIENT = r"""
import json, os, sys
import zmq
from shmarena.protocol import Op, PROTOCOL_VERSION, SEQUENCED_OPS, decode, encode

socket_path, claimed_pid = sys.argv[1], int(sys.argv[2])
with open(f"/proc/{claimed_pid}/stat") as f:
    ticks = int(f.read().rsplit(")", 1)[1].split()[19])
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.setsockopt(zmq.ROUTING_ID, b"\x01" + os.urandom(15))
sock.setsockopt(zmq.LINGER, 0)
sock.connect(f"ipc://{socket_path}")
ids = {True: 0, False: 1 << 20}  # sequenced requests are numbered 1, 2, ...

def call(op, *args):
    ids[op in SEQUENCED_OPS] += 1
    sock.send(encode([int(op), ids[op in SEQUENCED_OPS], *args]))
    if not sock.poll(20000):
        os._exit(3)  # no reply
    return decode(sock.recv())

print(json.dumps(call(Op.HELLO, PROTOCOL_VERSION, claimed_pid, ticks, "liar", [])), flush=True)
print(json.dumps(call(Op.ALLOC, 65536, None, False, 0, "")), flush=True)
for line in sys.stdin:
    op, *args = json.loads(line)
    args = [bytes.fromhex(a["bin"]) if isinstance(a, dict) else a for a in args]
    print(json.dumps(call(getattr(Op, op), *args), default=bytes.hex), flush=True)
"""


def start_raw(daemon: Daemon, claimed_pid: int) -> tuple[subprocess.Popen[str], list]:
    proc = daemon.python(
        RAW_CLIENT,
        daemon.socket_path,
        str(claimed_pid),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    hello = json.loads(proc.stdout.readline())
    alloc = json.loads(proc.stdout.readline())
    assert hello[0] == 0 and alloc[0] == 0, (hello, alloc, proc.stderr and proc.stderr.read())
    return proc, [hello, alloc]


def ask(proc: subprocess.Popen[str], op: str, *args: object) -> list:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps([op, *args]) + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def test_hello_pid_is_the_kernels_not_the_claimed_one(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(size="32M", extra=["--lease", "1"])
    proc, (hello, _) = start_raw(daemon, claimed_pid=1)
    try:
        client = daemon.client()
        rows = {r["session"]: r for r in client.list_clients()}
        row = rows[hello[2]["session"]]
        assert row["pid"] == proc.pid  # not 1
        assert row["bytes"] == 65536 and row["watch"] == "lease"  # pid 1's start time
        shown = json.loads(daemon.cli("clients", "--json", check=True).stdout)
        assert [r["pid"] for r in shown if r["session"] == row["session"]] == [proc.pid]
        proc.kill()
        proc.wait(timeout=30)
        # Its start time is pid 1's, not its own: it is not watched by a
        # pidfd (on pid 1 or anything else) but on its lease, which runs out.
        wait_for(lambda: client.stats()["used_bytes"] == 0, timeout_s=30)
        assert hello[2]["session"] not in {r["session"] for r in client.list_clients()}
        assert client.check() == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_claimed_pid_does_not_let_queue_gets_land_on_its_sessions(daemon: Daemon) -> None:
    victim = daemon.client()
    (victim_session,) = [r["session"] for r in victim.list_clients()]
    proc, (_, alloc) = start_raw(daemon, claimed_pid=os.getpid())
    try:
        handle = alloc[2]
        assert ask(proc, "QOPEN", "q", 4)[0] == 0
        assert ask(proc, "QPUT", "q", {"bin": "78"}, [handle], 0)[0] == 0
        reply = ask(proc, "QGET", "q", victim_session, 0)
        assert reply[0] != 0 and reply[2] == "invalid_request", reply
        assert f"process {os.getpid()}'s" in reply[3]
        # nothing changed: the message is still queued, the victim holds nothing
        assert ask(proc, "QSTAT", "q")[2][0] == 1
        row = [r for r in victim.list_clients() if r["session"] == victim_session][0]
        assert row["retained"] == 0
        assert victim.check() == []
    finally:
        proc.kill()
        proc.wait()


def test_per_session_quota_counts_detached_owners_the_session_created(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon(size="32M", extra=["--quota-per-session", "1M"])
    client = daemon.client()
    with pytest.raises(shmarena.QuotaExceeded) as caught:
        client.owner("escape", detached=True).alloc(2 << 20)
    assert "per session" in str(caught.value)
    kept = client.owner("escape", detached=True).alloc(512 << 10)
    with pytest.raises(shmarena.QuotaExceeded):
        client.alloc(768 << 10)  # the detached owner's 512 KiB count against the session
    kept.free()
    client.alloc(768 << 10).free()
    assert client.check() == []


# A second uid (a member of --group): what it may and may not do. It is this
# test's child after giving up root; it prints one line per attempt.
AS_MEMBER = r"""
import os, sys
import shmarena
from shmarena.protocol import Handle
# `import shmarena` is lazy: load it all while still root, since the other
# user cannot read this Python's files (a real user has a Python of their own).
for _name in shmarena.__all__:
    getattr(shmarena, _name)

uid, gid = int(sys.argv[1]), int(sys.argv[2])
theirs_owner, theirs_handle = sys.argv[3], Handle(*map(int, sys.argv[4].split(",")))
os.setgroups([gid])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
client = shmarena.connect(timeout_s=5.0)

def attempt(what, fn):
    try:
        fn()
        print(f"{what}: ok", flush=True)
    except shmarena.ShmArenaError as error:
        print(f"{what}: {error.code}: {error}", flush=True)

attempt("alloc_free_own", lambda: client.alloc(65536).free())
mine = client.owner("member-batch", detached=True)
mine.alloc(65536)
attempt("recycle_own", lambda: client.recycle("member-batch"))
client.owner("member-kept", detached=True).alloc(65536)
attempt("attach_theirs", lambda: client.attach(theirs_handle))
attempt("recycle_theirs", lambda: client.recycle(theirs_owner))
attempt("free_theirs", lambda: (client.free(theirs_handle), client.sync()))
attempt("alloc_into_theirs", lambda: client.owner(theirs_owner, detached=True).alloc(4096))
attempt("quota_session", lambda: client.set_quota("", 0))
attempt("quota_owner", lambda: client.set_quota("member-kept", 1 << 30))
attempt("owner_quota", lambda: client.owner("member-kept", detached=True, quota=1 << 20))
attempt("shutdown", lambda: client.shutdown())
attempt("check", lambda: client.check())
client.close()
"""


@needs_root
def test_group_member_may_use_its_own_but_not_administer(
    make_daemon: Callable[..., Daemon], run_dir: str
) -> None:
    # this test's runtime dir exists already: its owner opens it to the group
    os.chown(run_dir, -1, GROUP)
    os.chmod(run_dir, 0o750)
    daemon = make_daemon(size="32M", extra=["--group", str(GROUP)])
    admin = daemon.client()
    batch = admin.owner("admin-batch", detached=True)
    theirs = batch.alloc(65536)
    theirs.view[:5] = b"admin"
    handle = ",".join(map(str, theirs.handle))
    proc = daemon.python(
        AS_MEMBER,
        str(NOBODY),
        str(GROUP),
        "admin-batch",
        handle,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = dict(line.split(": ", 1) for line in out.splitlines())
    for allowed in ("alloc_free_own", "recycle_own", "attach_theirs", "check"):
        assert result[allowed] == "ok", (allowed, result)
    for denied in (
        "recycle_theirs",
        "free_theirs",
        "alloc_into_theirs",
        "quota_session",
        "quota_owner",
        "owner_quota",
        "shutdown",
    ):
        assert result[denied].startswith("access_denied: "), (denied, result)
        assert f"uid {NOBODY}" in result[denied], (denied, result[denied])
    # nothing of the administrator's changed, and the daemon still serves
    assert bytes(theirs.view[:5]) == b"admin"
    owners = {o["name"]: o for o in admin.list_owners()}
    assert owners["admin-batch"]["bytes"] == 65536
    assert admin.stats()["quota_per_session_bytes"] == 0
    # the administrator may recycle the member's owner
    assert admin.recycle("member-kept").blocks == 1
    theirs.free()
    assert admin.stats()["used_bytes"] == 0
    assert admin.check() == []


# A uid that is neither the daemon's, root, nor in --group, on a daemon whose
# runtime dir and socket someone opened to all: the daemon still refuses it.
AS_STRANGER = r"""
import os, sys
import zmq
from shmarena.protocol import Op, PROTOCOL_VERSION, decode, encode

os.setgroups([])
os.setresgid(int(sys.argv[2]), int(sys.argv[2]), int(sys.argv[2]))
os.setresuid(int(sys.argv[2]), int(sys.argv[2]), int(sys.argv[2]))
sock = zmq.Context().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(f"ipc://{sys.argv[1]}")
with open("/proc/self/stat") as f:
    ticks = int(f.read().rsplit(")", 1)[1].split()[19])
sock.send(encode([int(Op.HELLO), 1, PROTOCOL_VERSION, os.getpid(), ticks, "stranger", []]))
print(decode(sock.recv()) if sock.poll(20000) else "no reply", flush=True)
os._exit(0)
"""


@needs_root
def test_a_stranger_uid_is_refused_by_the_daemon_too(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(size="32M")
    client = daemon.client()
    opened = client.stats()["counters"]["sessions_opened"]
    os.chmod(daemon.run_dir, 0o755)  # a careless operator
    os.chmod(daemon.socket_path, 0o666)
    proc = daemon.python(
        AS_STRANGER,
        daemon.socket_path,
        str(NOBODY),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "access_denied" in out and f"uid {NOBODY}" in out, out
    assert all(r["label"] != "stranger" for r in client.list_clients())
    assert client.stats()["counters"]["sessions_opened"] == opened
    assert client.check() == []
    os.chmod(daemon.run_dir, 0o700)
