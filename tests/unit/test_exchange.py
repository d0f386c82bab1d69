"""Named buffers, name events and queues, as Service.handle: frames in, frames out."""

from __future__ import annotations

import random

from shmarena.protocol import ERR, OK, SEQUENCED_OPS, Op, decode, encode
from tests.unit.test_service import Peer, make_service


def send(peer: Peer, op: Op, *args: object) -> bytes:
    """Send a request and return the raw reply frame (b"" if kept)."""
    if op in SEQUENCED_OPS:
        peer.rid += 1
        rid = peer.rid
    else:
        peer.free_rid += 1
        rid = peer.free_rid
    return peer.service.handle(peer.ident, encode([int(op), rid, *args]), peer.now)


def outbox(service) -> dict[bytes, list]:
    return {peer: decode(frame) for peer, frame in service.take_outbox()}


def test_publish_lookup_retains_and_name_vanishes_with_its_block() -> None:
    service = make_service()
    a, b = Peer(service, b"a"), Peer(service, b"b")
    (handle,) = a.ok(Op.ALLOC, 8192, None, False)
    assert a.ok(Op.PUBLISH, "frame/1", handle, True) == [None]
    ((got, sealed),) = b.ok(Op.LOOKUP, "frame/1", 0.0)
    assert got == handle and sealed is True
    (rows,) = b.ok(Op.NAMES, "frame/")
    assert [r["name"] for r in rows] == ["frame/1"] and rows[0]["bytes"] == 8192
    a.ok(Op.FREE, [handle])
    assert b.ok(Op.NAMES, "")[0] == []
    assert service.stats(0)["retained_only_blocks"] == 1  # b still reads it
    b.ok(Op.RELEASE, [handle])
    assert service.stats(0)["live_blocks"] == 0 and service.check() == []


def test_publish_twice_and_unknown_names_are_refused_with_the_name() -> None:
    service = make_service()
    a = Peer(service, b"a")
    (h1,) = a.ok(Op.ALLOC, 4096, None, False)
    (h2,) = a.ok(Op.ALLOC, 4096, None, False)
    a.ok(Op.PUBLISH, "x", h1, True)
    code, message = a.err(Op.PUBLISH, "x", h2, True)
    assert code == "name_exists" and "'x'" in message
    code, message = a.err(Op.PUBLISH, "y", h1, True)
    assert code == "name_exists" and "'x'" in message  # one name per block
    code, message = a.err(Op.LOOKUP, "nope", 0.0)
    assert code == "unknown_name" and "'nope'" in message and "shmarena names" in message
    assert a.err(Op.UNPUBLISH, "nope")[0] == "unknown_name"
    a.ok(Op.UNPUBLISH, "x")
    assert a.err(Op.LOOKUP, "x", 0.0)[0] == "unknown_name"
    assert service.check() == []


def test_a_waiting_lookup_is_met_by_the_publish_and_its_retry_is_dropped() -> None:
    service = make_service()
    a, b = Peer(service, b"a"), Peer(service, b"b")
    assert send(b, Op.LOOKUP, "later", 30.0) == b""
    lookup_id = b.rid
    # the client's retry of the same request is not run again
    assert service.handle(b.ident, encode([int(Op.LOOKUP), lookup_id, "later", 30.0]), 1) == b""
    (handle,) = a.ok(Op.ALLOC, 4096, None, False)
    a.ok(Op.PUBLISH, "later", handle, False)
    replies = outbox(service)
    assert replies[b"b"][:2] == [OK, lookup_id] and replies[b"b"][2] == [handle, False]
    # a retry after the answer gets the same answer from the reply cache
    again = service.handle(b.ident, encode([int(Op.LOOKUP), lookup_id, "later", 30.0]), 1)
    assert decode(again) == replies[b"b"]
    assert service.stats(0)["counters"]["requests"] > 0 and service.check() == []


def test_a_lookup_whose_time_runs_out_is_refused_at_its_deadline() -> None:
    service = make_service()
    b = Peer(service, b"b")
    assert send(b, Op.LOOKUP, "never", 2.0) == b""
    assert service.next_wake() == b.now + 2.0
    service.wake(b.now + 1.0)
    assert service.take_outbox() == []
    service.wake(b.now + 2.0)
    reply = outbox(service)[b"b"]
    assert reply[0] == ERR and reply[2] == "unknown_name" and "within 2 s" in reply[3]
    assert service.next_wake() is None


