"""Kept (waiting) requests: every one is answered by its deadline at the
latest, none waits for what can never come, one session keeps a bounded
number, and meeting them touches only the ones a change concerns. As
Service.handle (frames in, frames out) and as the Exchange itself."""

from __future__ import annotations

import random
import time

from shmarena.daemon.exchange import Exchange, Waiter
from shmarena.daemon.service import ArenaInfo, Service
from shmarena.limits import MAX_KEPT_PER_SESSION
from shmarena.protocol import ERR, OK, SEQUENCED_OPS, Op, decode
from tests.unit.test_exchange import outbox, send
from tests.unit.test_service import EPOCH, MIN, Peer, make_service

KiB = 1024
MiB = 1 << 20


def make_info_service(size: int, **info: object) -> Service:
    return Service(ArenaInfo("unit", EPOCH, size, MIN, "/shmarena-unit", 1, 0.0, **info))


# -- allocations that wait -----------------------------------------------------


def test_a_waiting_alloc_behind_others_that_meets_its_quota_is_refused_at_once() -> None:
    service = make_service(size=256 * KiB)
    a, b, c = Peer(service, b"a"), Peer(service, b"b"), Peer(service, b"c")
    a.ok(Op.ALLOC, 256 * KiB, None, False)  # the arena is full
    assert send(b, Op.ALLOC, 128 * KiB, None, False, 5.0) == b""  # kept
    c.ok(Op.OWNER, "capped", False, 8 * KiB)
    reply = decode(send(c, Op.ALLOC, 64 * KiB, "capped", False, 5.0))  # behind b, over quota
    assert reply[0] == ERR and reply[2] == "quota_exceeded" and "'capped'" in reply[3]
    assert [w["session"] for w in service.stats(0)["alloc_waiters"]] == [b.session]
    assert service.check() == []


def test_a_waiter_that_later_meets_its_quota_gets_it_and_the_next_is_served() -> None:
    service = make_service(size=256 * KiB)
    a, b, c = Peer(service, b"a"), Peer(service, b"b"), Peer(service, b"c")
    (big,) = a.ok(Op.ALLOC, 256 * KiB, None, False)
    send(b, Op.ALLOC, 128 * KiB, None, False, 5.0)
    send(c, Op.ALLOC, 64 * KiB, None, False, 5.0)
    a.ok(Op.QUOTA, "", 64 * KiB)  # now b's request is over the quota per session
    a.ok(Op.FREE, [big])
    service.wake(a.now)
    replies = outbox(service)
    assert replies[b"b"][0] == ERR and replies[b"b"][2] == "quota_exceeded"
    assert replies[b"c"][0] == OK  # not held back by b
    assert service.stats(0)["alloc_waiters"] == [] and service.next_wake() is None
    assert not service.has_waiters() and service.check() == []


def test_no_waiter_outlives_its_deadline_whatever_it_met() -> None:
    service = make_service(size=256 * KiB)
    a, b = Peer(service, b"a"), Peer(service, b"b")
    (big,) = a.ok(Op.ALLOC, 256 * KiB, None, False)
    send(b, Op.ALLOC, 128 * KiB, None, False, 2.0)
    a.ok(Op.QUOTA, "", 64 * KiB)  # b is now over its quota, and there is no room
    service.wake(b.now + 3.0)  # past its deadline
    reply = outbox(service)[b"b"]
    assert reply[0] == ERR and reply[2] in ("quota_exceeded", "out_of_memory")
    assert service.next_wake() is None and not service.has_waiters()


def test_an_alloc_larger_than_the_arena_is_refused_at_once_and_says_so() -> None:
    service = make_service(size=256 * KiB)
    a, b = Peer(service, b"a"), Peer(service, b"b")
    reply = decode(send(a, Op.ALLOC, 512 * KiB, None, False, 60.0))
    assert reply[0] == ERR and reply[2] == "out_of_memory"
    assert "never" in reply[3] and "--size" in reply[3] and "512 KiB" in reply[3]
    assert service.stats(0)["alloc_waiters"] == []
    # and without a wait the refusal says the same
    code, message = b.err(Op.ALLOC, 512 * KiB, None, False, 0.0)
    assert code == "out_of_memory" and "never" in message
    b.ok(Op.ALLOC, 256 * KiB, None, False)  # the whole arena is possible
    assert service.check() == []


