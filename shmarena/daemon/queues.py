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

Traffic without a round trip per message (shmarena.Queue from protocol 8 on):
a producer reserves slots (`reserve`, QRESERVE) and then sends its puts
one-way and batched (`put_many`, QPUTS) while its credit lasts, so `maxsize`
still bounds the queue: reserved slots count against it, as do messages taken
ahead. A consumer takes the oldest message and up to MAX_PREFETCH more in one
reply (`take`, QTAKE). The first is taken as a QGET takes it; the others are
*taken ahead*: the session retains their blocks (so it may load them at once),
but the queue keeps holding them, and counting them, until the session says
they were delivered (`ack`, QACK, one-way) or hands them back (`untake`). If
the session ends first they go back to the front of the queue in their order,
so a consumer killed with messages in hand loses none of those it had not
delivered. Bounds: MAX_QUEUE_CREDIT slots per reservation, MAX_PREFETCH per
take, MAX_TAKEN_AHEAD messages taken ahead per session over all queues (a take
beyond it takes one message).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shmarena.config import format_size
from shmarena.daemon.records import Block
from shmarena.daemon.waiters import WaitKey, WaitRoom
from shmarena.errors import InvalidRequest, LimitReached, QueueFull, ShmArenaError
from shmarena.limits import (
    HANDLE_COST_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_PREFETCH,
    MAX_QUEUE_CREDIT,
    MAX_QUEUE_PAYLOAD_BYTES,
    MAX_QUEUED,
    MAX_QUEUED_PAYLOAD_BYTES,
    MAX_QUEUES,
    MAX_QUEUES_PER_SESSION,
    MAX_TAKEN_AHEAD,
    MESSAGE_COST_BYTES,
)
from shmarena.protocol import Handle, Op, parse_handle

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
    cost: int  # bytes of the daemon's heap it is counted for (message_cost)


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
    # session -> messages it took ahead and has not acknowledged, oldest first
    ahead: dict[int, deque[Message]] = field(default_factory=dict)
    ahead_total: int = 0
    reserved: dict[int, int] = field(default_factory=dict)  # session -> slots for QPUTS
    reserved_total: int = 0

    @property
    def limit(self) -> int:
        return self.maxsize if 0 < self.maxsize < MAX_QUEUED else MAX_QUEUED

    @property
    def qsize(self) -> int:
        """Messages not yet delivered: queued, and taken ahead unacknowledged."""
        return len(self.messages) + self.ahead_total

    @property
    def room(self) -> int:
        """Slots free for a put that holds no reservation."""
        return self.limit - len(self.messages) - self.ahead_total - self.reserved_total


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
        self.max_taken_ahead = MAX_TAKEN_AHEAD
        self.ahead_by_session: dict[int, int] = {}  # session -> taken ahead, all queues

    def limits(self) -> dict[str, int]:
        return {
            "queues_per_session": self.max_queues_per_session,
            "queues": self.max_queues,
            "queued_payload_bytes_per_queue": self.max_queue_payload_bytes,
            "queued_payload_bytes": self.max_queued_payload_bytes,
            "taken_ahead_per_session": self.max_taken_ahead,
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
        return {"name": name, "maxsize": queue.maxsize, "qsize": queue.qsize}

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
        if queue.room <= 0:
            queue.users.add(session_id)
            return None
        cost = message_cost(payload, len(handles))
        self._check_payload(queue, cost)  # a refused put changes nothing
        blocks = self.ledger.hold(handles, now)
        queue.users.add(session_id)
        message = Message(payload, blocks, [list(h) for h in handles], cost)
        queue.messages.append(message)
        queue.payload_bytes += cost
        self.payload_bytes += cost
        queue.puts += 1
        self._meet_takers(queue)
        return queue.qsize

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
        self._meet_putters(queue)
        self.maybe_remove(queue)
        return [message.payload, message.handles]

    def _meet_takers(self, queue: Queue) -> None:
        self.meet((Op.QGET, queue.name), lambda: bool(queue.messages))
        self.meet((Op.QTAKE, queue.name), lambda: bool(queue.messages))

    def _meet_putters(self, queue: Queue) -> None:
        self.meet((Op.QPUT, queue.name), lambda: queue.room > 0)
        self.meet((Op.QRESERVE, queue.name), lambda: queue.room > 0)

    # -- without a round trip per message (see the module docstring) ---------

    def reserve(self, session_id: int, name: str, want: int) -> list[int] | None:
        """[slots the session holds reserved now, qsize] after reserving up to
        `want` more, or None while the queue has no room at all."""
        if not 0 < want <= MAX_QUEUE_CREDIT:
            raise InvalidRequest(
                f"queue {name!r}: a reservation is of 1..{MAX_QUEUE_CREDIT} slots "
                f"(MAX_QUEUE_CREDIT), asked {want}",
                queue=name,
            )
        queue = self._queue(session_id, name)
        room = queue.room
        if room <= 0:
            return None
        granted = min(want, room)
        queue.reserved[session_id] = held = queue.reserved.get(session_id, 0) + granted
        queue.reserved_total += granted
        return [held, queue.qsize]

    def _unreserve(self, queue: Queue, session_id: int) -> None:
        queue.reserved_total -= queue.reserved.pop(session_id, 0)

    def put_many(self, session_id: int, name: str, flat: list[Any], now: float) -> None:
        """Queue the messages of a QPUTS in order: each in a slot the session
        reserved, else in free room. The first that cannot be queued is
        refused, with the ones after it; the ones before it stay queued."""
        batch = _in_band_batch(flat)  # the common batch, checked at once
        messages = _parse_messages(name, flat) if batch is None else []
        queue = self._queue(session_id, name)
        if batch is not None:
            if self._put_in_band(queue, session_id, *batch):
                self._meet_takers(queue)
                return
            messages = _parse_messages(name, flat)
        done = 0
        try:
            for payload, handles in messages:
                self._put_one(queue, session_id, payload, handles, now)
                done += 1
        except ShmArenaError as error:
            if len(messages) > 1:
                error.message = (
                    f"{error.message} (a batch of {len(messages)} one-way puts: the first "
                    f"{done} were queued, this one and the {len(messages) - done - 1} after "
                    "it were not)"
                )
                error.args = (error.message,)
            raise
        finally:
            if done:
                self._meet_takers(queue)

    def _put_in_band(
        self, queue: Queue, session_id: int, payloads: list[bytes], costs: list[int]
    ) -> bool:
        """A batch of `_in_band_batch` queued at once if every message has
        room and the batch fits the bounds on queued bytes. False (nothing
        queued) otherwise: `put_many` then puts it message by message, which
        checks each and says which one was refused."""
        count = len(payloads)
        credit = queue.reserved.get(session_id, 0)
        if count > credit + max(0, queue.room):
            return False
        total = sum(costs)
        if (
            queue.payload_bytes + total > self.max_queue_payload_bytes
            or self.payload_bytes + total > self.max_queued_payload_bytes
        ):
            return False
        used = min(credit, count)
        if used == credit:
            queue.reserved.pop(session_id, None)
        else:
            queue.reserved[session_id] = credit - used
        queue.reserved_total -= used
        queue.messages.extend(map(_in_band_message, payloads, costs))
        queue.payload_bytes += total
        self.payload_bytes += total
        queue.puts += count
        return True

    def _put_one(
        self, queue: Queue, session_id: int, payload: bytes, handles: list[Handle], now: float
    ) -> None:
        credit = queue.reserved.get(session_id, 0)
        if not credit and queue.room <= 0:
            raise QueueFull(
                f"one-way put to queue {queue.name!r} refused: it is full "
                f"({queue.qsize} of {queue.limit} messages, {queue.reserved_total} slots "
                "reserved) and this session holds no reserved slot; reserve room first "
                "(QRESERVE), as shmarena.Queue does",
                queue=queue.name,
            )
        cost = message_cost(payload, len(handles))
        self._check_payload(queue, cost)
        blocks = self.ledger.hold(handles, now) if handles else []
        if credit:
            if credit == 1:
                del queue.reserved[session_id]
            else:
                queue.reserved[session_id] = credit - 1
            queue.reserved_total -= 1
        queue.messages.append(Message(payload, blocks, [list(h) for h in handles], cost))
        queue.payload_bytes += cost
        self.payload_bytes += cost
        queue.puts += 1

    def take(self, session_id: int, name: str, max_count: int, max_bytes: int) -> list[Any] | None:
        """[[payload, handles, ...], qsize]: the oldest message, taken as `get`
        takes it, and up to `max_count` - 1 more taken ahead while their
        payloads stay within `max_bytes`; None if the queue is empty."""
        if not 0 < max_count <= MAX_PREFETCH + 1 or max_bytes < 0:
            raise InvalidRequest(
                f"queue {name!r}: a take is of 1..{MAX_PREFETCH + 1} messages (MAX_PREFETCH "
                f"ahead) and 0 or more bytes, asked {max_count} and {max_bytes}",
                queue=name,
            )
        queue = self._queue(session_id, name)
        if not queue.messages:
            return None
        first = self.get(session_id, name)
        assert first is not None
        flat = first
        ahead = self.ahead_by_session.get(session_id, 0)
        room = min(max_count - 1, self.max_taken_ahead - ahead)
        size, taken = len(first[0]), 0
        kept = queue.ahead.setdefault(session_id, deque())
        while taken < room and queue.messages:
            if size + len(queue.messages[0].payload) > max_bytes:
                break
            message = queue.messages.popleft()
            if message.blocks:
                self._retain_held(session_id, message.blocks)
            kept.append(message)
            flat.append(message.payload)
            flat.append(message.handles)
            size += len(message.payload)
            taken += 1
        if not kept:
            del queue.ahead[session_id]
        if taken:
            queue.ahead_total += taken
            self.ahead_by_session[session_id] = ahead + taken
        return [flat, queue.qsize]

    def _retain_held(self, session_id: int, blocks: list[Block]) -> None:
        """The session retains blocks the queue holds and keeps holding (its
        producer may have freed them: they live by their references)."""
        session = self.ledger.sessions[session_id]
        for block in blocks:
            assert block.retainers is not None
            block.retainers[session_id] = block.retainers.get(session_id, 0) + 1
            session.retained.add(block.address)
            self.ledger.changes.blocks.add(block.address)

    def ack(self, session_id: int, name: str, count: int) -> None:
        """The oldest `count` messages the session took ahead were delivered."""
        queue = self._queue(session_id, name, join=False)
        held = len(queue.ahead.get(session_id, ()))
        if not 0 < count <= held:
            raise InvalidRequest(
                f"queue {name!r}: an ack of {count} messages taken ahead, but this session "
                f"holds {held} taken ahead and unacknowledged",
                queue=name,
            )
        self._ack(queue, session_id, count)
        self._meet_putters(queue)

    def _ack(self, queue: Queue, session_id: int, count: int) -> None:
        taken = queue.ahead[session_id]
        queue.gets += count
        cost = 0
        for _ in range(count):
            message = taken.popleft()
            if message.blocks:
                self.ledger.drop_holds(message.blocks)
            cost += message.cost
        queue.payload_bytes -= cost
        self.payload_bytes -= cost
        if not taken:
            del queue.ahead[session_id]
        queue.ahead_total -= count
        left = self.ahead_by_session.get(session_id, 0) - count
        if left > 0:
            self.ahead_by_session[session_id] = left
        else:
            self.ahead_by_session.pop(session_id, None)

    def untake(self, session_id: int, name: str, count: int) -> None:
        """The newest `count` messages the session took ahead go back to the
        front of the queue, in order, and the session's retains on them go."""
        queue = self._queue(session_id, name, join=False)
        taken = queue.ahead.get(session_id, deque())
        if not 0 < count <= len(taken):
            raise InvalidRequest(
                f"queue {name!r}: {count} messages to put back, but this session holds "
                f"{len(taken)} taken ahead and unacknowledged",
                queue=name,
            )
        back = [taken.pop() for _ in range(count)]
        handles = [Handle(*h) for message in back for h in message.handles]
        if handles:
            self.ledger.release(session_id, handles)
        queue.messages.extendleft(back)  # popped newest first: extendleft restores the order
        if not taken:
            del queue.ahead[session_id]
        queue.ahead_total -= count
        left = self.ahead_by_session.get(session_id, 0) - count
        if left > 0:
            self.ahead_by_session[session_id] = left
        else:
            self.ahead_by_session.pop(session_id, None)
        self._meet_takers(queue)

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
        return [queue.qsize, queue.maxsize]

    def close(self, session_id: int, name: str) -> None:
        """The session leaves the queue: its reserved slots go back, and what
        it took ahead counts as delivered (a client puts back what it did not
        deliver first, with QUNTAKE)."""
        queue = self.queues.get(name)
        if queue is not None:
            self._unreserve(queue, session_id)
            taken = queue.ahead.get(session_id)
            if taken:
                self._ack(queue, session_id, len(taken))
            queue.users.discard(session_id)
            self._meet_putters(queue)
            self.maybe_remove(queue)

    def maybe_remove(self, queue: Queue) -> None:
        """A queue no process has open any more is forgotten with what it
        still holds, as a `multiprocessing.Queue` dies with its last user:
        nobody could take those messages, so their blocks go back."""
        name = queue.name
        keys = [(op, name) for op in (Op.QGET, Op.QPUT, Op.QTAKE, Op.QRESERVE)]
        if not queue.users and not self.room.waiting_on(*keys):
            for message in queue.messages:
                self.ledger.drop_holds(message.blocks)
            for session_id, taken in list(queue.ahead.items()):
                self._ack(queue, session_id, len(taken))
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
                "qsize": q.qsize,
                "maxsize": q.maxsize,
                "taken_ahead": q.ahead_total,
                "reserved": q.reserved_total,
                "held_bytes": sum(b.carved for m in _held(q) for b in m.blocks),
                "payload_bytes": q.payload_bytes,
                "users": len(q.users),
                "puts": q.puts,
                "gets": q.gets,
                "age_s": round(now - q.created_at, 3),
            }
            for q in self.queues.values()
        ]

    def end_session(self, session_id: int) -> None:
        """The session is gone: its queues lose a user, its reserved slots go
        back, and what it took ahead goes back to the front of its queue in
        order (the ledger dropped the session's retains on them already)."""
        self.ahead_by_session.pop(session_id, None)
        for queue in list(self.queues.values()):
            self._unreserve(queue, session_id)
            taken = queue.ahead.pop(session_id, None)
            if taken:
                queue.ahead_total -= len(taken)
                queue.messages.extendleft(reversed(taken))
                self._meet_takers(queue)
            if session_id in queue.users:
                queue.users.discard(session_id)
                self._meet_putters(queue)
                self.maybe_remove(queue)

    def check(self) -> list[str]:
        """The byte counts agree with the messages; every held block is live."""
        problems = []
        if self.payload_bytes != sum(q.payload_bytes for q in self.queues.values()):
            problems.append("queued payload bytes disagree with the queues'")
        for queue in self.queues.values():
            if queue.payload_bytes != sum(m.cost for m in _held(queue)):
                problems.append(f"queue {queue.name!r} payload bytes disagree with its messages")
            problems += [
                f"queue {queue.name!r} holds a block that is gone"
                for message in _held(queue)
                for block in message.blocks
                if self.ledger.blocks.get(block.address) is not block
            ]
            if queue.ahead_total != sum(map(len, queue.ahead.values())):
                problems.append(f"queue {queue.name!r} counts its messages taken ahead wrong")
            if queue.reserved_total != sum(queue.reserved.values()):
                problems.append(f"queue {queue.name!r} counts its reserved slots wrong")
        return problems


