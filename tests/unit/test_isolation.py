"""The daemon survives its own bugs, as the pure service: a failure while
handling one request or timer is answered, logged, counted, and leaves a
ledger that passes `check`; batch requests are all or none."""

from __future__ import annotations

from shmarena.protocol import ERR, FREE_EVENT, GEN_SHIFT, LATE_ERR, Op, decode, encode
from tests.unit.test_exchange import outbox, send
from tests.unit.test_service import Peer, make_service


def test_two_puts_timing_out_on_a_closed_full_queue_in_one_turn() -> None:
    service = make_service()
    a = Peer(service, b"a")
    a.ok(Op.QOPEN, "q", 1)
    a.ok(Op.QPUT, "q", b"first", [], 0.0)
    assert send(a, Op.QPUT, "q", b"second", [], 1.0) == b""
    assert send(a, Op.QPUT, "q", b"third", [], 1.0) == b""
    a.ok(Op.QCLOSE, "q")  # nobody has it open; only the two waiters keep it
    service.wake(a.now + 5.0)  # both expire in the same turn
    replies = [decode(frame) for _, frame in service.take_outbox()]
    assert [r[0] for r in replies] == [ERR, ERR]
    assert [r[2] for r in replies] == ["queue_full", "queue_full"]
    assert all("queue 'q' stayed full" in r[3] for r in replies)
    assert service.exchange.queues == {} and service.exchange.waiters == []
    assert service.counters.internal_errors == 0
    assert service.check() == []


def retained_by(service, session: int) -> int:
    return sum((b.retainers or {}).get(session, 0) for b in service.ledger.blocks.values())


def test_release_listing_a_handle_twice_is_refused_whole() -> None:
    service = make_service()
    a, b = Peer(service, b"a"), Peer(service, b"b")
    (h1,) = a.ok(Op.ALLOC, 4096)
    (h2,) = a.ok(Op.ALLOC, 4096)
    assert b.ok(Op.RETAIN, [h1, h2]) == [2]
    code, message = b.err(Op.RELEASE, [h2, h1, h1])
    assert code == "invalid_request", message
    assert "twice" in message and "nothing was released" in message
    assert retained_by(service, b.session) == 2  # all or none: h2 is still retained
    assert service.counters.internal_errors == 0
    assert b.ok(Op.RELEASE, [h1, h2]) == [2]
    assert service.check() == []


def test_a_handle_retained_twice_may_be_released_twice_in_one_request() -> None:
    service = make_service()
    a, b = Peer(service, b"a"), Peer(service, b"b")
    (h,) = a.ok(Op.ALLOC, 4096)
    assert b.ok(Op.RETAIN, [h, h]) == [2]
    assert retained_by(service, b.session) == 2
    assert b.ok(Op.RELEASE, [h, h]) == [2]
    assert retained_by(service, b.session) == 0
    assert service.check() == []


def test_free_listing_a_handle_twice_frees_nothing() -> None:
    service = make_service()
    a = Peer(service, b"a")
    (h1,) = a.ok(Op.ALLOC, 4096)
    (h2,) = a.ok(Op.ALLOC, 4096)
    code, message = a.err(Op.FREE, [h1, h2, h1])
    assert code == "stale_handle" and "twice" in message
    assert service.stats(0)["live_blocks"] == 2 and service.check() == []


def internal_events(service) -> list:
    return [e for e in service.take_log() if e.event == "internal_error"]


def test_a_failing_handler_answers_internal_error_and_the_service_goes_on() -> None:
    service = make_service()
    a, b = Peer(service, b"a"), Peer(service, b"b")
    (kept,) = a.ok(Op.ALLOC, 4096)
    service.faults = frozenset({"alloc"})
    code, message = a.err(Op.ALLOC, 4096)
    assert code == "internal_error"
    assert "while handling alloc" in message and "RuntimeError" in message
    assert "passed its check" in message
    assert service.counters.internal_errors == 1
    assert service.stats(0)["counters"]["errors_by_code"]["internal_error"] == 1
    (event,) = internal_events(service)
    assert event.level == "error" and event.fields["where"] == "alloc"
    assert "Traceback" in event.fields["traceback"] and "--debug-fail alloc" in event.message
    service.faults = frozenset()
    b.ok(Op.ALLOC, 4096)  # others, and the same client, go on
    a.ok(Op.FREE, [kept])
    assert service.check() == []


def test_a_bug_that_leaves_the_ledger_broken_quarantines_its_session() -> None:
    service = make_service()
    a, b = Peer(service, b"a"), Peer(service, b"b")
    a.ok(Op.ALLOC, 4096, "mine", False)
    (theirs,) = b.ok(Op.ALLOC, 8192)
    ledger = service.ledger
    real = ledger.alloc_many

    def broken(session_id, sizes, owner_name, *args, **kwargs):
        ledger.owners[owner_name].bytes += 4096  # half of an update, then a crash
        raise KeyError("injected")

    ledger.alloc_many = broken  # type: ignore[method-assign]
    code, message = a.err(Op.ALLOC, 4096, "mine", False)
    ledger.alloc_many = real  # type: ignore[method-assign]
    assert code == "internal_error" and f"session {a.session} is ended" in message
    assert "owner 'mine' byte count is off" in message
    assert service.check() == []
    assert service.counters.internal_errors == 1
    assert service.counters.quarantined_sessions == 1
    events = service.take_log()
    (event,) = [e for e in events if e.event == "internal_error"]
    assert event.fields["quarantined"] is True and event.fields["problems"]
    (after,) = [e for e in events if e.event == "quarantined"]
    assert after.fields["problems"] == [] and "passes its check" in after.message
    assert a.err(Op.PING)[0] == "session_lost"  # the client learns why, then says hello again
    assert "internal error" in a.err(Op.PING)[1]
    b.ok(Op.FREE, [theirs])
    assert service.stats(0)["used_bytes"] == 0 and service.check() == []


