"""Quotas and allocations that wait for room, as Service.handle: frames in,
frames out (the real wire format, no socket)."""

from __future__ import annotations

from shmarena.protocol import OK, Op, decode, encode
from tests.unit.test_exchange import outbox, send
from tests.unit.test_service import MIN, Peer, make_service

KiB = 1024


def test_an_owner_over_its_quota_is_refused_and_under_it_is_not() -> None:
    service = make_service()
    a = Peer(service, b"a")
    (row,) = a.ok(Op.OWNER, "capped", False, 64 * KiB)
    assert row["quota"] == 64 * KiB
    a.ok(Op.ALLOC, 48 * KiB, "capped", False)
    code, message = a.err(Op.ALLOC, 32 * KiB, "capped", False)
    assert code == "quota_exceeded"
    assert "'capped'" in message and "64 KiB" in message and "48 KiB" in message
    a.ok(Op.ALLOC, 16 * KiB, "capped", False)  # exactly up to the quota
    a.ok(Op.ALLOC, 512 * KiB, None, False)  # the session's own owner has no quota
    a.ok(Op.QUOTA, "capped", 0)  # none now
    a.ok(Op.ALLOC, 32 * KiB, "capped", False)
    assert service.check() == []


def test_the_session_quota_counts_cache_and_every_owner_the_session_created() -> None:
    service = make_service()
    a = Peer(service, b"a")
    a.ok(Op.QUOTA, "", 128 * KiB)
    a.ok(Op.ALLOC, 64 * KiB, None, False)
    mark = (a.session << 40) + 1  # a generation of this session's space
    # a refill that needs 2 x 32 KiB fits; the 6 more it asks for are trimmed
    taken, direct, _ = a.ok(Op.FILL, [32 * KiB, 8, 2], mark, [], None, False)
    assert [len(t) for t in taken] == [2] and direct == []
    code, message = a.err(Op.ALLOC, MIN, "mine", False)
    assert code == "quota_exceeded" and "128 KiB" in message and "--quota-per-session" in message
    assert [o["name"] for o in a.ok(Op.OWNERS)[0]] == [f"session-{a.session}"]  # no trace
    # a detached owner it creates is no way around the quota
    code, message = a.err(Op.ALLOC, 256 * KiB, "shared", True)
    assert code == "quota_exceeded" and "detached owners it created count too" in message
    a.ok(Op.QUOTA, "", 0)
    a.ok(Op.ALLOC, 256 * KiB, "shared", True)
    a.ok(Op.QUOTA, "", 384 * KiB)
    b = Peer(service, b"b")  # another session may use the detached owner: it counts
    assert b.err(Op.ALLOC, MIN, "shared", True)[0] == "quota_exceeded"  # against a
    a.ok(Op.BYE)  # ... while a lives; once it is gone, only the owner's own quota binds
    b.ok(Op.ALLOC, MIN, "shared", True)
    stats = service.stats(0)
    assert stats["quota_per_session_bytes"] == 384 * KiB and service.check() == []


def test_an_alloc_that_waits_is_met_by_a_free_in_arrival_order() -> None:
    service = make_service(size=256 * KiB)
    a, b, c = Peer(service, b"a"), Peer(service, b"b"), Peer(service, b"c")
    (big,) = a.ok(Op.ALLOC, 256 * KiB, None, False)  # the arena is full
    assert b.err(Op.ALLOC, 128 * KiB, None, False, 0.0)[0] == "out_of_memory"
    assert send(b, Op.ALLOC, 128 * KiB, None, False, 5.0) == b""  # kept
    assert send(c, Op.ALLOC, 64 * KiB, None, False, 5.0) == b""  # kept, behind b
    retry = encode([int(Op.ALLOC), b.rid, 128 * KiB, None, False, 5.0])  # the same id
    assert service.handle(b.ident, retry, b.now) == b""  # dropped: it waits already
    stats = service.stats(0)
    assert [w["session"] for w in stats["alloc_waiters"]] == [b.session, c.session]
    assert stats["waiting_requests"] == 2
    a.ok(Op.FREE, [big])
    service.wake(a.now)
    replies = outbox(service)
    assert set(replies) == {b"b", b"c"} and all(r[0] == OK for r in replies.values())
    assert service.stats(0)["alloc_waiters"] == [] and service.check() == []
    counters = service.stats(0)["counters"]
    assert counters["alloc_waits"] == 2 and counters["alloc_wait_timeouts"] == 0


def test_the_first_waiter_holds_back_later_smaller_ones() -> None:
    service = make_service(size=256 * KiB)
    a, b, c = Peer(service, b"a"), Peer(service, b"b"), Peer(service, b"c")
    (h1,) = a.ok(Op.ALLOC, 128 * KiB, None, False)
    (h2,) = a.ok(Op.ALLOC, 128 * KiB, None, False)
    send(b, Op.ALLOC, 256 * KiB, None, False, 5.0)
    send(c, Op.ALLOC, 64 * KiB, None, False, 5.0)
    a.ok(Op.FREE, [h1])  # room for c's, not b's: c waits behind b
    service.wake(a.now)
    assert outbox(service) == {}
    a.ok(Op.FREE, [h2])
    service.wake(a.now)
    assert list(outbox(service)) == [b"b"]  # b first; c still waits for room
    assert [w["session"] for w in service.stats(0)["alloc_waiters"]] == [c.session]


def test_a_waiter_whose_time_runs_out_gets_out_of_memory_and_a_dead_one_leaves() -> None:
    service = make_service(size=256 * KiB)
    a, b, c = Peer(service, b"a"), Peer(service, b"b"), Peer(service, b"c")
    a.ok(Op.ALLOC, 256 * KiB, None, False)
    send(b, Op.ALLOC, 64 * KiB, None, False, 2.0)
    send(c, Op.ALLOC, 64 * KiB, None, False, 50.0)
    assert service.next_wake() == b.now + 2.0
    service.end_session(c.session)  # a waiter that dies leaves the queue
    service.wake(b.now + 2.5)
    reply = outbox(service)[b"b"]
    assert reply[0] != OK and reply[2] == "out_of_memory" and "waited 2.5 s" in reply[3]
    stats = service.stats(0)
    assert stats["alloc_waiters"] == [] and stats["counters"]["alloc_wait_timeouts"] == 1


def test_a_quota_refusal_never_waits_and_bad_sizes_are_refused_at_once() -> None:
    service = make_service()
    a = Peer(service, b"a")
    a.ok(Op.OWNER, "capped", False, 8 * KiB)
    reply = decode(send(a, Op.ALLOC, 64 * KiB, "capped", False, 5.0))
    assert reply[2] == "quota_exceeded"
    a.ok(Op.ALLOC, 1 << 20, None, False)  # the arena is full now
    reply = decode(send(a, Op.ALLOC, -5, None, False, 5.0))
    assert reply[2] == "invalid_request" and service.stats(0)["alloc_waiters"] == []
    assert a.err(Op.QUOTA, "nobody", 4096)[0] == "unknown_owner"
    assert a.err(Op.QUOTA, "capped", -1)[0] == "invalid_request"
    assert a.err(Op.OWNER, "capped", False, -7)[0] == "invalid_request"
