"""A stand-in client for pure tests of `Service.receive`: it numbers its
requests as a real client does and hands back the Outcome; the test plays
the server (it performs, or checks, the effects)."""

from __future__ import annotations

from shmarena.daemon.clock import ManualClock
from shmarena.daemon.effects import Outcome
from shmarena.daemon.service import Service
from shmarena.protocol import FREE_ID_BIT, SEQUENCED_OPS, Op, encode


class Client:
    """Sends requests to `Service.receive` from one peer identity, at the
    clock's time; state-changing requests are numbered 1, 2, ..."""

    def __init__(self, service: Service, clock: ManualClock, ident: bytes) -> None:
        self.service, self.clock, self.ident = service, clock, ident
        self.rid, self.free_rid = 0, FREE_ID_BIT

    def send(self, op: Op, *args: object) -> Outcome:
        if op in SEQUENCED_OPS:
            self.rid += 1
            rid = self.rid
        else:
            self.free_rid += 1
            rid = self.free_rid
        frame = encode([int(op), rid, *args])
        return self.service.receive(self.ident, frame, self.clock.time())
