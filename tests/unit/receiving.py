"""Stand-ins for a client in pure tests of the service (request ids as the
protocol numbers them) and a client of `Service.receive`: it numbers its
requests as a real client does and hands back the Outcome; the test plays
the server (it performs, or checks, the effects)."""

from __future__ import annotations

from shmarena.daemon.clock import ManualClock
from shmarena.daemon.effects import Outcome
from shmarena.daemon.service import Service
from shmarena.protocol import FREE_ID_BIT, SEQUENCED_OPS, Op, encode


class RequestIds:
    """A client's request ids as the protocol numbers them: state-changing
    requests 1, 2, 3 ...; the others outside that sequence (FREE_ID_BIT)."""

    def __init__(self) -> None:
        self.rid = 0
        self.free_rid = FREE_ID_BIT

    def next_id(self, op: Op) -> int:
        if op in SEQUENCED_OPS:
            self.rid += 1
            return self.rid
        self.free_rid += 1
        return self.free_rid


class Client(RequestIds):
    """Sends requests to `Service.receive` from one peer identity, at the
    clock's time."""

    def __init__(self, service: Service, clock: ManualClock, ident: bytes) -> None:
        super().__init__()
        self.service, self.clock, self.ident = service, clock, ident

    def send(self, op: Op, *args: object) -> Outcome:
        frame = encode([int(op), self.next_id(op), *args])
        return self.service.receive(self.ident, frame, self.clock.time())
