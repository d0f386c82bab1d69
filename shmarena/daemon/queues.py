"""Queues: FIFO lists of messages that processes hand each other. Pure.

A message is a small payload (its pickle without the large buffers) plus
blocks; while queued, the queue holds a reference on each block
(`Ledger.hold`), so the sender may free or die. The session that takes a
message gets those references as its retains, so what a consumer took is
reclaimed when it dies and nothing is ever held by a message nobody can
reach: a queue no process has open any more goes, with what it still holds.

A get on an empty queue or a put on a full one is kept as a waiter
(daemon/waiters.py); each put and get here asks the exchange to meet the
waiters it may have made ready (`meet`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shmarena.config import format_size
from shmarena.daemon.records import Block
from shmarena.daemon.waiters import WaitKey, WaitRoom
from shmarena.errors import InvalidRequest, LimitReached
from shmarena.protocol import (
    HANDLE_COST_BYTES,
    MAX_QUEUE_PAYLOAD_BYTES,
    MAX_QUEUED,
    MAX_QUEUED_PAYLOAD_BYTES,
    MAX_QUEUES,
    MAX_QUEUES_PER_SESSION,
    MESSAGE_COST_BYTES,
    Handle,
    Op,
)

if TYPE_CHECKING:
    from shmarena.daemon.ledger import Ledger

# Meet the waiters of a key, oldest first, while the state allows (Exchange._meet).
Meet = Callable[[WaitKey, Callable[[], bool]], None]


@dataclass(eq=False, slots=True)
class Message:
    """One queued message: its in-band payload and the blocks it carries."""

    payload: bytes
    blocks: list[Block]
    handles: list[list[int]]

    @property
    def cost(self) -> int:
        """Bytes of the daemon's heap it is counted for (protocol.py)."""
        return message_cost(self.payload, len(self.handles))


def message_cost(payload: bytes, handles: int) -> int:
    """Bytes of the daemon's heap a message of `payload` and `handles` costs."""
    return len(payload) + MESSAGE_COST_BYTES + HANDLE_COST_BYTES * handles


@dataclass(eq=False)
class Queue:
    """A named FIFO of messages, open in the sessions that use it."""

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


class QueueBook:
    """The arena's queues and their bounds: open, put, get, close."""

    def __init__(self, ledger: Ledger, room: WaitRoom, meet: Meet) -> None:
        self.ledger = ledger
        self.room = room
        self.meet = meet
        self.queues: dict[str, Queue] = {}
        self.payload_bytes = 0  # Message.cost of every queued message
        # Bounds (shmarena/protocol.py); attributes so the pure tests can try
        # the same code at a smaller bound.
        self.max_queues_per_session = MAX_QUEUES_PER_SESSION
        self.max_queues = MAX_QUEUES
        self.max_queue_payload_bytes = MAX_QUEUE_PAYLOAD_BYTES
        self.max_queued_payload_bytes = MAX_QUEUED_PAYLOAD_BYTES

    def limits(self) -> dict[str, int]:
        return {
            "queues_per_session": self.max_queues_per_session,
            "queues": self.max_queues,
            "queued_payload_bytes_per_queue": self.max_queue_payload_bytes,
            "queued_payload_bytes": self.max_queued_payload_bytes,
        }

    def open(self, session_id: int, name: str, maxsize: int, now: float) -> dict[str, Any]:
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
        cost = message_cost(payload, len(handles))
        self._check_payload(queue, cost)  # a refused put changes nothing
        blocks = self.ledger.hold(handles, now)
        queue.users.add(session_id)
        message = Message(payload, blocks, [list(h) for h in handles])
        queue.messages.append(message)
        queue.payload_bytes += cost
        self.payload_bytes += cost
        queue.puts += 1
        self.meet((Op.QGET, name), lambda: bool(queue.messages))
        return len(queue.messages)

    def get(self, session_id: int, name: str, to_session: int = 0) -> list[Any] | None:
        """[payload, handles] of the oldest message, now held by `to_session`
        (0: the asking session). A process may wait on one connection and keep
        what it took on another, so only a session of the same process may be
        named."""
        queue = self._queue(session_id, name)
        taker = to_session or session_id
        if taker != session_id:
            self._check_taker(session_id, name, taker)
        if not queue.messages:
            return None
        message = queue.messages.popleft()
        queue.payload_bytes -= message.cost
        self.payload_bytes -= message.cost
        self.ledger.pass_holds(taker, message.blocks)
        queue.gets += 1
        self.meet((Op.QPUT, name), lambda: len(queue.messages) < queue.limit)
        self.maybe_remove(queue)
        return [message.payload, message.handles]

    def _check_taker(self, session_id: int, name: str, taker: int) -> None:
        sessions = self.ledger.sessions
        mine, theirs = sessions[session_id], sessions.get(taker)
        # pids are the kernel's (daemon/handlers/sessions.py, hello); 0 is a process
        # the daemon cannot see, which is nobody's proof of anything
        if theirs is None or theirs.pid != mine.pid or not mine.pid:
            found = "no such session" if theirs is None else f"it is process {theirs.pid}'s"
            raise InvalidRequest(
                f"queue {name!r}: a get for session {taker} from session {session_id} "
                f"(process {mine.pid}) was refused: {found}; name a session of your own "
                "process, or 0 for this one",
                queue=name,
            )

    def stat(self, session_id: int, name: str) -> list[int]:
        queue = self._queue(session_id, name, join=False)
        return [len(queue.messages), queue.maxsize]

    def close(self, session_id: int, name: str) -> None:
        queue = self.queues.get(name)
        if queue is not None:
            queue.users.discard(session_id)
            self.maybe_remove(queue)

    def maybe_remove(self, queue: Queue) -> None:
        """A queue no process has open any more is forgotten with what it
        still holds, as a `multiprocessing.Queue` dies with its last user:
        nobody could take those messages, so their blocks go back."""
        if not queue.users and not self.room.waiting_on(
            (Op.QGET, queue.name), (Op.QPUT, queue.name)
        ):
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

    def rows(self, now: float) -> list[dict[str, Any]]:
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

    def end_session(self, session_id: int) -> None:
        """The session is gone: its queues lose a user."""
        for queue in list(self.queues.values()):
            if session_id in queue.users:
                queue.users.discard(session_id)
                self.maybe_remove(queue)

    def check(self) -> list[str]:
        """The byte counts agree with the messages; every held block is live."""
        problems = []
        if self.payload_bytes != sum(q.payload_bytes for q in self.queues.values()):
            problems.append("queued payload bytes disagree with the queues'")
        for queue in self.queues.values():
            if queue.payload_bytes != sum(m.cost for m in queue.messages):
                problems.append(f"queue {queue.name!r} payload bytes disagree with its messages")
            problems += [
                f"queue {queue.name!r} holds a block that is gone"
                for message in queue.messages
                for block in message.blocks
                if self.ledger.blocks.get(block.address) is not block
            ]
        return problems