def test_events_come_in_order_from_a_cursor_and_wait_for_the_next() -> None:
    service = make_service()
    a = Peer(service, b"a")
    events, start, _ = a.ok(Op.EVENTS, -1, "", 0.0)
    assert events == [] and start == 0
    (h,) = a.ok(Op.ALLOC, 4096, None, False)
    a.ok(Op.PUBLISH, "p/1", h, True)
    (h2,) = a.ok(Op.ALLOC, 4096, None, False)
    a.ok(Op.PUBLISH, "q/1", h2, True)
    a.ok(Op.FREE, [h])
    events, cursor, _ = a.ok(Op.EVENTS, start, "p/", 0.0)
    assert [(e[1], e[2]) for e in events] == [("publish", "p/1"), ("recycle", "p/1")]
    assert cursor == 3
    # nothing new: kept, and met by the next event under the prefix only
    assert send(a, Op.EVENTS, cursor, "p/", 10.0) == b""
    retry = encode([int(Op.EVENTS), a.free_rid, cursor, "p/", 10.0])
    assert service.handle(a.ident, retry, a.now) == b""  # kept once, not twice
    (h3,) = a.ok(Op.ALLOC, 4096, None, False)
    a.ok(Op.PUBLISH, "q/2", h3, True)
    assert service.take_outbox() == []
    (h4,) = a.ok(Op.ALLOC, 4096, None, False)
    a.ok(Op.PUBLISH, "p/2", h4, True)
    reply = outbox(service)[b"a"]
    assert reply[0] == OK and [e[2] for e in reply[2]] == ["p/2"]


def test_queue_holds_blocks_after_the_sender_dies_and_passes_them_to_the_taker() -> None:
    service = make_service()
    a, b = Peer(service, b"a"), Peer(service, b"b")
    a.ok(Op.QOPEN, "jobs", 0)
    b.ok(Op.QOPEN, "jobs", 0)
    (h,) = a.ok(Op.ALLOC, 65536, None, False)
    assert a.ok(Op.QPUT, "jobs", b"payload", [h], 0.0) == [1]
    a.ok(Op.FREE, [h])  # the queue's reference keeps it
    service.end_session(a.session)  # and the sender dies
    assert service.stats(0)["queued_bytes"] == 65536
    ((payload, handles),) = b.ok(Op.QGET, "jobs", 0, 0.0)
    assert payload == b"payload" and handles == [h]
    assert service.stats(0)["queued_bytes"] == 0
    assert service.check() == []
    service.end_session(b.session)  # the taker dies: nothing is left
    stats = service.stats(0)
    assert stats["live_blocks"] == 0 and stats["retained_only_blocks"] == 0
    assert stats["free_bytes"] == stats["size_bytes"] and stats["queues"] == []


def test_queue_get_waits_and_put_on_a_full_queue_waits_in_fifo_order() -> None:
    service = make_service()
    a, b, c = Peer(service, b"a"), Peer(service, b"b"), Peer(service, b"c")
    a.ok(Op.QOPEN, "q", 1)
    assert b.err(Op.QGET, "q", 0, 0.0)[0] == "queue_empty"
    assert send(b, Op.QGET, "q", 0, 5.0) == b""
    assert send(c, Op.QGET, "q", 0, 5.0) == b""
    a.ok(Op.QPUT, "q", b"1", [], 0.0)
    assert list(outbox(service)) == [b"b"]  # the first waiter gets the first message
    a.ok(Op.QPUT, "q", b"2", [], 0.0)
    assert outbox(service)[b"c"][2] == [b"2", []]
    a.ok(Op.QPUT, "q", b"3", [], 0.0)
    assert a.err(Op.QPUT, "q", b"4", [], 0.0)[0] == "queue_full"
    assert send(a, Op.QPUT, "q", b"4", [], 5.0) == b""
    assert b.ok(Op.QGET, "q", 0, 0.0) == [[b"3", []]]
    assert outbox(service)[b"a"][2] == 1  # the kept put went in
    assert b.ok(Op.QSTAT, "q") == [[1, 1]]


def test_a_queue_is_forgotten_with_what_it_holds_when_its_last_user_leaves() -> None:
    service = make_service()
    a, b = Peer(service, b"a"), Peer(service, b"b")
    a.ok(Op.QOPEN, "q", 0)
    b.ok(Op.QOPEN, "q", 0)
    (h,) = a.ok(Op.ALLOC, 65536, None, False)
    a.ok(Op.QPUT, "q", b"x", [h], 0.0)
    a.ok(Op.FREE, [h])
    a.ok(Op.QCLOSE, "q")
    assert [q["qsize"] for q in service.stats(0)["queues"]] == [1]  # b still has it open
    service.end_session(b.session)  # the last user dies: nobody can take the message
    stats = service.stats(0)
    assert stats["queues"] == [] and stats["queued_bytes"] == 0
    assert stats["free_bytes"] == stats["size_bytes"] and service.check() == []
    assert a.err(Op.QSTAT, "q")[0] == "invalid_request"