def test_a_bug_while_answering_kept_requests_answers_each_and_keeps_the_rest() -> None:
    service = make_service(size=8 * 4096)
    a, b = Peer(service, b"a"), Peer(service, b"b")
    (big,) = a.ok(Op.ALLOC, 8 * 4096)
    assert send(b, Op.LOOKUP, "never", 1.0) == b""
    assert send(b, Op.ALLOC, 4096, None, False, 1.0) == b""
    assert send(a, Op.LOOKUP, "later", 30.0) == b""
    service.faults = frozenset({"wake"})
    service.wake(b.now + 2.0)
    replies = [decode(frame) for _, frame in service.take_outbox()]
    assert sorted(r[2] for r in replies) == ["internal_error", "internal_error"]
    assert service.counters.internal_errors == 2
    assert service.exchange.waiters and service.exchange.waiters[0].args[0] == "later"
    service.faults = frozenset()
    a.ok(Op.FREE, [big])
    (handle,) = a.ok(Op.ALLOC, 4096)
    a.ok(Op.PUBLISH, "later", handle, False)
    (reply,) = outbox(service).values()
    assert reply[0] != ERR
    assert service.check() == []


def test_a_bug_in_one_timed_out_refusal_does_not_stop_the_others() -> None:
    service = make_service()
    a = Peer(service, b"a")
    assert send(a, Op.LOOKUP, "x", 1.0) == b""
    a.ok(Op.QOPEN, "q", 0)
    assert send(a, Op.QGET, "q", 0, 1.0) == b""
    exchange = service.exchange
    real = exchange._timed_out
    calls = []

    def first_breaks(waiter, now):
        calls.append(waiter.op)
        if len(calls) == 1:
            raise KeyError("injected")
        return real(waiter, now)

    exchange._timed_out = first_breaks  # type: ignore[method-assign]
    service.wake(a.now + 2.0)
    codes = sorted(decode(f)[2] for _, f in service.take_outbox())
    assert codes == ["internal_error", "queue_empty"] and len(calls) == 2
    assert exchange.waiters == [] and service.waiting == set()
    assert service.counters.internal_errors == 1 and service.check() == []


def test_internal_errors_are_exported_as_a_metric() -> None:
    from shmarena.daemon.metrics import families

    service = make_service()
    a = Peer(service, b"a")
    service.faults = frozenset({"ping"})
    assert a.err(Op.PING)[0] == "internal_error"
    by_name = {f.name: f for f in families(service.stats(0.0), {})}
    assert by_name["shmarena_internal_errors"].samples[0].value == 1
    assert by_name["shmarena_quarantined_sessions"].samples[0].value == 0


def test_a_reclaim_that_fails_half_way_leaves_nothing_of_the_session() -> None:
    service = make_service()
    a, b = Peer(service, b"a"), Peer(service, b"b")
    a.ok(Op.ALLOC, 4096)
    b.ok(Op.ALLOC, 4096)
    ledger = service.ledger

    def dies_half_way(session_id: int, reason: str = "ended"):
        ledger.sessions.pop(session_id)  # the first line of the real one, then a crash
        raise RuntimeError("injected")

    ledger.end_session = dies_half_way  # type: ignore[method-assign]
    try:
        service.reclaim(a.session, "exited", 1.0)
    except RuntimeError as error:  # what the server's loop catches and hands over
        del ledger.end_session
        service.internal_error("reclaiming a session", error, a.session, 1.0)
        service.quarantine()
    assert service.counters.quarantined_sessions == 1
    assert service.check() == []
    (event,) = internal_events(service)
    assert event.fields["quarantined"] is True
    # the rest of the session went too: its peer, and its owner with its block
    assert a.session not in service.session_peer and b"a" not in service.peers
    assert [o.session_id for o in service.ledger.owners.values()] == [b.session]
    assert service.stats(0)["used_bytes"] == 4096
    b.ok(Op.ALLOC, 4096)  # the others go on


def test_the_other_batches_are_all_or_none_or_per_event_with_a_clear_error() -> None:
    service = make_service(size=16 * 4096)
    a = Peer(service, b"a")
    # ALLOC_MANY whose last size does not fit: nothing is taken
    code, message = a.err(Op.ALLOC_MANY, [4096, 4096, 64 * 4096], None, False, "")
    assert code == "out_of_memory"
    assert service.stats(0)["used_bytes"] == 0 and service.stats(0)["owners"] == 0
    # FILL whose direct sizes do not fit after its cache classes did: nothing is taken
    mark = (a.session << GEN_SHIFT) + 1
    code, _ = a.err(Op.FILL, [4096, 4, 4], mark, [64 * 4096], None, False)
    assert code == "out_of_memory" and service.stats(0)["cached_bytes"] == 0
    # RETAIN of a good and a stale handle: nothing is retained
    (h,) = a.ok(Op.ALLOC, 4096)
    assert a.err(Op.RETAIN, [h, [*h[:4], h[4] + 1]])[0] == "stale_handle"
    assert not service.ledger.blocks[h[2]].retainers
    # POST events stand alone (they report what the client did already): a
    # duplicate free is refused by name as a late error, the first applies
    a.rid += 1
    frame = service.handle(
        a.ident, encode([int(Op.POST), a.rid, [FREE_EVENT, *h, FREE_EVENT, *h]]), a.now
    )
    reply = decode(frame)
    assert reply[0] == LATE_ERR and reply[2] == "stale_handle" and "1 of 2" in reply[3]
    assert service.stats(0)["used_bytes"] == 0
    assert service.counters.internal_errors == 0 and service.check() == []
