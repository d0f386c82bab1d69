"""Kept (waiting) requests across a restart from the persistent table, on the
pure core: a `Service`, its table written as records and folded back
(`shmarena.daemon.table`), and a second `Service` that adopts it, as a
restarted daemon does. A request kept and not met when the table was written
is waited on again when its client sends it again (until its own deadline);
one met before is answered from the table, never run twice."""

from __future__ import annotations

from typing import Any

import msgpack

from shmarena.daemon import table
from shmarena.daemon.service import ArenaInfo, Service
from shmarena.protocol import ERR, OK, PROTOCOL_VERSION, Op, decode, encode

MIN = 4096
ARENA = 64 * MIN
T0 = 1000.0


def new_service() -> Service:
    info = ArenaInfo("unit", 77, ARENA, MIN, "", 1, 0.0, grace_s=30.0)
    return Service(info, watch=lambda sid, pid, ticks: False)


class Peer:
    """One client socket: says hello, numbers its sequenced requests."""

    def __init__(self, service: Service, ident: bytes, pid: int) -> None:
        self.ident, self.rid = ident, 0
        reply = self.send(service, encode([int(Op.HELLO), 1 << 62, PROTOCOL_VERSION, pid, 5]), T0)
        assert reply is not None and reply[0] == OK, reply

    def frame(self, op: Op, *args: Any) -> bytes:
        self.rid += 1
        return encode([int(op), self.rid, *args])

    def send(self, service: Service, frame: bytes, now: float) -> list[Any] | None:
        reply = service.handle(self.ident, frame, now)
        return decode(reply) if reply else None


def restart(service: Service, now: float) -> Service:
    """The service a daemon restarted on this table makes (table written as
    a snapshot record, through msgpack, folded and built again)."""
    record = table.snapshot(service.ledger, service.links(), {"clean": False, "mode": "sync"})
    record = msgpack.unpackb(msgpack.packb(record, use_bin_type=True), raw=False,
                             strict_map_key=False)  # fmt: skip
    state = table.State()
    state.apply(record)
    ledger, links = table.build(state, "unit", Service.new_space(service.info)[0], now)
    again = new_service()
    again.adopt(ledger, links, now)
    return again


def outbox(service: Service) -> dict[bytes, list[Any]]:
    return {peer: decode(frame) for peer, frame in service.take_outbox()}


def test_a_kept_lookup_waits_again_after_a_restart_and_is_met() -> None:
    first = new_service()
    waiter, other = Peer(first, b"w", 100), Peer(first, b"o", 200)
    lookup = waiter.frame(Op.LOOKUP, "n", 20.0)
    assert waiter.send(first, lookup, T0) is None  # kept
    second = restart(first, T0 + 1)

    assert waiter.send(second, lookup, T0 + 2) is None  # kept again, not "applied already"
    assert second.waiting == {(1, 1)}
    reply = other.send(second, other.frame(Op.ALLOC, 5000), T0 + 3)
    assert reply is not None and reply[0] == OK
    assert other.send(second, other.frame(Op.PUBLISH, "n", reply[2]), T0 + 3) == [OK, 2, None]
    met = outbox(second)[b"w"]
    assert met[:2] == [OK, 1] and met[2][0] == reply[2], met
    # The answer is kept like any reply: the client's next retry gets the same.
    assert waiter.send(second, lookup, T0 + 4) == met
    assert second.check() == []


def test_a_retry_after_the_deadline_gets_the_requests_own_error() -> None:
    first = new_service()
    waiter = Peer(first, b"w", 100)
    lookup = waiter.frame(Op.LOOKUP, "n", 20.0)
    assert waiter.send(first, lookup, T0) is None
    second = restart(first, T0 + 1)
    # The deadline (T0 + 20) holds across the restart: the wait is not renewed.
    reply = waiter.send(second, lookup, T0 + 25)
    assert reply is not None and reply[:3] == [ERR, 1, "unknown_name"], reply
    assert second.waiting == set()


def test_a_kept_alloc_met_before_the_restart_is_not_carved_twice() -> None:
    first = new_service()
    holder, waiter = Peer(first, b"h", 100), Peer(first, b"w", 200)
    full = holder.send(first, holder.frame(Op.ALLOC, ARENA, "all", True), T0)
    assert full is not None and full[0] == OK
    alloc = waiter.frame(Op.ALLOC, ARENA // 2, None, False, 20.0)
    assert waiter.send(first, alloc, T0) is None  # kept: no room
    assert holder.send(first, holder.frame(Op.RECYCLE, "all"), T0 + 1) is not None
    first.wake(T0 + 1)
    met = outbox(first)[b"w"]
    assert met[:2] == [OK, 1]
    blocks = len(first.ledger.blocks)

    second = restart(first, T0 + 2)
    assert waiter.send(second, alloc, T0 + 3) == met  # from the table, not run again
    assert len(second.ledger.blocks) == blocks
    assert second.check() == []


def test_a_kept_request_still_unmet_stays_in_the_table_until_its_retry() -> None:
    first = new_service()
    waiter = Peer(first, b"w", 100)
    lookup = waiter.frame(Op.LOOKUP, "n", 20.0)
    assert waiter.send(first, lookup, T0) is None
    # Restarted twice before the client sends it again: still waited on.
    third = restart(restart(first, T0 + 1), T0 + 2)
    # A frame of another op under its id is not it: refused, and it stays.
    reply = waiter.send(third, encode([int(Op.OWNER), 1, "x", False, -1]), T0 + 3)
    assert reply is not None and reply[:3] == [ERR, 1, "protocol"], reply
    assert third.link(1).kept == [(1, T0 + 20.0)]
    assert waiter.send(third, lookup, T0 + 3) is None
    assert third.link(1).kept == [(1, T0 + 20.0)]
    assert third.waiting == {(1, 1)}