def test_a_later_waiter_is_served_although_an_impossible_one_came_first() -> None:
    service = make_service(size=256 * KiB)
    a, b, c = Peer(service, b"a"), Peer(service, b"b"), Peer(service, b"c")
    (h,) = a.ok(Op.ALLOC, 256 * KiB, None, False)
    assert decode(send(b, Op.ALLOC, 1 * MiB, None, False, 60.0))[2] == "out_of_memory"
    assert send(c, Op.ALLOC, 64 * KiB, None, False, 60.0) == b""
    a.ok(Op.FREE, [h])
    service.wake(a.now)
    assert outbox(service)[b"c"][0] == OK


def test_impossible_means_beyond_max_size_when_the_arena_may_grow() -> None:
    service = make_info_service(256 * KiB, max_size_bytes=1 * MiB)
    a = Peer(service, b"a")
    reply = decode(send(a, Op.ALLOC, 2 * MiB, None, False, 60.0))
    assert reply[2] == "out_of_memory" and "--max-size" in reply[3] and "never" in reply[3]
    (h,) = a.ok(Op.ALLOC, 512 * KiB, None, False, 60.0)  # grows: possible
    assert h[3] == 512 * KiB and service.check() == []


def test_impossible_for_the_buddy_allocator_is_beyond_its_largest_block() -> None:
    service = make_info_service(384 * KiB, allocator="buddy")  # blocks of 256 K at most
    a = Peer(service, b"a")
    reply = decode(send(a, Op.ALLOC, 300 * KiB, None, False, 60.0))
    assert reply[0] == ERR and reply[2] == "out_of_memory" and "never" in reply[3]
    a.ok(Op.ALLOC, 256 * KiB, None, False, 60.0)
    assert service.stats(0)["alloc_waiters"] == [] and service.check() == []


def test_an_alloc_over_an_owner_quota_smaller_than_it_never_waits() -> None:
    service = make_service(size=256 * KiB)
    a = Peer(service, b"a")
    a.ok(Op.OWNER, "small", False, 16 * KiB)
    a.ok(Op.ALLOC, 256 * KiB, None, False)
    reply = decode(send(a, Op.ALLOC, 64 * KiB, "small", False, 60.0))
    assert reply[0] == ERR and reply[2] == "quota_exceeded"
    assert service.stats(0)["alloc_waiters"] == []


# -- the bound per session ------------------------------------------------------


def test_a_session_keeps_a_bounded_number_of_requests_and_is_told_which_bound() -> None:
    service = make_service(size=256 * KiB)
    a, b = Peer(service, b"a"), Peer(service, b"b")
    a.ok(Op.QOPEN, "q", 0)
    a.ok(Op.ALLOC, 256 * KiB, None, False)
    assert send(a, Op.ALLOC, 4 * KiB, None, False, 30.0) == b""
    assert send(a, Op.QGET, "q", 0, 30.0) == b""
    assert send(a, Op.EVENTS, 0, "x/", 30.0) == b""
    for i in range(MAX_KEPT_PER_SESSION - 3):
        assert send(a, Op.LOOKUP, f"n{i}", 30.0) == b""
    assert service.stats(0)["waiting_requests"] == MAX_KEPT_PER_SESSION
    for op, args in [
        (Op.LOOKUP, ("one-more", 30.0)),
        (Op.QGET, ("q", 0, 30.0)),
        (Op.ALLOC, (4 * KiB, None, False, 30.0)),
    ]:
        reply = decode(send(a, op, *args))
        assert reply[0] == ERR and reply[2] == "limit_reached", (op, reply)
        assert reply[4]["limit"] == "kept_requests_per_session"
        assert reply[4]["value"] == MAX_KEPT_PER_SESSION
        assert str(MAX_KEPT_PER_SESSION) in reply[3]
    # a request that needs no wait is still answered; other sessions may wait
    assert a.err(Op.LOOKUP, "one-more", 0.0)[0] == "unknown_name"
    assert send(b, Op.LOOKUP, "n0", 30.0) == b""
    limits = service.stats(0)["limits"]
    assert limits["kept_requests_per_session"] == MAX_KEPT_PER_SESSION
    rows = {r["session"]: r["waiting_requests"] for r in a.ok(Op.CLIENTS)[0]}
    assert rows == {a.session: MAX_KEPT_PER_SESSION, b.session: 1}
    assert service.check() == []


