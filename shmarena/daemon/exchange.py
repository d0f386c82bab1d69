"""Named buffers, name events and queues: what processes hand each other. Pure.

The exchange sits beside the ledger and keeps three things:

- *Names*: a name bound to one owned block (`publish`). A sealed name is
  read-only for everyone who looks it up. A name vanishes by itself the moment
  its block leaves its owner (free, recycle, the owner's session ending): the
  ledger tells the exchange through `Ledger.unowned`.
- *Events*: every publish and every vanishing of a name, numbered in order
  and kept in a bounded log, so a subscriber that asks "what came after
  event N" sees each one once and in order (or learns that it fell behind).
- *Queues*: FIFO lists of messages. A message is a small payload (its pickle
  without the large buffers) plus blocks; while queued, the queue holds a
  reference on each block (`Ledger.hold`), so the sender may free or die. The
  session that takes a message gets those references as its retains, so what
  a consumer took is reclaimed when it dies and nothing is ever held by a
  message nobody can reach.

Requests that cannot be met yet (a lookup of a name not published, a get on
an empty queue, a put on a full one, a subscriber with nothing new) are kept
as *waiters* and met, in arrival order, as soon as the state allows; the
service sends their replies. Nothing here reads a clock or touches a socket:
time comes in as `now`, replies go out through the service.

Many waiters may be kept (thousands of parked lookups), so no step scans
them all: each waiter is filed under what it waits for (`WaitKey`: a lookup
under its name, a get or put under its queue, an event wait under its
prefix), in arrival order, and under its session; deadlines sit in one heap
whose entries for waiters met meanwhile are skipped when they come up
(lazy deletion) and swept out when they outnumber the live ones. A change
then meets only the waiters of its key, and stops at the first the state no
longer allows; a turn with nothing due costs a look at the heap's top.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from shmarena.config import format_size
from shmarena.daemon.ledger import Block, Ledger
from shmarena.errors import (
    InvalidRequest,
    LimitReached,
    NameExists,
    QueueEmpty,
    QueueFull,
    UnknownName,
)
from shmarena.protocol import (
    EVENTS_KEPT,
    HANDLE_COST_BYTES,
    MAX_EVENTS_PER_REPLY,
    MAX_NAME,
    MAX_NAMES,
    MAX_NAMES_PER_SESSION,
    MAX_QUEUE_PAYLOAD_BYTES,
    MAX_QUEUED,
    MAX_QUEUED_PAYLOAD_BYTES,
    MAX_QUEUES,
    MAX_QUEUES_PER_SESSION,
    MESSAGE_COST_BYTES,
    Handle,
    Op,
)
from shmarena.shm.segments import OFFSET_MASK, SEGMENT_SHIFT


@dataclass(eq=False, slots=True)
class Name:
    name: str
    block: Block
    generation: int
    sealed: bool
    session_id: int
    created_at: float


@dataclass(eq=False, slots=True)
class Message:
    payload: bytes
    blocks: list[Block]
    handles: list[list[int]]

    @property
    def cost(self) -> int:
        """Bytes of the daemon's heap it is counted for (protocol.py)."""
        return len(self.payload) + MESSAGE_COST_BYTES + HANDLE_COST_BYTES * len(self.handles)


@dataclass(eq=False)
class Queue:
    name: str
    maxsize: int  # 0: unbounded (up to MAX_QUEUED)
    created_at: float
    messages: deque[Message] = field(default_factory=deque)
    users: set[int] = field(default_factory=set)  # sessions that opened it
    puts: int = 0
    gets: int = 0
    payload_bytes: int = 0  # what its messages cost (Message.cost), together

    @property
    def limit(self) -> int:
        return self.maxsize if 0 < self.maxsize < MAX_QUEUED else MAX_QUEUED


@dataclass(eq=False)
class Waiter:
    """A request kept until it can be met or its deadline passes."""

    op: Op
    session_id: int
    request_id: int
    deadline: float
    args: tuple[Any, ...]
    seq: int = 0  # arrival number, given by `Exchange.wait`
    key: WaitKey = (Op.LOOKUP, "")


# What a waiter waits for: (LOOKUP, name), (QGET or QPUT, queue name) or
# (EVENTS, prefix).
WaitKey = tuple[Op, str]


def wait_key(op: Op, args: tuple[Any, ...] | list[Any]) -> WaitKey:
    return (op, args[1]) if op is Op.EVENTS else (op, args[0])


