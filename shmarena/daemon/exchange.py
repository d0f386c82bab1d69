"""Named buffers, name events and queues: what processes hand each other. Pure.

The exchange sits beside the ledger and keeps three things:

- *Names*: a name bound to one owned block (`publish`). A sealed name is
  read-only for everyone who looks it up. A name vanishes by itself the moment
  its block leaves its owner (free, recycle, the owner's session ending): the
  ledger tells the exchange through `Ledger.unowned`.
- *Events*: every publish and every vanishing of a name, numbered in order
  and kept in a bounded log, so a subscriber that asks "what came after
  event N" sees each one once and in order (or learns that it fell behind).
- *Queues* (daemon/queues.py): FIFO lists of messages, whose blocks the
  queue holds while they wait.

Requests that cannot be met yet (a lookup of a name not published, a get on
an empty queue, a put on a full one, a subscriber with nothing new) are kept
as *waiters* and met, in arrival order, as soon as the state allows; the
service sends their replies. Nothing here reads a clock or touches a socket:
time comes in as `now`, replies go out through the service.

Waiters are filed by what they wait for (daemon/waiters.py), so a change
meets only the waiters of its key, and stops at the first the state no
longer allows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shmarena.daemon.ledger import Ledger
from shmarena.daemon.queues import Queue, QueueBook
from shmarena.daemon.records import Block
from shmarena.daemon.waiters import Waiter, WaitKey, WaitRoom
from shmarena.errors import (
    InvalidRequest,
    LimitReached,
    NameExists,
    QueueEmpty,
    QueueFull,
    UnknownName,
)
from shmarena.limits import (
    EVENTS_KEPT,
    MAX_EVENTS_PER_REPLY,
    MAX_NAME,
    MAX_NAMES,
    MAX_NAMES_PER_SESSION,
)
from shmarena.protocol import Handle, Op
from shmarena.shm.segments import OFFSET_MASK, SEGMENT_SHIFT

__all__ = ["Exchange", "Name", "Waiter", "check_name"]


@dataclass(eq=False, slots=True)
class Name:
    """A name bound to one owned block, as long as the block keeps its owner."""

    name: str
    block: Block
    generation: int
    sealed: bool
    session_id: int
    created_at: float


class Exchange:
    """Names, name events and queues, and the requests waiting on them."""

    def __init__(self, ledger: Ledger, epoch: int) -> None:
        self.epoch = epoch
        self.names: dict[str, Name] = {}
        self.by_block: dict[int, str] = {}  # block address -> its name
        self.log: deque[tuple[int, str, str, list[int] | None]] = deque(maxlen=EVENTS_KEPT)
        self.next_seq = 0
        self.room = WaitRoom()
        # (session, request id) -> result items, met since the service last
        # took them (`take_met`), in the order they were met
        self.met: list[tuple[Waiter, list[Any] | Exception]] = []
        self.names_by_session: dict[int, int] = {}  # publisher -> names it has now
        # Bounds (shmarena/protocol.py); attributes so the pure tests can try
        # the same code at a smaller bound.
        self.max_names_per_session = MAX_NAMES_PER_SESSION
        self.max_names = MAX_NAMES
        self.book = QueueBook(ledger, self.room, self._meet)
        self.attach(ledger)

    def limits(self) -> dict[str, int]:
        return {
            "names_per_session": self.max_names_per_session,
            "names": self.max_names,
            **self.book.limits(),
        }

    def attach(self, ledger: Ledger) -> None:
        """Follow `ledger` (a new one after a recovery)."""
        self.ledger = ledger
        self.book.ledger = ledger
        ledger.unowned = self._unowned

    # The queues' figures and bounds, as they were read and set here before
    # the queues had a module of their own (service.py and the tests use them).

    @property
    def queues(self) -> dict[str, Queue]:
        return self.book.queues

    @property
    def payload_bytes(self) -> int:
        return self.book.payload_bytes

    @property
    def max_queues_per_session(self) -> int:
        return self.book.max_queues_per_session

    @max_queues_per_session.setter
    def max_queues_per_session(self, bound: int) -> None:
        self.book.max_queues_per_session = bound

    @property
    def max_queues(self) -> int:
        return self.book.max_queues

    @max_queues.setter
    def max_queues(self, bound: int) -> None:
        self.book.max_queues = bound

    @property
    def max_queue_payload_bytes(self) -> int:
        return self.book.max_queue_payload_bytes

    @max_queue_payload_bytes.setter
    def max_queue_payload_bytes(self, bound: int) -> None:
        self.book.max_queue_payload_bytes = bound

    @property
    def max_queued_payload_bytes(self) -> int:
        return self.book.max_queued_payload_bytes

    @max_queued_payload_bytes.setter
    def max_queued_payload_bytes(self, bound: int) -> None:
        self.book.max_queued_payload_bytes = bound

    # -- names ---------------------------------------------------------------

    def publish(self, session_id: int, name: str, handle: Handle, sealed: bool, now: float) -> None:
        check_name("published name", name)
        block = self.ledger.lookup(handle, for_free=True, now=now)
        bound = self.names.get(name)
        if bound is not None:
            same = bound.block is block and bound.generation == block.generation
            raise NameExists(
                f"name {name!r} is published already"
                + (" for this very block" if same else f" ({bound.block.size} bytes)")
                + "; unpublish it first, or pick another name",
                name=name,
            )
        if block.address in self.by_block:
            raise NameExists(
                f"the block at {block.address:#x} is published already as "
                f"{self.by_block[block.address]!r}; a block has one name",
                name=self.by_block[block.address],
            )
        mine = self.names_by_session.get(session_id, 0)
        if mine >= self.max_names_per_session:
            raise LimitReached(
                f"name {name!r} was not published: session {session_id} has {mine} names "
                "published, the most one session may (names_per_session); unpublish the "
                "ones nobody looks up any more, or free their blocks",
                limit="names_per_session",
                value=self.max_names_per_session,
                name=name,
            )
        if len(self.names) >= self.max_names:
            raise LimitReached(
                f"name {name!r} was not published: the arena has {len(self.names)} names, "
                "the most it keeps (names); unpublish names nobody looks up any more "
                "(`shmarena names` lists them)",
                limit="names",
                value=self.max_names,
                name=name,
            )
        self.names[name] = Name(name, block, block.generation, sealed, session_id, now)
        self.names_by_session[session_id] = mine + 1
        self.by_block[block.address] = name
        self._event("publish", name, self._wire(block))
        self._meet((Op.LOOKUP, name), lambda: name in self.names)

    def unpublish(self, name: str) -> None:
        entry = self.names.get(name)
        if entry is None:
            raise self._unknown(name, 0.0)
        self._forget(entry)

    def lookup(self, session_id: int, name: str) -> list[Any] | None:
        """[handle, sealed] with the block retained for the session, or None."""
        entry = self.names.get(name)
        if entry is None:
            return None
        handle = self._wire(entry.block)
        self.ledger.retain(session_id, [Handle(*handle)])
        return [handle, entry.sealed]

    def name_rows(self, entries: list[Name], now: float) -> list[dict[str, Any]]:
        return [
            {
                "name": e.name,
                "handle": self._wire(e.block),
                "sealed": e.sealed,
                "owner": e.block.owner,
                "bytes": e.block.size,
                "session": e.session_id,
                "age_s": round(now - e.created_at, 3),
            }
            for e in entries
        ]

    def _unowned(self, block: Block) -> None:
        name = self.by_block.get(block.address)
        if name is not None:
            self._forget(self.names[name])

    def _forget(self, entry: Name) -> None:
        del self.names[entry.name]
        left = self.names_by_session[entry.session_id] - 1
        if left:
            self.names_by_session[entry.session_id] = left
        else:
            del self.names_by_session[entry.session_id]
        del self.by_block[entry.block.address]
        handle = [self.epoch, *_split(entry.block.address), entry.block.size, entry.generation]
        self._event("recycle", entry.name, handle)

    # -- events --------------------------------------------------------------

    def _event(self, kind: str, name: str, handle: list[int] | None) -> None:
        self.log.append((self.next_seq, kind, name, handle))
        self.next_seq += 1
        if self.room.event_waiters:
            self._meet_events(name)

    def events(self, since: int, prefix: str) -> list[Any] | None:
        """[events numbered `since` or later whose name starts with `prefix`,
        the cursor to ask from next, the oldest number still kept], or None
        when there are none yet. `since` -1: no events, just the cursor."""
        oldest = self.log[0][0] if self.log else self.next_seq
        if since < 0:
            return [[], self.next_seq, oldest]
        found = []
        for index in range(max(0, since - oldest), len(self.log)):
            seq, kind, name, handle = self.log[index]
            if name.startswith(prefix):
                found.append([seq, kind, name, handle])
                if len(found) >= MAX_EVENTS_PER_REPLY:
                    return [found, seq + 1, oldest]
        if not found and since >= oldest:
            return None
        return [found, self.next_seq, oldest]

    # -- queues --------------------------------------------------------------

    def open_queue(self, session_id: int, name: str, maxsize: int, now: float) -> dict[str, Any]:
        check_name("queue name", name)
        return self.book.open(session_id, name, maxsize, now)

    def put(
        self, session_id: int, name: str, payload: bytes, handles: list[Handle], now: float
    ) -> int | None:
        """The queue's length after the put, or None if it is full."""
        return self.book.put(session_id, name, payload, handles, now)

    def get(self, session_id: int, name: str, to_session: int = 0) -> list[Any] | None:
        """[payload, handles] of the oldest message, now held by `to_session`
        (0: the asking session), or None if the queue is empty."""
        return self.book.get(session_id, name, to_session)

    def queue_stat(self, session_id: int, name: str) -> list[int]:
        return self.book.stat(session_id, name)

    def close_queue(self, session_id: int, name: str) -> None:
        self.book.close(session_id, name)

    def queue_rows(self, now: float) -> list[dict[str, Any]]:
        return self.book.rows(now)

    # -- sessions ------------------------------------------------------------

    def end_session(self, session_id: int) -> None:
        """The session is gone: its waiters go, its queues lose a user. (Its
        names stay while their blocks live: detached owners outlive it.)"""
        self.room.drop_session(session_id)
        self.book.end_session(session_id)

    # -- waiting -------------------------------------------------------------

    @property
    def waiters(self) -> list[Waiter]:
        """Every kept waiter, in arrival order (for listings and tests: O(n))."""
        return self.room.listing()

    @property
    def kept_total(self) -> int:
        """How many waiters are kept, all sessions, counting those met but not
        answered yet (a session's end meets queue gets outside any request:
        the service answers them at its next wake, which this makes it do)."""
        return self.room.kept_total + len(self.met)

    @property
    def by_session(self) -> dict[int, dict[int, Waiter]]:
        """The kept waiters of each session, seq -> waiter."""
        return self.room.by_session

    @property
    def deadlines(self) -> list[tuple[float, int, Waiter]]:
        return self.room.deadlines

    def kept(self, session_id: int) -> int:
        """How many waiters the session has kept."""
        return self.room.kept(session_id)

    def wait(self, waiter: Waiter) -> None:
        """Keep `waiter` until it can be met (`try_now`) or its deadline passes."""
        self.room.file(waiter)

    def expire(self, now: float) -> None:
        """Answer the waiters whose time ran out with their refusal."""
        for waiter in self.room.due(now):
            self.met.append((waiter, self.timed_out(waiter, now)))
            queue = self.queues.get(waiter.args[0]) if waiter.op in _QUEUE_WAITS else None
            if queue is not None:
                self.book.maybe_remove(queue)

    def next_deadline(self) -> float | None:
        return self.room.next_deadline()

    def take_met(self) -> list[tuple[Waiter, list[Any] | Exception]]:
        met, self.met = self.met, []
        return met

    def _meet(self, key: WaitKey, ready: Callable[[], bool]) -> None:
        """Meet the waiters of `key` oldest first while `ready()` says the
        state allows (each met get takes a message, each put fills a slot);
        the first that cannot be met ends it, so the others are not looked at."""
        room = self.room
        while ready():
            waiter = room.first(key)
            if waiter is None:
                return
            # Out of the indexes before it runs: meeting it may meet others of
            # the same key (a put that wakes a get), which must not see it.
            room.unfile(waiter)
            result = self.try_now(waiter)
            if result is None:  # not after all: back in its place, first
                room.refile_first(waiter)
                return
            self.met.append((waiter, result))
        room.sweep()

    def _meet_events(self, name: str) -> None:
        """Meet the event waits whose prefix `name` starts with (each bucket
        of a prefix, not every waiter: at most len(name) + 1 lookups)."""
        for prefix in (name[:i] for i in range(len(name) + 1)):
            for waiter in self.room.of_key((Op.EVENTS, prefix)):
                result = self.try_now(waiter)
                if result is not None:
                    self.room.unfile(waiter)
                    self.met.append((waiter, result))
        self.room.sweep()

    def try_now(self, waiter: Waiter) -> list[Any] | Exception | None:
        """The result of a waiting request if it can be met now, else None. A
        refusal that is not about waiting (the block went stale) is returned
        as the exception, to be sent as the reply."""
        args = waiter.args
        try:
            if waiter.op is Op.LOOKUP:
                return self.lookup(waiter.session_id, args[0])
            if waiter.op is Op.EVENTS:
                return self.events(args[0], args[1])
            if waiter.op is Op.QGET:
                return self.get(waiter.session_id, args[0], args[1])
            if waiter.op is Op.QPUT:
                size = self.put(waiter.session_id, args[0], args[1], args[2], waiter.deadline)
                return None if size is None else [size]
            if waiter.op is Op.QTAKE:
                return self.book.take(waiter.session_id, args[0], args[1], args[2])
            if waiter.op is Op.QRESERVE:
                return self.book.reserve(waiter.session_id, args[0], args[1])
        # Whatever goes wrong meeting one request is that request's refusal
        # (the service answers it): it must not end the loop over the others.
        except Exception as error:  # noqa: BLE001
            return error
        raise AssertionError(waiter.op)  # pragma: no cover

    def timed_out(self, waiter: Waiter, now: float) -> list[Any] | Exception:
        """What a waiting request gets when its wait is over unmet. A bug
        while making it is returned too, as this request's answer (the service
        makes it an internal error): it must not end the loop over the others."""
        try:
            return self._timed_out(waiter, now)
        except Exception as error:  # noqa: BLE001 -- one request's answer, see above
            return error

    def _timed_out(self, waiter: Waiter, _now: float) -> list[Any] | Exception:
        args = waiter.args
        if waiter.op is Op.EVENTS:
            oldest = self.log[0][0] if self.log else self.next_seq
            return [[], max(args[0], 0), oldest]
        if waiter.op is Op.LOOKUP:
            return self._unknown(args[0], args[-1])
        if waiter.op in (Op.QGET, Op.QTAKE):
            return QueueEmpty(f"queue {args[0]!r} stayed empty for {args[-1]:g} s", queue=args[0])
        # The queue may be gone already: a put that timed out before this one,
        # in the same turn, was the last thing keeping it.
        queue = self.queues.get(args[0])
        held = f" ({queue.maxsize} messages)" if queue is not None else ""
        return QueueFull(
            f"queue {args[0]!r} stayed full{held} for {args[-1]:g} s; a consumer must get "
            "some first",
            queue=args[0],
        )

    def _unknown(self, name: str, waited_s: float) -> UnknownName:
        waited = f" within {waited_s:g} s" if waited_s else ""
        return UnknownName(
            f"no block is published as {name!r}{waited}; `shmarena names` lists the "
            "names that exist",
            name=name,
        )

    def check(self) -> list[str]:
        """Every invariant of the names, queues and waiters; empty when healthy."""
        problems = []
        for name, entry in self.names.items():
            block = entry.block
            if self.ledger.blocks.get(block.address) is not block or block.owner is None:
                problems.append(f"name {name!r} is bound to a block that is not owned")
            elif block.generation != entry.generation:
                problems.append(f"name {name!r} is bound to an older generation")
        counted = {s: 0 for s in self.names_by_session}
        for entry in self.names.values():
            counted[entry.session_id] = counted.get(entry.session_id, 0) + 1
        if counted != self.names_by_session:
            problems.append("names counted per session disagree with the names")
        return problems + self.book.check() + self.room.check()

    def _wire(self, block: Block) -> list[int]:
        return [self.epoch, *_split(block.address), block.size, block.generation]


_QUEUE_WAITS = (Op.QGET, Op.QPUT, Op.QTAKE, Op.QRESERVE)


def _split(address: int) -> tuple[int, int]:
    return address >> SEGMENT_SHIFT, address & OFFSET_MASK


def check_name(what: str, name: str) -> None:
    """InvalidRequest unless `name` may name a published block or a queue."""
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise InvalidRequest(
            f"{what} must be 1-{MAX_NAME} printable characters, got {name!r:.60}",
            name=name[:MAX_NAME],
        )