def test_a_met_request_makes_room_for_another() -> None:
    service = make_service()
    a, b = Peer(service, b"a"), Peer(service, b"b")
    for i in range(MAX_KEPT_PER_SESSION):
        send(a, Op.LOOKUP, f"n{i}", 30.0)
    assert decode(send(a, Op.LOOKUP, "more", 30.0))[2] == "limit_reached"
    (h,) = b.ok(Op.ALLOC, 4096, None, False)
    b.ok(Op.PUBLISH, "n7", h, True)
    assert outbox(service)[b"a"][0] == OK
    assert send(a, Op.LOOKUP, "more", 30.0) == b""
    service.wake(a.now + 31.0)  # all time out
    assert len(outbox(service)) == 1 and service.stats(0)["waiting_requests"] == 0
    assert send(a, Op.LOOKUP, "again", 30.0) == b""


# -- meeting touches only what a change concerns --------------------------------


def test_a_publish_meets_exactly_the_lookups_of_its_name() -> None:
    service = make_service(size=4 * MiB)
    peers = [Peer(service, b"p%d" % i, pid=100 + i) for i in range(10)]
    for p in peers:  # 10 000 parked lookups of other names
        for i in range(1000):
            assert send(p, Op.LOOKUP, f"other/{p.ident.decode()}/{i}", 60.0) == b""
    wanted = [Peer(service, b"w%d" % i, pid=200 + i) for i in range(3)]
    for w in wanted:
        assert send(w, Op.LOOKUP, "frame", 60.0) == b""
    (h,) = peers[0].ok(Op.ALLOC, 4096, None, False)
    started = time.perf_counter()
    peers[0].ok(Op.PUBLISH, "frame", h, True)
    took = time.perf_counter() - started
    replies = outbox(service)
    assert sorted(replies) == [b"w0", b"w1", b"w2"]
    assert all(r[0] == OK and r[2][0] == h for r in replies.values())
    assert service.stats(0)["waiting_requests"] == 10_000
    assert service.exchange.check() == [] and service.check() == []
    print(f"FIGURE publish meeting 3 of 10003 parked lookups: {took * 1e6:.0f} us")


def test_a_put_meets_the_getters_of_its_queue_in_order_and_stops_when_empty() -> None:
    service = make_service()
    a = Peer(service, b"a")
    getters = [Peer(service, b"g%d" % i, pid=300 + i) for i in range(5)]
    for q in ("q", "other"):
        a.ok(Op.QOPEN, q, 0)
    for g in getters:
        assert send(g, Op.QGET, "q", 0, 30.0) == b""
        assert send(g, Op.QGET, "other", 0, 30.0) == b""
    a.ok(Op.QPUT, "q", b"1", [], 0.0)
    a.ok(Op.QPUT, "q", b"2", [], 0.0)
    replies = outbox(service)
    assert list(replies) == [b"g0", b"g1"] and replies[b"g1"][2] == [b"2", []]
    assert service.stats(0)["waiting_requests"] == 8 and service.check() == []


def test_events_waiters_are_met_by_their_prefix_only() -> None:
    service = make_service()
    a = Peer(service, b"a")
    subs = {b"all": "", b"p": "p/", b"pq": "p/q", b"x": "x/"}
    peers = {k: Peer(service, k, pid=400 + i) for i, k in enumerate(subs)}
    for k, prefix in subs.items():
        assert send(peers[k], Op.EVENTS, 0, prefix, 30.0) == b""
    (h,) = a.ok(Op.ALLOC, 4096, None, False)
    a.ok(Op.PUBLISH, "p/q1", h, True)
    assert sorted(outbox(service)) == [b"all", b"p", b"pq"]
    assert service.stats(0)["waiting_requests"] == 1 and service.check() == []


