"""Replies on their way out: the ROUTER send, the per-client backlog when a
client's pipe is full, and the debug fault injection. I/O; decides nothing.

A client that does not read its replies fills its pipe: the send then fails
at once (ROUTER_MANDATORY, NOBLOCK) instead of queueing without end, and the
reply waits here in `backlog`, in order, up to MAX_QUEUED_REPLY_BYTES per
client; past that it is dropped (counted, and logged once per episode).
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from shmarena.daemon.clock import Clock
from shmarena.daemon.logs import EventLog
from shmarena.limits import MAX_BUFFERED_REPLIES, MAX_QUEUED_REPLY_BYTES
from shmarena.protocol import LATE_ERR

# Plain ints for the per-reply sends (zmq's flags are enums: `|` on them runs
# Python code).
NOBLOCK = int(zmq.NOBLOCK)
MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)


class Outbound:
    """Sends replies to peers (see the module's docstring)."""

    def __init__(
        self,
        router: zmq.Socket[Any],
        log: EventLog,
        session_of: Callable[[bytes], int | None],
        clock: Clock,
    ) -> None:
        self.router = router
        self.log = log
        self.session_of = session_of  # for the log lines: which session a peer is
        self.clock = clock
        # Replies whose client's pipe was full (MAX_BUFFERED_REPLIES), in
        # order, per routing id, with their bytes (MAX_QUEUED_REPLY_BYTES).
        self.backlog: dict[bytes, deque[bytes]] = {}
        self.backlog_bytes: dict[bytes, int] = {}
        # Clients whose replies are being dropped because they do not read
        # them: routing id -> replies dropped since it stopped reading.
        self.not_reading: dict[bytes, int] = {}
        self.dropped_unread = 0  # their pipe and queue were full
        self.undeliverable = 0  # their client was gone
        self.sends = 0  # sends tried on the router (the loop knows whether it was touched)
        # --debug-drop-replies / --debug-delay-ms (0: off)
        self.drop_fraction = 0.0
        self.delay_ms = 0.0
        self._debugging = False
        self._debug = random.Random()
        self._held: list[tuple[float, int, bytes, bytes]] = []  # delayed replies (debug)

    def debug(self, drop_fraction: float, delay_ms: float, seed: int | None) -> None:
        """Drop this fraction of replies (never late errors) and hold each
        back by up to `delay_ms`: fault injection for tests."""
        self.drop_fraction, self.delay_ms = drop_fraction, delay_ms
        self._debugging = drop_fraction > 0 or delay_ms > 0
        self._debug = random.Random(seed)

    @property
    def debugging(self) -> bool:
        """Whether replies are dropped or delayed on purpose."""
        return self._debugging

    def send(self, peer: bytes, reply: bytes) -> None:
        """Send `reply` to `peer` now, or queue it behind that peer's others."""
        self.sends += 1
        if self._debugging:  # (an attribute: a property costs a call per reply)
            self._debug_send(peer, reply)
            return
        if self.backlog and peer in self.backlog:  # after the replies waiting for it
            self._queue(peer, reply)
            return
        try:
            # Two frames, as send_multipart sends them without its per-frame
            # checks. A ROUTER takes or refuses the message at its first frame
            # (the routing id): full pipe (Again) or gone peer (ROUTER_MANDATORY).
            self.router.send(peer, MORE_NOBLOCK)
            self.router.send(reply, NOBLOCK)
        except zmq.Again:  # its pipe is full
            self._queue(peer, reply)
        except zmq.ZMQError:  # never fatal: the peer is gone
            self.undeliverable += 1

    def wait_ms(self, wait_ms: int) -> int:
        """How long the loop may poll before replies waiting here must move."""
        if self._held:
            self._send_held()
            if self._held:
                due_ms = int((self._held[0][0] - self.clock.monotonic()) * 1000)
                wait_ms = min(wait_ms, max(0, due_ms))
        if self.backlog:  # soon again while it moves, else now and then
            wait_ms = min(wait_ms, 1 if self._send_backlog() else 20)
        return wait_ms

    def stats(self) -> dict[str, int]:
        """The figures of `stats()["replies"]`."""
        return {
            "queued_bytes": sum(self.backlog_bytes.values()),
            "clients_behind": len(self.backlog),
            "clients_not_reading": len(self.not_reading),
            "dropped_unread": self.dropped_unread,
            "undeliverable": self.undeliverable,
        }

    def _debug_send(self, peer: bytes, reply: bytes) -> None:
        """Send a reply the way --debug-drop-replies/--debug-delay-ms say:
        maybe not at all (late errors always go), maybe later."""
        rng = self._debug
        late_error = len(reply) > 1 and reply[1] == LATE_ERR
        if not late_error and rng.random() < self.drop_fraction:
            return
        due = self.clock.monotonic() + rng.random() * self.delay_ms / 1000
        heapq.heappush(self._held, (due, rng.getrandbits(32), peer, reply))
        self._send_held()

    def _send_held(self) -> None:
        now = self.clock.monotonic()
        while self._held and self._held[0][0] <= now:
            _, _, peer, reply = heapq.heappop(self._held)
            self.sends += 1
            try:
                self.router.send_multipart([peer, reply], zmq.NOBLOCK)
            except zmq.ZMQError:  # debug only: a full pipe or a gone client drops it
                self.undeliverable += 1

    def _queue(self, peer: bytes, reply: bytes) -> None:
        """Keep a reply whose client's pipe is full, in order behind the others;
        drop it (counted, and logged once) when the queue holds its bytes' worth."""
        queue = self.backlog.get(peer)
        if queue is None:
            queue = self.backlog[peer] = deque()
            self.backlog_bytes[peer] = 0
        queued = self.backlog_bytes[peer]
        if queue and queued + len(reply) > MAX_QUEUED_REPLY_BYTES:
            self.dropped_unread += 1
            dropped = self.not_reading.get(peer)
            self.not_reading[peer] = (dropped or 0) + 1
            if dropped is None:
                session = self.session_of(peer) or 0
                self.log(
                    f"client session {session} does not read its replies: "
                    f"{MAX_BUFFERED_REPLIES} and {queued} bytes more wait for it; further "
                    "replies to it are dropped until it reads",
                    "replies_dropped",
                    "warning",
                    session=session,
                    buffered=MAX_BUFFERED_REPLIES,
                    queued_bytes=queued,
                )
            return
        queue.append(reply)
        self.backlog_bytes[peer] = queued + len(reply)

    def _send_backlog(self) -> bool:
        """Send what waits for each client while its pipe takes it; whether
        anything was sent. A client gone meanwhile takes its queue with it."""
        send_multipart, NOBLOCK = self.router.send_multipart, zmq.NOBLOCK
        moved = False
        for peer, queue in list(self.backlog.items()):
            try:
                while queue:
                    self.sends += 1
                    send_multipart((peer, queue[0]), NOBLOCK)
                    self.backlog_bytes[peer] -= len(queue.popleft())
                    moved = True
            except zmq.Again:
                continue  # still full
            except zmq.ZMQError:  # gone
                self.undeliverable += len(queue)
                del self.backlog[peer], self.backlog_bytes[peer]
                self.not_reading.pop(peer, None)
                continue
            del self.backlog[peer], self.backlog_bytes[peer]
            dropped = self.not_reading.pop(peer, None)
            if dropped is not None:
                session = self.session_of(peer) or 0
                self.log(
                    f"client session {session} reads its replies again; {dropped} were dropped",
                    "replies_read_again",
                    session=session,
                    dropped=dropped,
                )
        return moved