class Exchange:
    def __init__(self, ledger: Ledger, epoch: int) -> None:
        self.epoch = epoch
        self.names: dict[str, Name] = {}
        self.by_block: dict[int, str] = {}  # block address -> its name
        self.log: deque[tuple[int, str, str, list[int] | None]] = deque(maxlen=EVENTS_KEPT)
        self.next_seq = 0
        self.queues: dict[str, Queue] = {}
        # The kept waiters, by what they wait for and by session; in each,
        # seq -> waiter in arrival order (OrderedDict: taking the first is
        # O(1) however many were taken before, as it is not for a dict).
        # `deadlines` is a heap of (deadline, seq, waiter), holding also
        # waiters met since (skipped).
        self.by_key: dict[WaitKey, OrderedDict[int, Waiter]] = {}
        self.by_session: dict[int, dict[int, Waiter]] = {}
        self.deadlines: list[tuple[float, int, Waiter]] = []
        self.kept_total = 0  # waiters kept, all sessions
        self.event_waiters = 0  # of them, EVENTS
        self._next_wait = 1
        # (session, request id) -> result items, met since the service last
        # took them (`take_met`), in the order they were met
        self.met: list[tuple[Waiter, list[Any] | Exception]] = []
        self.names_by_session: dict[int, int] = {}  # publisher -> names it has now
        self.payload_bytes = 0  # Message.cost of every queued message
        # Bounds (shmarena/protocol.py); attributes so the pure tests can try
        # the same code at a smaller bound.
        self.max_names_per_session = MAX_NAMES_PER_SESSION
        self.max_names = MAX_NAMES
        self.max_queues_per_session = MAX_QUEUES_PER_SESSION
        self.max_queues = MAX_QUEUES
        self.max_queue_payload_bytes = MAX_QUEUE_PAYLOAD_BYTES
        self.max_queued_payload_bytes = MAX_QUEUED_PAYLOAD_BYTES
        self.attach(ledger)

    def limits(self) -> dict[str, int]:
        return {
            "names_per_session": self.max_names_per_session,
            "names": self.max_names,
            "queues_per_session": self.max_queues_per_session,
            "queues": self.max_queues,
            "queued_payload_bytes_per_queue": self.max_queue_payload_bytes,
            "queued_payload_bytes": self.max_queued_payload_bytes,
        }

    def attach(self, ledger: Ledger) -> None:
        """Follow `ledger` (a new one after a recovery)."""
        self.ledger = ledger
        ledger.unowned = self._unowned

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
        if block.offset in self.by_block:
            raise NameExists(
                f"the block at {block.offset:#x} is published already as "
                f"{self.by_block[block.offset]!r}; a block has one name",
                name=self.by_block[block.offset],
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
        self.by_block[block.offset] = name
        self._event("publish", name, self._wire(block))
        self._wake_lookups(name, now)

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
        name = self.by_block.get(block.offset)
        if name is not None:
            self._forget(self.names[name])

    def _forget(self, entry: Name) -> None:
        del self.names[entry.name]
        left = self.names_by_session[entry.session_id] - 1
        if left:
            self.names_by_session[entry.session_id] = left
        else:
            del self.names_by_session[entry.session_id]
        del self.by_block[entry.block.offset]
        handle = [self.epoch, *_split(entry.block.offset), entry.block.size, entry.generation]
        self._event("recycle", entry.name, handle)

    # -- events --------------------------------------------------------------

    def _event(self, kind: str, name: str, handle: list[int] | None) -> None:
        self.log.append((self.next_seq, kind, name, handle))
        self.next_seq += 1
        if self.event_waiters:
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
        if maxsize < 0:
            raise InvalidRequest(f"queue {name!r}: maxsize must be 0 or more, got {maxsize}")
        queue = self.queues.get(name)
        if queue is None:
            self._check_join(session_id, name)
            if len(self.queues) >= self.max_queues:
                raise LimitReached(
                    f"queue {name!r} was not opened: the arena has {len(self.queues)} queues, "
                    "the most it keeps (queues); close queues no process uses (a queue "
                    "goes when its last user closes it or ends)",
                    limit="queues",
                    value=self.max_queues,
                    queue=name,
                )
            queue = self.queues[name] = Queue(name, maxsize, now)
        self._join(queue, session_id)
        return {"name": name, "maxsize": queue.maxsize, "qsize": len(queue.messages)}

    def _queue(self, session_id: int, name: str, join: bool = True) -> Queue:
        queue = self.queues.get(name)
        if queue is None:
            raise InvalidRequest(
                f"no queue named {name!r} in this arena (every process that had it open "
                "left it, or it was never opened); open it again",
                queue=name,
            )
        if join:  # a put or get makes the session a user, as an open does
            self._join(queue, session_id)
        return queue

    def _join(self, queue: Queue, session_id: int) -> None:
        if session_id not in queue.users:
            self._check_join(session_id, queue.name)
            queue.users.add(session_id)

    def _check_join(self, session_id: int, name: str) -> None:
        count = sum(session_id in q.users for q in self.queues.values())
        if count >= self.max_queues_per_session:
            raise LimitReached(
                f"queue {name!r} was not opened: session {session_id} has {count} queues "
                "open, the most one session may (queues_per_session); close the queues "
                "it no longer uses",
                limit="queues_per_session",
                value=self.max_queues_per_session,
                queue=name,
            )

    def put(
        self, session_id: int, name: str, payload: bytes, handles: list[Handle], now: float
    ) -> int | None:
        """The queue's length after the put, or None if it is full."""
        queue = self._queue(session_id, name, join=False)
        if session_id not in queue.users:  # a put joins the queue: checked first
            self._check_join(session_id, name)
        if len(queue.messages) >= queue.limit:
            queue.users.add(session_id)
            return None
        cost = len(payload) + MESSAGE_COST_BYTES + HANDLE_COST_BYTES * len(handles)
        self._check_payload(queue, cost)  # a refused put changes nothing
        blocks = self.ledger.hold(handles, now)
        queue.users.add(session_id)
        message = Message(payload, blocks, [list(h) for h in handles])
        queue.messages.append(message)
        queue.payload_bytes += cost
        self.payload_bytes += cost
        queue.puts += 1
        self._meet((Op.QGET, name), lambda: bool(queue.messages))
        return len(queue.messages)

    def get(self, session_id: int, name: str, to_session: int = 0) -> list[Any] | None:
        """[payload, handles] of the oldest message, now held by `to_session`
        (0: the asking session). A process may wait on one connection and keep
        what it took on another, so only a session of the same process may be
        named."""
        queue = self._queue(session_id, name)
        taker = to_session or session_id
        if taker != session_id:
            sessions = self.ledger.sessions
            mine, theirs = sessions[session_id], sessions.get(taker)
            # pids are the kernel's (daemon/service.py, hello); 0 is a process
            # the daemon cannot see, which is nobody's proof of anything
            if theirs is None or theirs.pid != mine.pid or not mine.pid:
                found = "no such session" if theirs is None else f"it is process {theirs.pid}'s"
                raise InvalidRequest(
                    f"queue {name!r}: a get for session {taker} from session {session_id} "
                    f"(process {mine.pid}) was refused: {found}; name a session of your own "
                    "process, or 0 for this one",
                    queue=name,
                )
        if not queue.messages:
            return None
        message = queue.messages.popleft()
        queue.payload_bytes -= message.cost
        self.payload_bytes -= message.cost
        self.ledger.pass_holds(taker, message.blocks)
        queue.gets += 1
        self._meet((Op.QPUT, name), lambda: len(queue.messages) < queue.limit)
        self._maybe_remove(queue)
        return [message.payload, message.handles]

    def queue_stat(self, session_id: int, name: str) -> list[int]:
        queue = self._queue(session_id, name, join=False)
        return [len(queue.messages), queue.maxsize]

    def close_queue(self, session_id: int, name: str) -> None:
        queue = self.queues.get(name)
        if queue is not None:
            queue.users.discard(session_id)
            self._maybe_remove(queue)

    def _maybe_remove(self, queue: Queue) -> None:
        """A queue no process has open any more is forgotten with what it
        still holds, as a `multiprocessing.Queue` dies with its last user:
        nobody could take those messages, so their blocks go back."""
        if not queue.users and not self._waiting_on(queue.name):
            for message in queue.messages:
                self.ledger.drop_holds(message.blocks)
            self.payload_bytes -= queue.payload_bytes
            del self.queues[queue.name]

    def _check_payload(self, queue: Queue, cost: int) -> None:
        """LimitReached if a message costing `cost` bytes does not fit the
        queue's or the daemon's bound on queued in-band bytes."""
        if queue.payload_bytes + cost > self.max_queue_payload_bytes:
            key, bound, held = (
                "queued_payload_bytes_per_queue",
                self.max_queue_payload_bytes,
                queue.payload_bytes,
            )
            where = f"queue {queue.name!r} holds"
        elif self.payload_bytes + cost > self.max_queued_payload_bytes:
            key, bound, held = (
                "queued_payload_bytes",
                self.max_queued_payload_bytes,
                self.payload_bytes,
            )
            where = "the arena's queues hold"
        else:
            return
        raise LimitReached(
            f"put of a {format_size(cost)} message to queue {queue.name!r} refused: {where} "
            f"{format_size(held)} of in-band data, at most {format_size(bound)} ({key}); "
            "get messages out first, or put large data in a block (client.alloc) and send "
            "its handle, which the queue carries without copying",
            limit=key,
            value=bound,
            queue=queue.name,
            queued_bytes=held,
            message_bytes=cost,
        )

    def _waiting_on(self, name: str) -> bool:
        return (Op.QGET, name) in self.by_key or (Op.QPUT, name) in self.by_key

    def queue_rows(self, now: float) -> list[dict[str, Any]]:
        return [
            {
                "name": q.name,
                "qsize": len(q.messages),
                "maxsize": q.maxsize,
                "held_bytes": sum(b.carved for m in q.messages for b in m.blocks),
                "payload_bytes": q.payload_bytes,
                "users": len(q.users),
                "puts": q.puts,
                "gets": q.gets,
                "age_s": round(now - q.created_at, 3),
            }
            for q in self.queues.values()
        ]

    # -- sessions ------------------------------------------------------------

    def end_session(self, session_id: int) -> None:
        """The session is gone: its waiters go, its queues lose a user. (Its
        names stay while their blocks live: detached owners outlive it.)"""
        for waiter in list(self.by_session.get(session_id, {}).values()):
            self._unfile(waiter)
        self._sweep()
        for queue in list(self.queues.values()):
            if session_id in queue.users:
                queue.users.discard(session_id)
                self._maybe_remove(queue)

    # -- waiting -------------------------------------------------------------

    @property
    def waiters(self) -> list[Waiter]:
        """Every kept waiter, in arrival order (for listings and tests: O(n))."""
        found = [w for kept in self.by_key.values() for w in kept.values()]
        return sorted(found, key=lambda w: w.seq)

    def kept(self, session_id: int) -> int:
        """How many waiters the session has kept."""
        return len(self.by_session.get(session_id, ()))

    def wait(self, waiter: Waiter) -> None:
        waiter.seq = self._next_wait
        self._next_wait += 1
        waiter.key = wait_key(waiter.op, waiter.args)
        self.by_key.setdefault(waiter.key, OrderedDict())[waiter.seq] = waiter
        self.by_session.setdefault(waiter.session_id, {})[waiter.seq] = waiter
        heapq.heappush(self.deadlines, (waiter.deadline, waiter.seq, waiter))
        self.kept_total += 1
        if waiter.op is Op.EVENTS:
            self.event_waiters += 1

    def _kept(self, waiter: Waiter) -> bool:
        kept = self.by_key.get(waiter.key)
        return kept is not None and kept.get(waiter.seq) is waiter

    def _unfile(self, waiter: Waiter) -> None:
        """Take a kept waiter out of the indexes (its heap entry stays, dead)."""
        of_key = self.by_key[waiter.key]
        del of_key[waiter.seq]
        if not of_key:
            del self.by_key[waiter.key]
        of_session = self.by_session[waiter.session_id]
        del of_session[waiter.seq]
        if not of_session:
            del self.by_session[waiter.session_id]
        self.kept_total -= 1
        if waiter.op is Op.EVENTS:
            self.event_waiters -= 1

    def _sweep(self) -> None:
        """Drop the heap entries of waiters met or gone once they outnumber
        the kept ones (so a stream of requests met before their deadline
        cannot grow the heap); amortised O(1) per waiter."""
        if len(self.deadlines) > 2 * self.kept_total + 32:
            self.deadlines = [e for e in self.deadlines if self._kept(e[2])]
            heapq.heapify(self.deadlines)

    def expire(self, now: float) -> None:
        """Answer the waiters whose time ran out with their refusal."""
        heap = self.deadlines
        while heap and heap[0][0] <= now:
            waiter = heapq.heappop(heap)[2]
            if not self._kept(waiter):
                continue  # met or gone already
            self._unfile(waiter)
            self.met.append((waiter, self.timed_out(waiter, now)))
            queue = self.queues.get(waiter.args[0]) if waiter.op in (Op.QGET, Op.QPUT) else None
            if queue is not None:
                self._maybe_remove(queue)

    def next_deadline(self) -> float | None:
        heap = self.deadlines
        while heap and not self._kept(heap[0][2]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def take_met(self) -> list[tuple[Waiter, list[Any] | Exception]]:
        met, self.met = self.met, []
        return met

    def _meet(self, key: WaitKey, ready: Any) -> None:
        """Meet the waiters of `key` oldest first while `ready()` says the
        state allows (each met get takes a message, each put fills a slot);
        the first that cannot be met ends it, so the others are not looked at."""
        while ready():
            kept = self.by_key.get(key)
            if not kept:
                return
            waiter = next(iter(kept.values()))
            # Out of the indexes before it runs: meeting it may meet others of
            # the same key (a put that wakes a get), which must not see it.
            self._unfile(waiter)
            result = self.try_now(waiter)
            if result is None:  # not after all: back in its place, first
                self._refile_first(waiter)
                return
            self.met.append((waiter, result))
        self._sweep()

    def _refile_first(self, waiter: Waiter) -> None:
        kept = self.by_key.setdefault(waiter.key, OrderedDict())
        kept[waiter.seq] = waiter
        kept.move_to_end(waiter.seq, last=False)
        self.by_session.setdefault(waiter.session_id, {})[waiter.seq] = waiter
        self.kept_total += 1
        if waiter.op is Op.EVENTS:
            self.event_waiters += 1

    def _meet_events(self, name: str) -> None:
        """Meet the event waits whose prefix `name` starts with (each bucket
        of a prefix, not every waiter: at most len(name) + 1 lookups)."""
        prefixes = (name[:i] for i in range(len(name) + 1))
        for prefix in prefixes:
            kept = self.by_key.get((Op.EVENTS, prefix))
            if not kept:
                continue
            for waiter in list(kept.values()):
                result = self.try_now(waiter)
                if result is not None:
                    self._unfile(waiter)
                    self.met.append((waiter, result))
        self._sweep()

    def _wake_lookups(self, name: str, now: float) -> None:
        self._meet((Op.LOOKUP, name), lambda: name in self.names)

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
        except Exception as error:  # answered as this request's refusal
            return error
        raise AssertionError(waiter.op)  # pragma: no cover

    def timed_out(self, waiter: Waiter, now: float) -> list[Any] | Exception:
        """What a waiting request gets when its wait is over unmet. A bug
        while making it is returned too, as this request's answer (the service
        makes it an internal error): it must not end the loop over the others."""
        try:
            return self._timed_out(waiter, now)
        except Exception as error:
            return error

    def _timed_out(self, waiter: Waiter, now: float) -> list[Any] | Exception:
        args = waiter.args
        if waiter.op is Op.EVENTS:
            oldest = self.log[0][0] if self.log else self.next_seq
            return [[], max(args[0], 0), oldest]
        if waiter.op is Op.LOOKUP:
            return self._unknown(args[0], args[-1])
        if waiter.op is Op.QGET:
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
        problems = []
        for name, entry in self.names.items():
            block = entry.block
            if self.ledger.blocks.get(block.offset) is not block or block.owner is None:
                problems.append(f"name {name!r} is bound to a block that is not owned")
            elif block.generation != entry.generation:
                problems.append(f"name {name!r} is bound to an older generation")
        counted = {s: 0 for s in self.names_by_session}
        for entry in self.names.values():
            counted[entry.session_id] = counted.get(entry.session_id, 0) + 1
        if counted != self.names_by_session:
            problems.append("names counted per session disagree with the names")
        if self.payload_bytes != sum(q.payload_bytes for q in self.queues.values()):
            problems.append("queued payload bytes disagree with the queues'")
        for queue in self.queues.values():
            if queue.payload_bytes != sum(m.cost for m in queue.messages):
                problems.append(f"queue {queue.name!r} payload bytes disagree with its messages")
            for message in queue.messages:
                for block in message.blocks:
                    if self.ledger.blocks.get(block.offset) is not block:
                        problems.append(f"queue {queue.name!r} holds a block that is gone")
        return problems + self._check_waiters()

    def _check_waiters(self) -> list[str]:
        """The waiter indexes agree: each kept waiter is filed under its key
        and its session, once, in arrival order, with a heap entry."""
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

    def _wire(self, block: Block) -> list[int]:
        return [self.epoch, *_split(block.offset), block.size, block.generation]


def _split(address: int) -> tuple[int, int]:
    return address >> SEGMENT_SHIFT, address & OFFSET_MASK


def check_name(what: str, name: str) -> None:
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise InvalidRequest(
            f"{what} must be 1-{MAX_NAME} printable characters, got {name!r:.60}",
            name=name[:MAX_NAME],
        )