def test_end_session_removes_its_waiters_from_every_index() -> None:
    service = make_service(size=256 * KiB)
    a, b = Peer(service, b"a"), Peer(service, b"b")
    a.ok(Op.QOPEN, "q", 1)
    a.ok(Op.QPUT, "q", b"full", [], 0.0)
    b.ok(Op.ALLOC, 256 * KiB, None, False)
    for i in range(50):
        send(a, Op.LOOKUP, f"n{i % 5}", 30.0)
    send(a, Op.EVENTS, 0, "z", 30.0)
    send(a, Op.QPUT, "q", b"more", [], 30.0)
    send(a, Op.ALLOC, 4096, None, False, 30.0)
    send(b, Op.LOOKUP, "n0", 30.0)
    assert service.stats(0)["waiting_requests"] == 54
    service.end_session(a.session)
    ex = service.exchange
    assert service.stats(0)["waiting_requests"] == 1 and ex.check() == []
    assert [w.session_id for w in ex.waiters] == [b.session]
    assert service.next_wake() == b.now + 30.0
    assert service.check() == []


def test_deadlines_of_met_requests_do_not_pile_up() -> None:
    service = make_service()
    a, b = Peer(service, b"a"), Peer(service, b"b")
    (h,) = b.ok(Op.ALLOC, 4096, None, False)
    for i in range(5000):  # each kept for an hour and met at once
        send(a, Op.LOOKUP, f"n{i}", 3600.0)
        b.ok(Op.PUBLISH, f"n{i}", h, True)
        b.ok(Op.UNPUBLISH, f"n{i}")
    assert len(outbox(service)) == 1 and service.next_wake() is None
    assert len(service.exchange.deadlines) <= 64


def test_exchange_check_finds_an_index_that_disagrees() -> None:
    service = make_service()
    ex: Exchange = service.exchange
    ex.wait(Waiter(Op.LOOKUP, 1, 5, 10.0, ("n", 10.0)))
    assert ex.check() == []
    ex.by_session.clear()
    assert any("session" in p for p in ex.check())


def test_a_turn_with_nothing_due_leaves_every_kept_request_alone() -> None:
    """What the server does after each turn while requests are kept: nothing
    is answered before its time, the next wake is the earliest deadline.
    (Prints what such a turn costs with 0, 1 000 and 5 000 kept lookups.)"""
    figures = []
    for parked in (0, 1000, 5000):
        service = make_service()
        peers = [Peer(service, b"p%d" % i, pid=100 + i) for i in range(5)]
        for i in range(parked):
            send(peers[i % 5], Op.LOOKUP, f"n{i}", 30.0 + i / 1000)
        now = peers[0].now
        started = time.perf_counter()
        for _ in range(1000):
            if service.has_waiters():
                service.wake(now + 1.0)
            service.next_wake()
        figures.append(f"{parked}: {(time.perf_counter() - started) * 1e3:.2f} us")
        assert service.take_outbox() == []
        assert service.next_wake() == (now + 30.0 if parked else None)
        assert service.stats(0)["waiting_requests"] == parked
    print("FIGURE one loop turn's waiter upkeep by kept lookups:", ", ".join(figures))


