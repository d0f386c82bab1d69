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
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from shmarena.daemon.ledger import Block, Ledger
from shmarena.errors import InvalidRequest, NameExists, QueueEmpty, QueueFull, UnknownName
from shmarena.protocol import (
    EVENTS_KEPT,
    MAX_EVENTS_PER_REPLY,
    MAX_NAME,
    MAX_QUEUED,
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


@dataclass(eq=False)
class Queue:
    name: str
    maxsize: int  # 0: unbounded (up to MAX_QUEUED)
    created_at: float
    messages: deque[Message] = field(default_factory=deque)
    users: set[int] = field(default_factory=set)  # sessions that opened it
    puts: int = 0
    gets: int = 0

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


class Exchange:
    def __init__(self, ledger: Ledger, epoch: int) -> None:
        self.epoch = epoch
        self.names: dict[str, Name] = {}
        self.by_block: dict[int, str] = {}  # block address -> its name
        self.log: deque[tuple[int, str, str, list[int] | None]] = deque(maxlen=EVENTS_KEPT)
        self.next_seq = 0
        self.queues: dict[str, Queue] = {}
        self.waiters: list[Waiter] = []
        # (session, request id) -> result items, met since the service last
        # took them (`take_met`), in the order they were met
        self.met: list[tuple[Waiter, list[Any] | Exception]] = []
        self.attach(ledger)

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
        self.names[name] = Name(name, block, block.generation, sealed, session_id, now)
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

    def name_rows(self, prefix: str, now: float) -> list[dict[str, Any]]:
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
            for e in sorted(self.names.values(), key=lambda e: e.name)
            if e.name.startswith(prefix)
        ]

    def _unowned(self, block: Block) -> None:
        name = self.by_block.get(block.offset)
        if name is not None:
            self._forget(self.names[name])

    def _forget(self, entry: Name) -> None:
        del self.names[entry.name]
        del self.by_block[entry.block.offset]
        handle = [self.epoch, *_split(entry.block.offset), entry.block.size, entry.generation]
        self._event("recycle", entry.name, handle)

    # -- events --------------------------------------------------------------

    def _event(self, kind: str, name: str, handle: list[int] | None) -> None:
        self.log.append((self.next_seq, kind, name, handle))
        self.next_seq += 1
        if any(w.op is Op.EVENTS for w in self.waiters):
            self._meet(Op.EVENTS, lambda w: name.startswith(w.args[1]))

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
            queue = self.queues[name] = Queue(name, maxsize, now)
        queue.users.add(session_id)
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
            queue.users.add(session_id)
        return queue

    def put(
        self, session_id: int, name: str, payload: bytes, handles: list[Handle], now: float
    ) -> int | None:
        """The queue's length after the put, or None if it is full."""
        queue = self._queue(session_id, name)
        if len(queue.messages) >= queue.limit:
            return None
        blocks = self.ledger.hold(handles, now)
        queue.messages.append(Message(payload, blocks, [list(h) for h in handles]))
        queue.puts += 1
        self._meet(Op.QGET, lambda w: w.args[0] == name and bool(queue.messages))
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
        self.ledger.pass_holds(taker, message.blocks)
        queue.gets += 1
        self._meet(Op.QPUT, lambda w: w.args[0] == name and len(queue.messages) < queue.limit)
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
            del self.queues[queue.name]

    def _waiting_on(self, name: str) -> bool:
        return any(w.op in (Op.QGET, Op.QPUT) and w.args[0] == name for w in self.waiters)

    def queue_rows(self, now: float) -> list[dict[str, Any]]:
        return [
            {
                "name": q.name,
                "qsize": len(q.messages),
                "maxsize": q.maxsize,
                "held_bytes": sum(b.carved for m in q.messages for b in m.blocks),
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
        self.waiters = [w for w in self.waiters if w.session_id != session_id]
        for queue in list(self.queues.values()):
            if session_id in queue.users:
                queue.users.discard(session_id)
                self._maybe_remove(queue)

    # -- waiting -------------------------------------------------------------

    def wait(self, waiter: Waiter) -> None:
        self.waiters.append(waiter)

    def expire(self, now: float) -> None:
        """Answer the waiters whose time ran out with their refusal."""
        late = [w for w in self.waiters if w.deadline <= now]
        if not late:
            return
        self.waiters = [w for w in self.waiters if w.deadline > now]
        for waiter in late:
            self.met.append((waiter, self.timed_out(waiter, now)))
            queue = self.queues.get(waiter.args[0]) if waiter.op in (Op.QGET, Op.QPUT) else None
            if queue is not None:
                self._maybe_remove(queue)

    def next_deadline(self) -> float | None:
        return min((w.deadline for w in self.waiters), default=None)

    def take_met(self) -> list[tuple[Waiter, list[Any] | Exception]]:
        met, self.met = self.met, []
        return met

    def _meet(self, op: Op, ready: Any) -> None:
        """Meet the waiters of `op` that `ready` accepts, oldest first, while
        the state still allows (each met get takes a message, each put
        fills a slot)."""
        for waiter in [w for w in self.waiters if w.op is op]:
            if waiter not in self.waiters or not ready(waiter):
                continue
            result = self.try_now(waiter)
            if result is not None:
                self.waiters.remove(waiter)
                self.met.append((waiter, result))

    def _wake_lookups(self, name: str, now: float) -> None:
        self._meet(Op.LOOKUP, lambda w: w.args[0] == name)

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
        """What a waiting request gets when its wait is over unmet."""
        args = waiter.args
        if waiter.op is Op.EVENTS:
            oldest = self.log[0][0] if self.log else self.next_seq
            return [[], max(args[0], 0), oldest]
        if waiter.op is Op.LOOKUP:
            return self._unknown(args[0], args[-1])
        if waiter.op is Op.QGET:
            return QueueEmpty(f"queue {args[0]!r} stayed empty for {args[-1]:g} s", queue=args[0])
        return QueueFull(
            f"queue {args[0]!r} stayed full ({self.queues[args[0]].maxsize} messages) "
            f"for {args[-1]:g} s; a consumer must get some first",
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
        for queue in self.queues.values():
            for message in queue.messages:
                for block in message.blocks:
                    if self.ledger.blocks.get(block.offset) is not block:
                        problems.append(f"queue {queue.name!r} holds a block that is gone")
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
