"""The requests kept until they can be met: filed so that no step scans them all. Pure.

Many waiters may be kept (thousands of parked lookups). Each is filed under
what it waits for (`WaitKey`: a lookup under its name, a get or put under its
queue, an event wait under its prefix), in arrival order, and under its
session; deadlines sit in one heap whose entries for waiters met meanwhile
are skipped when they come up (lazy deletion) and swept out when they
outnumber the live ones. A change then looks only at the waiters of its key,
and a turn with nothing due costs a look at the heap's top.

This module only files; what meets a waiter is the exchange's
(daemon/exchange.py).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from shmarena.protocol import Op

# What a waiter waits for: (LOOKUP, name), (QGET or QPUT, queue name) or
# (EVENTS, prefix).
WaitKey = tuple[Op, str]


@dataclass(eq=False)
class Waiter:
    """A request kept until it can be met or its deadline passes."""

    op: Op
    session_id: int
    request_id: int
    deadline: float
    args: tuple[Any, ...]
    seq: int = 0  # arrival number, given by `WaitRoom.file`
    key: WaitKey = (Op.LOOKUP, "")


def wait_key(op: Op, args: tuple[Any, ...] | list[Any]) -> WaitKey:
    """What a request of `op` with `args` waits for."""
    return (op, args[1]) if op is Op.EVENTS else (op, args[0])


class WaitRoom:
    """The kept waiters, by what they wait for and by session, with their deadlines."""

    def __init__(self) -> None:
        # In each index, seq -> waiter in arrival order (OrderedDict: taking
        # the first is O(1) however many were taken before, as it is not for
        # a dict). `deadlines` is a heap of (deadline, seq, waiter), holding
        # also waiters met since (skipped).
        self.by_key: dict[WaitKey, OrderedDict[int, Waiter]] = {}
        self.by_session: dict[int, dict[int, Waiter]] = {}
        self.deadlines: list[tuple[float, int, Waiter]] = []
        self.kept_total = 0  # waiters kept, all sessions
        self.event_waiters = 0  # of them, EVENTS
        self._next_seq = 1

    def listing(self) -> list[Waiter]:
        """Every kept waiter, in arrival order (for listings and tests: O(n))."""
        found = [w for kept in self.by_key.values() for w in kept.values()]
        return sorted(found, key=lambda w: w.seq)

    def kept(self, session_id: int) -> int:
        """How many waiters the session has kept."""
        return len(self.by_session.get(session_id, ()))

    def file(self, waiter: Waiter) -> None:
        """Keep `waiter`, numbered after every waiter kept before it."""
        waiter.seq = self._next_seq
        self._next_seq += 1
        waiter.key = wait_key(waiter.op, waiter.args)
        self.by_key.setdefault(waiter.key, OrderedDict())[waiter.seq] = waiter
        self.by_session.setdefault(waiter.session_id, {})[waiter.seq] = waiter
        heapq.heappush(self.deadlines, (waiter.deadline, waiter.seq, waiter))
        self._count(waiter, 1)

    def _count(self, waiter: Waiter, step: int) -> None:
        self.kept_total += step
        if waiter.op is Op.EVENTS:
            self.event_waiters += step

    def is_kept(self, waiter: Waiter) -> bool:
        kept = self.by_key.get(waiter.key)
        return kept is not None and kept.get(waiter.seq) is waiter

    def unfile(self, waiter: Waiter) -> None:
        """Take a kept waiter out of the indexes (its heap entry stays, dead)."""
        of_key = self.by_key[waiter.key]
        del of_key[waiter.seq]
        if not of_key:
            del self.by_key[waiter.key]
        of_session = self.by_session[waiter.session_id]
        del of_session[waiter.seq]
        if not of_session:
            del self.by_session[waiter.session_id]
        self._count(waiter, -1)

    def refile_first(self, waiter: Waiter) -> None:
        """Put back a waiter just unfiled, first of its key (it keeps its place)."""
        kept = self.by_key.setdefault(waiter.key, OrderedDict())
        kept[waiter.seq] = waiter
        kept.move_to_end(waiter.seq, last=False)
        self.by_session.setdefault(waiter.session_id, {})[waiter.seq] = waiter
        self._count(waiter, 1)

    def first(self, key: WaitKey) -> Waiter | None:
        """The oldest waiter of `key`, if any."""
        kept = self.by_key.get(key)
        return next(iter(kept.values())) if kept else None

    def of_key(self, key: WaitKey) -> list[Waiter]:
        """The waiters of `key`, oldest first (a copy: meeting them unfiles them)."""
        return list(self.by_key.get(key, {}).values())

    def waiting_on(self, *keys: WaitKey) -> bool:
        return any(key in self.by_key for key in keys)

    def drop_session(self, session_id: int) -> None:
        """The session is gone: so are its waiters."""
        for waiter in list(self.by_session.get(session_id, {}).values()):
            self.unfile(waiter)
        self.sweep()

    def sweep(self) -> None:
        """Drop the heap entries of waiters met or gone once they outnumber
        the kept ones (so a stream of requests met before their deadline
        cannot grow the heap); amortised O(1) per waiter."""
        if len(self.deadlines) > 2 * self.kept_total + 32:
            self.deadlines = [e for e in self.deadlines if self.is_kept(e[2])]
            heapq.heapify(self.deadlines)

    def due(self, now: float) -> Iterator[Waiter]:
        """The kept waiters whose deadline is `now` or earlier, each unfiled
        just before it is yielded (what the caller does with one may change
        what the next one is told)."""
        heap = self.deadlines
        while heap and heap[0][0] <= now:
            waiter = heapq.heappop(heap)[2]
            if not self.is_kept(waiter):
                continue  # met or gone already
            self.unfile(waiter)
            yield waiter

    def next_deadline(self) -> float | None:
        heap = self.deadlines
        while heap and not self.is_kept(heap[0][2]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def check(self) -> list[str]:
        """The indexes agree: each kept waiter is filed under its key and its
        session, once, in arrival order, with a heap entry."""
        problems = []
        by_key = {w.seq: w for kept in self.by_key.values() for w in kept.values()}
        by_session = {w.seq: w for kept in self.by_session.values() for w in kept.values()}
        if by_key.keys() != by_session.keys() or len(by_key) != self.kept_total:
            problems.append(
                f"waiter indexes disagree: {len(by_key)} by what they wait for, "
                f"{len(by_session)} by session, {self.kept_total} counted"
            )
        for key, kept in self.by_key.items():
            if not kept or any(w.key != key for w in kept.values()) or list(kept) != sorted(kept):
                problems.append(f"waiters of {key[0].name} {key[1]!r} are misfiled")
        for session_id, mine in self.by_session.items():
            if not mine or any(w.session_id != session_id for w in mine.values()):
                problems.append(f"waiters of session {session_id} are misfiled")
        in_heap = {e[1] for e in self.deadlines}
        if not by_key.keys() <= in_heap:
            problems.append("a kept waiter has no deadline in the heap")
        events = sum(1 for w in by_key.values() if w.op is Op.EVENTS)
        if events != self.event_waiters:
            problems.append(f"{events} event waiters kept, {self.event_waiters} counted")
        return problems