def test_random_waits_are_each_answered_once_and_the_indexes_stay_right() -> None:
    """A model run: lookups, gets, puts, event waits and allocations that
    wait, publishes, frees, deaths and the clock at random; every kept
    request is answered exactly once (met, refused or timed out) or dropped
    with its session, and `check` holds after every step."""
    rng = random.Random(19)
    service = make_service(size=512 * KiB)
    peers = [Peer(service, b"%c" % (65 + i), pid=500 + i) for i in range(4)]
    for p in peers:
        p.ok(Op.QOPEN, "q", 2)
    kept: dict[tuple[bytes, int], Peer] = {}
    answered: dict[tuple[bytes, int], int] = {}
    published: dict[str, list] = {}
    now = peers[0].now

    def collect() -> None:
        for ident, frame in service.take_outbox():
            rid = decode(frame)[1]
            answered[(ident, rid)] = answered.get((ident, rid), 0) + 1
            assert kept.pop((ident, rid), None) is not None, (ident, rid)

    for step in range(1500):
        p = rng.choice(peers)
        p.now = now
        choice = rng.random()
        if choice < 0.25:
            op, args = Op.LOOKUP, (f"n{rng.randrange(8)}", rng.choice([0.5, 2.0, 5.0]))
        elif choice < 0.4:
            op, args = Op.QGET, ("q", 0, rng.choice([0.5, 3.0]))
        elif choice < 0.55:
            op, args = Op.QPUT, ("q", b"m", [], rng.choice([0.5, 3.0]))
        elif choice < 0.62:
            op, args = Op.EVENTS, (service.exchange.next_seq, f"n{rng.randrange(3)}", 2.0)
        elif choice < 0.72:
            op, args = Op.ALLOC, (rng.choice([64, 128, 256]) * KiB, None, False, 2.0)
        else:
            op = None
        if op is not None:
            frame = send(p, op, *args)
            rid = p.rid if op in SEQUENCED_OPS else p.free_rid
            if frame == b"":
                kept[(p.ident, rid)] = p
        elif choice < 0.82:
            name = f"n{rng.randrange(8)}"
            reply = p.raw(Op.ALLOC, 4 * KiB, None, False)
            if reply[0] == OK and name not in published:
                p.ok(Op.PUBLISH, name, reply[2], True)
                published[name] = reply[2]
        elif choice < 0.9 and published:
            name = rng.choice(sorted(published))
            handle = published.pop(name)
            for q in peers:  # its owner frees it: the name vanishes
                if q.raw(Op.FREE, [handle])[0] == OK:
                    break
        elif choice < 0.93:
            service.end_session(p.session)
            kept = {k: v for k, v in kept.items() if v is not p}
            index = peers.index(p)
            peers[index] = Peer(service, b"%c%d" % (97 + step % 26, step), pid=900 + step)
            peers[index].ok(Op.QOPEN, "q", 2)
            published = {n: h for n, h in published.items() if n in service.exchange.names}
        else:
            now += rng.choice([0.3, 1.0, 2.5])
        service.wake(now)
        collect()
        published = {n: h for n, h in published.items() if n in service.exchange.names}
        assert service.check() == []
        assert service.stats(0)["waiting_requests"] == len(kept)
    service.wake(now + 10.0)
    collect()
    assert len(answered) > 300  # the run did keep requests (593 with this seed)
    assert kept == {} and set(answered.values()) <= {1}
    assert service.next_wake() is None and not service.has_waiters()


def test_a_waiter_that_cannot_be_met_after_all_keeps_its_place() -> None:
    service = make_service()
    ex = service.exchange
    first, second = (Waiter(Op.LOOKUP, 1, rid, 10.0, ("x", 10.0)) for rid in (1, 2))
    ex.wait(first)
    ex.wait(second)
    ex._meet((Op.LOOKUP, "x"), lambda: True)  # "x" is not published: lookup gives None
    assert ex.waiters == [first, second] and ex.met == [] and ex.check() == []


def test_an_alloc_queued_behind_others_with_a_bad_owner_name_is_refused_at_once() -> None:
    service = make_service(size=256 * KiB)
    a, b = Peer(service, b"a"), Peer(service, b"b")
    a.ok(Op.ALLOC, 256 * KiB, None, False)
    send(a, Op.ALLOC, 64 * KiB, None, False, 5.0)
    reply = decode(send(b, Op.ALLOC, 64 * KiB, "", False, 5.0))
    assert reply[0] == ERR and reply[2] == "invalid_request"
    assert [w["session"] for w in service.stats(0)["alloc_waiters"]] == [a.session]
    assert [r["name"] for r in b.ok(Op.OWNERS)[0]] == [f"session-{a.session}"]  # no trace
