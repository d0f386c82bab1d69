"""Handlers that carve and free blocks, and the ALLOCs that wait for room. Pure.

An ALLOC with `wait_s` that does not fit is kept in `AllocQueue`, first come
first served; frees make room and `serve_alloc_waiters` (called from
`Service.wake`) meets the waiting ones in arrival order. An ALLOC, ALLOC_MANY
or FILL that does not fit while other sessions' caches hold the bytes it
needs asks them for their blocks (daemon/pressure.py) and is kept the same
way, for RECLAIM_WAIT_S at most: then it gets the OutOfMemory it would have
had, unchanged.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shmarena.daemon import pressure
from shmarena.daemon.handlers.base import Call, Result
from shmarena.daemon.ledger import Block, check_size
from shmarena.errors import AccessDenied, OutOfMemory, QuotaExceeded, ShmArenaError, StaleHandle
from shmarena.limits import MAX_KEPT_PER_SESSION
from shmarena.protocol import Handle, Op, Request
from shmarena.shm.segments import SEGMENT_SHIFT

if TYPE_CHECKING:
    from shmarena.daemon.service import Service


@dataclass(eq=False, slots=True)
class AllocWaiter:
    """An ALLOC kept until frees make room for it or `deadline` passes; or an
    ALLOC, ALLOC_MANY or FILL kept while other caches are asked for room
    (`reclaim`: its refusal is the one it had, unchanged)."""

    session_id: int
    request_id: int
    args: tuple[Any, ...]
    since: float
    deadline: float
    seq: int = 0
    op: Op = Op.ALLOC
    reclaim: bool = False


class AllocQueue:
    """The ALLOCs waiting for room: seq -> waiter in arrival order
    (OrderedDict: the first is found in O(1)); how many each session has;
    their deadlines as a heap of (deadline, seq), entries of ones answered
    since skipped when they come up (as the exchange's waiters)."""

    def __init__(self) -> None:
        self.waiters: OrderedDict[int, AllocWaiter] = OrderedDict()
        self.kept: dict[int, int] = {}
        self.deadlines: list[tuple[float, int]] = []
        self._next_seq = 1

    def add(self, waiter: AllocWaiter) -> None:
        """Keep `waiter`, behind the ones kept before it."""
        waiter.seq = self._next_seq
        self._next_seq += 1
        self.waiters[waiter.seq] = waiter
        self.kept[waiter.session_id] = self.kept.get(waiter.session_id, 0) + 1
        heapq.heappush(self.deadlines, (waiter.deadline, waiter.seq))

    def forget(self, waiter: AllocWaiter) -> None:
        """`waiter` is answered."""
        del self.waiters[waiter.seq]
        left = self.kept[waiter.session_id] - 1
        if left:
            self.kept[waiter.session_id] = left
        else:
            del self.kept[waiter.session_id]

    def end_session(self, session_id: int) -> list[int]:
        """Drop a session's waiters; their request ids."""
        if not self.kept.pop(session_id, 0):
            return []
        gone = [w for w in self.waiters.values() if w.session_id == session_id]
        for waiter in gone:
            del self.waiters[waiter.seq]
        return [w.request_id for w in gone]

    def next_deadline(self) -> float | None:
        """The earliest deadline of a waiting ALLOC (None: none waits)."""
        heap = self.deadlines
        while heap and heap[0][1] not in self.waiters:
            heapq.heappop(heap)  # answered already
        return heap[0][0] if heap else None

    def due(self, now: float) -> AllocWaiter | None:
        """The next waiter whose time ran out by `now`, or None."""
        heap = self.deadlines
        while heap and heap[0][0] <= now:
            waiter = self.waiters.get(heapq.heappop(heap)[1])
            if waiter is not None:
                return waiter
        return None

    def compact(self) -> None:
        """Drop the heap entries of answered waiters once they are many."""
        if len(self.deadlines) > 2 * len(self.waiters) + 32:
            self.deadlines = [e for e in self.deadlines if e[1] in self.waiters]
            heapq.heapify(self.deadlines)

    def check(self) -> list[str]:
        """The counts, the order and the heap against the waiters."""
        problems = []
        counts: dict[int, int] = {}
        for waiter in self.waiters.values():
            counts[waiter.session_id] = counts.get(waiter.session_id, 0) + 1
        if counts != self.kept or list(self.waiters) != sorted(self.waiters):
            problems.append("waiting allocations are miscounted or out of arrival order")
        if not self.waiters.keys() <= {seq for _, seq in self.deadlines}:
            problems.append("a waiting allocation has no deadline in the heap")
        return problems


def wire(svc: Service, block: Block) -> list[int]:
    """A block as a handle on the wire: epoch, segment, offset, size, generation."""
    address = block.address
    return [
        svc.info.epoch,
        address >> SEGMENT_SHIFT,
        address & ((1 << SEGMENT_SHIFT) - 1),
        block.size,
        block.generation,
    ]


def _alloc_now(c: Call) -> Block | None:
    """The block for an ALLOC now, or None when it is to wait for room."""
    size, owner, detached, wait_s, site = c.args
    svc = c.svc
    if wait_s > 0 and svc.alloc_queue.waiters:
        # Others wait already: behind them, unless waiting cannot help
        # (a bad size, a quota, a size the arena can never hold).
        check_size(size)
        svc.ledger.check_quotas(c.session, [size], owner, detached)
        never = svc.ledger.never_fits(size)
        if never is not None:
            raise never
        return None
    try:
        return svc.ledger.alloc(c.session, size, owner, detached, c.now, site)
    except QuotaExceeded:
        raise  # a policy, not a lack of room: waiting would not help
    except OutOfMemory as error:
        if wait_s <= 0 or error.details.get("state") == "too_large":
            raise
        return None


def _keep_for_reclaim(c: Call, error: OutOfMemory, wanted: int) -> Result:
    """Keep an allocation that does not fit while other caches are asked
    for their blocks (see the module's docstring); else raise its `error`."""
    svc = c.svc
    if (
        isinstance(error, QuotaExceeded)
        or error.details.get("state") == "too_large"
        or svc.kept_requests(c.session) >= MAX_KEPT_PER_SESSION
        or not pressure.reclaim(svc, c.session, wanted, c.now)
    ):
        raise error
    request = c.request
    deadline = c.now + pressure.RECLAIM_WAIT_S
    waiter = AllocWaiter(c.session, request.request_id, c.args, c.now, deadline)
    waiter.op, waiter.reclaim = request.op, True
    svc.alloc_queue.add(waiter)
    if request.op is Op.ALLOC:
        svc.admission.wait_kept(c.session, Op.ALLOC, request.request_id, deadline)
    else:  # not a waiting op: a table does not keep it across a restart
        svc.admission.waiting.add((c.session, request.request_id))
    return None


def alloc(c: Call) -> Result:
    """ALLOC: one block, or kept until there is room (`wait_s`)."""
    svc = c.svc
    if (c.session, c.request.request_id) in svc.admission.waiting:
        return None  # a retry of one that waits already
    try:
        block = _alloc_now(c)
    except OutOfMemory as error:
        return _keep_for_reclaim(c, error, c.args[0])
    if block is None:
        pressure.reclaim(svc, c.session, c.args[0], c.now)
        svc.may_keep(c.session, c.request)
        deadline = c.now + c.args[3]
        svc.alloc_queue.add(AllocWaiter(c.session, c.request.request_id, c.args, c.now, deadline))
        svc.admission.wait_kept(c.session, Op.ALLOC, c.request.request_id, deadline)
        svc.counters.alloc_waits += 1
        return None
    svc.counters.allocs += 1
    pressure.watermark(svc, c.now)
    return (wire(svc, block),)


def _alloc_many_now(c: Call) -> tuple[Any, ...]:
    sizes, owner, detached, site = c.args
    blocks = c.svc.ledger.alloc_many(c.session, sizes, owner, detached, c.now, site)
    c.svc.counters.allocs += len(blocks)
    return ([wire(c.svc, b) for b in blocks],)


def alloc_many(c: Call) -> Result:
    """ALLOC_MANY: all the blocks or none."""
    if (c.session, c.request.request_id) in c.svc.admission.waiting:
        return None  # a retry of one kept while caches are asked
    try:
        result = _alloc_many_now(c)
    except OutOfMemory as error:
        return _keep_for_reclaim(c, error, sum(c.args[0]))
    pressure.watermark(c.svc, c.now)
    return result


def free(c: Call) -> Result:
    """FREE: give blocks back; (blocks, bytes) freed."""
    handles: list[Handle] = c.args[0]
    freed = c.svc.ledger.free(handles, c.now, c.session)
    c.svc.counters.frees += freed.blocks
    return ([freed.blocks, freed.bytes],)


def _fill_now(c: Call) -> tuple[Any, ...]:
    fills, mark, sizes, owner, detached = c.args
    svc = c.svc
    taken, direct = svc.ledger.fill(c.session, fills, mark, sizes, owner, detached, c.now)
    svc.counters.fills += 1
    svc.counters.filled_blocks += sum(map(len, taken))
    svc.counters.allocs += len(direct)
    return (taken, [wire(svc, b) for b in direct], svc.ledger.take_notices(c.session))


def fill(c: Call) -> Result:
    """FILL: refill a client cache's size classes (and carve direct sizes)."""
    if (c.session, c.request.request_id) in c.svc.admission.waiting:
        return None  # a retry of one kept while caches are asked
    try:
        result = _fill_now(c)
    except OutOfMemory as error:
        fills, sizes = c.args[0], c.args[2]
        needed = sum(fills[i] * fills[i + 2] for i in range(0, len(fills) - 2, 3))
        return _keep_for_reclaim(c, error, needed + sum(sizes))
    pressure.watermark(c.svc, c.now)
    return result


def post(c: Call) -> Result:
    """POST (one-way): a client cache's batched frees and hand-outs."""
    events = c.args[0]
    svc = c.svc
    svc.counters.posts += 1
    svc.counters.events += len(events)
    refused = svc.ledger.apply_events(c.session, events, c.now)
    if not refused:
        return ()
    problems = [str(error) for error in refused]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    # Refused by the access model: said as such, not as a stale handle.
    kind = AccessDenied if isinstance(refused[0], AccessDenied) else StaleHandle
    raise kind(
        f"{len(problems)} of {len(events)} frees or hand-outs this client sent without "
        f"waiting were refused: {problems[0]}{more}",
        **{**refused[0].details, "problems": problems[:20]},
    )


def sync(c: Call) -> Result:
    """SYNC: the notices waiting for this session, and how many notices went
    to its push socket (daemon/pressure.py) so far."""
    return (c.svc.ledger.take_notices(c.session), pressure.pushed_notices(c.svc, c.session))


def retain(c: Call) -> Result:
    """RETAIN: hold blocks beyond their owner."""
    return (c.svc.ledger.retain(c.session, c.args[0], c.now),)


def release(c: Call) -> Result:
    """RELEASE: let retained blocks go."""
    return (c.svc.ledger.release(c.session, c.args[0]),)


def _try_alloc(svc: Service, waiter: AllocWaiter, now: float) -> tuple[Any, ...]:
    """The reply values of a waiting allocation; a bug on the way is this
    waiter's InternalError (a ShmArenaError: answered like any refusal)."""
    try:
        if "wake" in svc.faults:
            raise RuntimeError("fault injected by --debug-fail wake")
        if waiter.op is not Op.ALLOC:
            request = Request(waiter.op, waiter.request_id, waiter.args)
            call = Call(svc, waiter.session_id, request, now)
            return _fill_now(call) if waiter.op is Op.FILL else _alloc_many_now(call)
        size, owner, detached, _, site = waiter.args
        block = svc.ledger.alloc(waiter.session_id, size, owner, detached, now, site)
        svc.counters.allocs += 1
        return (wire(svc, block),)
    except ShmArenaError:
        raise
    except Exception as error:  # noqa: BLE001 - a bug of ours: this waiter's internal error
        raise svc.internal_error("a waiting alloc", error, waiter.session_id, now) from None


def _answer(
    svc: Service, waiter: AllocWaiter, answer: tuple[Any, ...] | ShmArenaError, now: float
) -> None:
    svc.alloc_queue.forget(waiter)
    svc.counters.alloc_waited_s += now - waiter.since
    svc.answer_kept(waiter.session_id, waiter.request_id, waiter.op, answer)


def _timed_out(svc: Service, waiter: AllocWaiter, now: float) -> None:
    """A waiter whose time ran out: room may have come this very turn."""
    try:
        block: tuple[Any, ...] | ShmArenaError = _try_alloc(svc, waiter, now)
    except OutOfMemory as error:
        if not isinstance(error, QuotaExceeded) and not waiter.reclaim:
            svc.counters.alloc_wait_timeouts += 1
            error.message = f"{error.message}; waited {now - waiter.since:.3g} s for room"
            error.args = (error.message,)
            error.details["waited_s"] = round(now - waiter.since, 3)
        block = error
    except ShmArenaError as error:
        block = error
    _answer(svc, waiter, block, now)


def serve_alloc_waiters(svc: Service, now: float) -> None:
    """Meet waiting ALLOCs in arrival order: the first that does not fit
    yet holds the others back (a large request is not starved by a stream
    of small ones); any whose time ran out gets its out_of_memory, and
    one that meets a quota gets that at once (waiting for room would not
    help it). Only the first is tried while it does not fit; one kept for a
    reclaim gets its refusal once every asked session answered."""
    queue = svc.alloc_queue
    while (waiter := queue.due(now)) is not None:
        _timed_out(svc, waiter, now)
    while queue.waiters:
        waiter = next(iter(queue.waiters.values()))
        try:
            block: tuple[Any, ...] | ShmArenaError = _try_alloc(svc, waiter, now)
        except QuotaExceeded as error:  # a policy: answered at once, not kept
            block = error
        except OutOfMemory as error:
            if not waiter.reclaim or not pressure.all_answered(svc, now):
                break  # no room yet: it holds the others back
            block = error  # nobody has more to give
        except ShmArenaError as error:  # the owner went meanwhile, say
            block = error
        _answer(svc, waiter, block, now)
    queue.compact()
