"""QPUTS, QRESERVE, QTAKE, QACK and QUNTAKE as Service.handle: frames in, frames out."""

from __future__ import annotations

from shmarena.protocol import LATE_ERR, Op, decode
from tests.unit.test_exchange import outbox, send
from tests.unit.test_service import Peer, make_service


def test_reserved_room_bounds_one_way_puts_and_a_put_without_room_is_refused_late() -> None:
    service = make_service()
    a = Peer(service, b"a")
    a.ok(Op.QOPEN, "q", 4)
    assert a.ok(Op.QRESERVE, "q", 3, 0.0) == [3, 0]
    assert send(a, Op.QPUTS, "q", [b"1", [], b"2", [], b"3", []]) == b""  # one-way: no reply
    assert a.ok(Op.QSTAT, "q") == [[3, 4]]
    assert a.ok(Op.QRESERVE, "q", 5, 0.0) == [1, 3]  # only one slot left
    assert a.err(Op.QRESERVE, "q", 1, 0.0)[0] == "queue_full"  # none at all now
    late = decode(send(a, Op.QPUTS, "q", [b"4", [], b"5", []]))
    assert late[0] == LATE_ERR and late[2] == "queue_full"
    assert "the first 1 were queued" in late[3]
    assert a.ok(Op.QSTAT, "q") == [[4, 4]]
    assert service.check() == []


def test_take_ahead_ack_untake_and_a_session_end_requeues_in_order() -> None:
    service = make_service()
    a, b = Peer(service, b"a"), Peer(service, b"b")
    a.ok(Op.QOPEN, "q", 0)
    a.ok(Op.QRESERVE, "q", 10, 0.0)
    send(a, Op.QPUTS, "q", [x for i in range(6) for x in (bytes([i]), [])])
    flat, left = b.ok(Op.QTAKE, "q", 4, 1 << 20, 0.0)
    assert flat[0::2] == [b"\x00", b"\x01", b"\x02", b"\x03"] and left == 5
    assert a.ok(Op.QSTAT, "q") == [[5, 0]]  # three taken ahead still count
    assert send(b, Op.QACK, "q", 1) == b""  # b\x01 delivered
    assert b.ok(Op.QUNTAKE, "q", 1) == [None]  # b\x03 back to the front
    assert a.ok(Op.QSTAT, "q") == [[4, 0]]
    service.end_session(b.session)  # b\x02 (taken ahead) goes back too, in order
    flat, _ = a.ok(Op.QTAKE, "q", 10, 1 << 20, 0.0)
    assert flat[0::2] == [b"\x02", b"\x03", b"\x04", b"\x05"]
    assert send(a, Op.QACK, "q", 3) == b""
    assert a.ok(Op.QSTAT, "q") == [[0, 0]]
    assert service.check() == []


def test_a_waiting_take_is_met_by_a_one_way_put_and_by_a_session_end() -> None:
    service = make_service()
    a, b, c = Peer(service, b"a"), Peer(service, b"b"), Peer(service, b"c")
    a.ok(Op.QOPEN, "q", 0)
    a.ok(Op.QRESERVE, "q", 10, 0.0)
    assert send(b, Op.QTAKE, "q", 4, 1 << 20, 5.0) == b""  # kept
    send(a, Op.QPUTS, "q", [b"x", [], b"y", []])
    reply = outbox(service)[b"b"]
    assert reply[2][0::2] == [b"x", b"y"]
    assert send(c, Op.QTAKE, "q", 1, 0, 5.0) == b""  # kept: b holds y taken ahead
    service.end_session(b.session)
    service.wake(0.0)
    assert outbox(service)[b"c"][2] == [b"y", []]
    assert service.check() == []


def test_malformed_or_unbounded_queue_requests_are_refused_naming_the_bound() -> None:
    service = make_service()
    a = Peer(service, b"a")
    a.ok(Op.QOPEN, "q", 0)
    assert "MAX_QUEUE_CREDIT" in a.err(Op.QRESERVE, "q", 1 << 20, 0.0)[1]
    assert "MAX_PREFETCH" in a.err(Op.QTAKE, "q", 1 << 20, 0, 0.0)[1]
    for op, args, words in (
        (Op.QACK, ("q", 2), "ack of 2"),  # one-way: refused late
        (Op.QPUTS, ("q", [b"only a payload"]), "pairs"),
        (Op.QPUTS, ("q", [b"p", "not a list"]), "handles"),
    ):
        late = a.raw(op, *args)
        assert late[0] == LATE_ERR and late[2] == "invalid_request" and words in late[3]
    assert a.ok(Op.QSTAT, "q") == [[0, 0]]
    assert service.check() == []


def test_a_batch_of_in_band_puts_uses_credit_then_free_room_and_is_refused_whole_only_past_it() -> (
    None
):
    service = make_service()
    a = Peer(service, b"a")
    a.ok(Op.QOPEN, "q", 6)
    assert a.ok(Op.QRESERVE, "q", 2, 0.0) == [2, 0]
    # two in reserved slots, two in free room: all queued at once
    assert send(a, Op.QPUTS, "q", [x for i in range(4) for x in (bytes([i]), [])]) == b""
    assert a.ok(Op.QSTAT, "q") == [[4, 6]]
    assert service.check() == []  # the queued bytes and the reservations add up
    late = decode(send(a, Op.QPUTS, "q", [x for i in range(3) for x in (bytes([i]), [])]))
    assert late[0] == LATE_ERR and late[2] == "queue_full"
    assert "the first 2 were queued" in late[3]  # message by message past the room
    flat, _ = a.ok(Op.QTAKE, "q", 7, 1 << 20, 0.0)
    assert flat[0::2] == [b"\x00", b"\x01", b"\x02", b"\x03", b"\x00", b"\x01"]
    assert send(a, Op.QACK, "q", 5) == b""
    assert a.ok(Op.QSTAT, "q") == [[0, 6]]
    assert service.check() == []
