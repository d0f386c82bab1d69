"""Named buffers and name events, on the client's side.

`publish` binds a name to a block, `lookup` waits for one and returns it
retained, `subscribe` follows publish and recycle events. The daemon keeps
waiting requests itself (daemon/exchange.py) and answers the moment they can
be met, so nothing here polls: a wait is one request, asked again only after
`MAX_WAIT_S` or when the client's own retry timer fires.

A Subscription uses its Client's session and socket: a thread blocked on
`get` is one request in flight among the client's others, and holds none of
them up (see client/transport.py). It ends with `close()` or with its Client.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, NamedTuple

from shmarena.errors import DaemonUnavailable, QueueEmpty, QueueFull, UnknownName
from shmarena.limits import MAX_WAIT_S
from shmarena.protocol import Handle, Op

if TYPE_CHECKING:
    from shmarena.client.buffer import Buffer
    from shmarena.client.client import Client


class Event(NamedTuple):
    """One change of a name: `kind` is "publish" or "recycle" (the name went,
    with its block or by unpublish); `seq` numbers every event of the arena."""

    seq: int
    kind: str
    name: str
    handle: Handle | None


def request_waiting(client: Client, op: Op, *args: Any, timeout: float | None) -> list[Any]:
    """Send a request the daemon may keep for up to `timeout` seconds (None:
    for ever, asked again after each MAX_WAIT_S). Raises the daemon's refusal
    (UnknownName, QueueEmpty, QueueFull) when the time is up."""
    if timeout is not None and not timeout >= 0:
        raise ValueError(f"timeout must be 0 or more seconds, or None; got {timeout}")
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = MAX_WAIT_S if deadline is None else max(0.0, deadline - time.monotonic())
        wait_s = min(left, MAX_WAIT_S)
        try:
            return client._request(op, *args, wait_s, timeout_s=wait_s + client.timeout_s)
        except (UnknownName, QueueEmpty, QueueFull):
            if deadline is not None and wait_s >= left:
                raise


def publish(client: Client, name: str, target: Buffer | Handle, sealed: bool) -> Handle:
    # A Handle is a tuple (or its wire form, a list); anything else is a Buffer.
    buf: Buffer | None = None
    if isinstance(target, (tuple, list)):
        handle = Handle(*target)
    else:
        buf, handle = target, target.handle
    client._request(Op.PUBLISH, name, list(handle), sealed)
    if sealed and buf is not None:
        buf._seal()
    return handle


def lookup(client: Client, name: str, timeout: float | None) -> Buffer:
    return found(client, request_waiting(client, Op.LOOKUP, name, timeout=timeout))


def found(client: Client, result: list[Any]) -> Buffer:
    """The retained Buffer of a LOOKUP's result."""
    ((wire, sealed),) = result
    buf = client._buffer(list(wire), "retained")
    if sealed:
        buf._seal()
    return buf


class Subscription:
    """Publish and recycle events of names that start with `prefix`, from the
    moment of `subscribe` on, each once and in order.

    Iterate it (blocks for each next event), or `get(timeout)`. If the
    daemon's log of events (65 536 of them) overtook this subscriber, the next
    `get` raises OverflowError saying how many were missed, then goes on.
    """

    def __init__(self, client: Client, prefix: str) -> None:
        self.prefix = prefix
        self._client = client
        self._closed = False
        self._events: deque[Event] = deque()
        _, cursor, _ = client._request(Op.EVENTS, -1, prefix, 0.0)
        self._cursor = int(cursor)

    def get(self, timeout: float | None = None) -> Event:
        """The next event; TimeoutError if none comes within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._events:
            if self._closed:
                raise DaemonUnavailable(
                    f"this subscription to names starting with {self.prefix!r} is closed; "
                    "subscribe again",
                    socket_path=self._client.socket_path,
                )
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.absorb(
                request_waiting(self._client, Op.EVENTS, self._cursor, self.prefix, timeout=left)
            )
            if not self._events and deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"no event for names starting with {self.prefix!r} within {timeout:g} s"
                )
        return self._events.popleft()

    def absorb(self, result: list[Any]) -> None:
        """Queue the events of an EVENTS result (asked for from `cursor`);
        OverflowError if the daemon's log dropped some before they were read."""
        events, cursor, oldest = result
        missed = oldest - self._cursor
        self._cursor = int(cursor)
        for seq, kind, name, wire in events:
            self._events.append(Event(seq, kind, name, Handle(*wire) if wire else None))
        if missed > 0:
            raise OverflowError(
                f"subscriber of {self.prefix!r} fell behind: {missed} events were "
                "dropped from the daemon's log before it read them; it goes on "
                "with the next ones"
            )

    @property
    def cursor(self) -> int:
        """The sequence number of the next event to ask the daemon for."""
        return self._cursor

    def ready(self) -> Event | None:
        """The next event already received, if any (no request)."""
        return self._events.popleft() if self._events else None

    @property
    def closed(self) -> bool:
        return self._closed

    def __iter__(self) -> Subscription:
        return self

    def __next__(self) -> Event:
        return self.get()

    def close(self) -> None:
        """Stop following: a later `get` raises DaemonUnavailable. The daemon
        keeps nothing for a subscriber, so there is nothing to tell it."""
        self._closed = True

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