def test_bad_arguments_are_refused_and_change_nothing() -> None:
    service = make_service()
    a = Peer(service, b"a")
    before = service.stats(0)["generation"]
    for op, args in [
        (Op.PUBLISH, ("", [77, 0, 0, 1, 1], True)),
        (Op.PUBLISH, ("n", [77, 0, 0, 4096, 99], True)),
        (Op.LOOKUP, ("n", -1.0)),
        (Op.LOOKUP, ("n", float("nan"))),
        (Op.QOPEN, ("q", -1)),
        (Op.QPUT, ("q", "not bytes", [], 0.0)),
        (Op.QPUT, ("q", b"x" * (300 << 10), [], 0.0)),
        (Op.EVENTS, (0, "", 1e9)),
    ]:
        reply = a.raw(op, *args)
        assert reply[0] == ERR, (op, args, reply)
    assert service.stats(0)["generation"] == before and service.check() == []


def test_random_queue_traffic_keeps_the_books() -> None:
    """A model run: puts, gets and deaths at random; every block ends up freed."""
    rng = random.Random(7)
    service = make_service(size=16 << 20)
    peers = [Peer(service, bytes([65 + i]), pid=1000 + i) for i in range(4)]
    for p in peers:
        p.ok(Op.QOPEN, "q", 0)
    put = got = 0
    for step in range(600):
        p = rng.choice(peers)
        if rng.random() < 0.55:
            sizes = [rng.choice([4096, 65536]) for _ in range(rng.randint(0, 3))]
            handles = []
            if sizes:
                reply = p.raw(Op.ALLOC_MANY, sizes, None, False)
                if reply[0] != OK:  # full of queued messages: a refusal, nothing taken
                    assert reply[2] == "out_of_memory"
                    continue
                handles = reply[2]
            reply = p.raw(Op.QPUT, "q", b"m%d" % step, handles, 0.0)
            assert reply[0] == OK
            put += 1
            if handles and rng.random() < 0.7:
                p.ok(Op.FREE, handles)
        elif rng.random() < 0.9:
            reply = p.raw(Op.QGET, "q", 0, 0.0)
            if reply[0] == OK:
                got += 1
                payload, handles = reply[2]
                if handles and rng.random() < 0.8:
                    p.ok(Op.RELEASE, handles)
        else:  # this process dies; a new one takes its place
            service.end_session(p.session)
            index = peers.index(p)
            peers[index] = Peer(service, bytes([97 + step % 26]) + b"%d" % step, pid=2000 + step)
            peers[index].ok(Op.QOPEN, "q", 0)
        assert service.check() == []
    for p in peers:
        while p.raw(Op.QGET, "q", 0, 0.0)[0] == OK:
            got += 1
        service.end_session(p.session)
    assert got == put
    stats = service.stats(0)
    assert stats["free_bytes"] == stats["size_bytes"] and stats["queues"] == []


def test_a_get_may_hand_what_it_takes_to_another_session_of_the_same_process() -> None:
    service = make_service()
    waiter, keeper = Peer(service, b"w", pid=7), Peer(service, b"k", pid=7)
    stranger = Peer(service, b"s", pid=8)
    waiter.ok(Op.QOPEN, "q", 0)
    (h,) = stranger.ok(Op.ALLOC, 65536, None, False)
    stranger.ok(Op.QPUT, "q", b"m", [h], 0.0)
    stranger.ok(Op.QPUT, "q", b"n", [h], 0.0)
    stranger.ok(Op.FREE, [h])
    code, message = stranger.err(Op.QGET, "q", waiter.session, 0.0)
    assert code == "invalid_request" and "process 7's" in message
    assert waiter.err(Op.QGET, "q", 999, 0.0)[0] == "invalid_request"
    assert service.stats(0)["queues"][0]["qsize"] == 2  # the refusals took nothing
    waiter.ok(Op.QGET, "q", keeper.session, 0.0)
    service.end_session(waiter.session)  # the keeper holds the block, not the waiter
    assert service.stats(0)["live_blocks"] + service.stats(0)["retained_only_blocks"] == 1
    keeper.ok(Op.RELEASE, [h])
    stranger.ok(Op.QCLOSE, "q")  # its last user leaves: the second message goes
    stats = service.stats(0)
    assert stats["free_bytes"] == stats["size_bytes"] and service.check() == []


def test_a_stat_does_not_make_the_asking_session_a_user() -> None:
    service = make_service()
    a, b = Peer(service, b"a"), Peer(service, b"b")
    a.ok(Op.QOPEN, "q", 0)
    assert b.ok(Op.QSTAT, "q") == [[0, 0]]
    a.ok(Op.QCLOSE, "q")  # the only user leaves: b's stat kept nothing alive
    assert service.stats(0)["queues"] == []