def _in_band_batch(flat: list[Any]) -> tuple[list[bytes], list[int]] | None:
    """(payloads, costs) of a QPUTS body whose messages carry no block and
    whose payloads are all bytes within MAX_PAYLOAD_BYTES, else None. Checks
    of the whole list at C speed, not a Python call per message."""
    payloads, handles = flat[0::2], flat[1::2]
    count = len(payloads)
    if (
        not count
        or len(handles) != count
        or handles.count([]) != count
        or {type(p) for p in payloads} != {bytes}
    ):
        return None
    sizes = list(map(len, payloads))
    if max(sizes) > MAX_PAYLOAD_BYTES:
        return None
    return payloads, [size + MESSAGE_COST_BYTES for size in sizes]


def _in_band_message(payload: bytes, cost: int) -> Message:
    return Message(payload, [], [], cost)


def _held(queue: Queue) -> list[Message]:
    """Every message the queue holds: queued, and taken ahead unacknowledged."""
    return [*queue.messages, *(m for taken in queue.ahead.values() for m in taken)]


def _parse_messages(name: str, flat: list[Any]) -> list[tuple[bytes, list[Handle]]]:
    """A QPUTS body's (payload, handles) pairs, or InvalidRequest: nothing of a
    malformed body is queued."""
    if len(flat) % 2:
        raise InvalidRequest(
            f"qputs to queue {name!r}: messages come as payload, handles pairs; got an "
            f"odd list of {len(flat)} items",
            queue=name,
        )
    pairs = []
    for index in range(0, len(flat), 2):
        payload, handles = flat[index], flat[index + 1]
        if not isinstance(payload, bytes) or len(payload) > MAX_PAYLOAD_BYTES:
            shown = (
                f"{len(payload)} bytes" if isinstance(payload, bytes) else type(payload).__name__
            )
            raise InvalidRequest(
                f"qputs to queue {name!r}: message {index // 2} has a payload of {shown}; "
                f"a payload is bytes, at most {MAX_PAYLOAD_BYTES} (MAX_PAYLOAD_BYTES): put "
                "larger data in a block",
                queue=name,
            )
        if not isinstance(handles, list):
            raise InvalidRequest(
                f"qputs to queue {name!r}: message {index // 2} has handles of "
                f"{type(handles).__name__}, not a list",
                queue=name,
            )
        pairs.append((payload, [parse_handle(Op.QPUTS, h) for h in handles]))
    return pairs
