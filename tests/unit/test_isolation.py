"""The daemon survives its own bugs, as the pure service: a failure while
handling one request or timer is answered, logged, counted, and leaves a
ledger that passes `check`; batch requests are all or none."""

from __future__ import annotations

from shmarena.protocol import ERR, Op, decode
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
    assert "'q'" in replies[1][3] and "1 messages" in replies[1][3]
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
