"""shmarena.Queue: a `multiprocessing.Queue` whose large payloads never get copied.

A put pickles the object with protocol 5 (shmarena/pickling.py): buffers of
`threshold` bytes or more go into arena blocks (or are named, if they lie in
the arena already) and only a small payload and the blocks' handles travel.
The daemon keeps the queue itself (daemon/exchange.py): it holds a reference
on every block of a queued message, so the producer may free its blocks or
die at once; a get passes those references to the taking process, which
releases each block when the last view of it is gone, or when it dies. So a
consumer killed at any moment costs the others nothing and leaks nothing.

Each process talks through its data client (the one given, else the
process's default client, see client/default.py), which also holds what it
took. A put that must wait for room and a get that may wait are requests in
flight on that client's one socket among its others (client/transport.py),
so a thread blocked in `get` never holds up another thread's `put` on the
same queue, and waiting threads cost no session or thread of their own. The
daemon answers a kept request the moment it can be met; nothing here polls.

Most puts do not wait for the daemon: they go one-way and batched, into room
reserved beforehand, and a get that keeps finding messages waiting takes the
next ones ahead in the same round trip (shmarena/queue_stream.py; the rules
on the daemon's side are in daemon/queues.py); so do puts naming blocks
already in the arena that this process holds through the queue's client
(their free goes out on the same socket after the put, so the daemon takes
the queue's reference first). A put naming blocks held through another
client, or with a large pickle, a put on a small bounded queue, and every get
that finds nothing taken ahead still wait for the daemon.

The queue lives while any process that opened it lives: the creator opens it,
an unpickled copy (spawn, Pool or executor initargs) opens it at once, a
forked child at its first use; `close()` leaves it. When the last process
has left, the daemon drops the queue and gives back what it held.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any

from shmarena.client import names
from shmarena.client.buffer import Buffer
from shmarena.client.client import Client
from shmarena.client.default import default_client, default_daemon
from shmarena.errors import QueueFull, ShmArenaError
from shmarena.limits import MAX_PREFETCH, MAX_QUEUE_CREDIT
from shmarena.pickling import DEFAULT_THRESHOLD, free_all, pack, release_all, unpack
from shmarena.protocol import Op
from shmarena.queue_stream import Stream, stream_of

__all__ = ["Queue"]

# In-band bytes one get may take ahead (the blocks of large buffers are not
# counted: they stay in the arena whoever holds them).
TAKE_AHEAD_BYTES = 256 << 10
# A put whose pickle carries this many bytes in band, or that names blocks it
# did not copy its data into, waits for the daemon (QPUT); others go one-way.
WAITED_PAYLOAD_BYTES = 32 << 10


def _elsewhere(named: list[Buffer], data: Client) -> bool:
    """Whether a block named in place is held through a client other than
    `data`. A block held through `data` may be named one-way: its free or
    release goes out on the same socket after the put, and the daemon takes
    the queue's reference on it in that order."""
    return any(buf._client is not data for buf in named)


class Queue:
    """A process-safe FIFO queue with `multiprocessing.Queue`'s methods
    (put/get with block and timeout, put_nowait/get_nowait, qsize, empty,
    full, close, join_thread, cancel_join_thread), raising `queue.Full` and
    `queue.Empty` (as shmarena.QueueFull/QueueEmpty, their subclasses).

    `maxsize` 0 means unbounded. `name` lets unrelated processes share a
    queue (default: a fresh unique name). `client` chooses the daemon and
    the connection (default: the process default, see `shmarena.set_default`,
    decided when the queue is made). Differences
    from the stdlib: an unpicklable object raises in `put` itself (it is
    pickled there; only the sending is deferred, as the stdlib's feeder
    thread does, and a put is visible to other processes shortly after it
    returns, to this one at once); received buffers that share their block
    with the sender are read-only; `qsize` also counts the messages other
    consumers took ahead and have not handed out yet.
    """

    def __init__(
        self,
        maxsize: int = 0,
        *,
        name: str | None = None,
        client: Client | None = None,
        threshold: int = DEFAULT_THRESHOLD,
    ) -> None:
        if not isinstance(maxsize, int) or maxsize < 0:
            raise ValueError(f"maxsize must be an int of 0 or more, got {maxsize!r}")
        self._name = name or f"queue-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._maxsize = maxsize
        self._threshold = threshold
        # Resolved now: a copy sent to a spawned child (which has no default
        # of its own) still means this process's default daemon.
        self._where = (client.name, client.runtime_dir) if client is not None else default_daemon()
        self._given = client
        self._setup()
        self._open()

    def _setup(self) -> None:
        self._pid = os.getpid()
        self._closed = False
        self._opened = False
        self._client: Client | None = self._given  # the data client, found once per process
        self._stream: Stream | None = None  # its Stream (queue_stream.py)

    # -- pickling: a queue travels by name -----------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {
            "name": self._name,
            "maxsize": self._maxsize,
            "threshold": self._threshold,
            "where": self._where,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._name = state["name"]
        self._maxsize = state["maxsize"]
        self._threshold = state["threshold"]
        self._where = tuple(state["where"])
        self._given = None
        self._setup()
        self._open()  # at once: this process keeps the queue alive from now on

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<shmarena.Queue {self._name!r} maxsize={self._maxsize}{state}>"

    @property
    def name(self) -> str:
        """The queue's name in the daemon (`shmarena stats` lists queues)."""
        return self._name

    # -- connections ---------------------------------------------------------

    def _data(self) -> Client:
        """The client that puts and holds what this process took."""
        if self._pid != os.getpid():  # a forked child: its own connections
            self._setup()
        client = self._client
        if client is None or (client._closed and client is not self._given):
            client = self._client = default_client(*self._where)
        return client

    def _stream_of(self, data: Client) -> Stream:
        stream = self._stream
        if stream is None or stream.client is not data:
            stream = self._stream = stream_of(data)
        return stream

    def _open(self) -> Client:
        client = self._data()
        if not self._opened:
            client._request(Op.QOPEN, self._name, self._maxsize)
            self._opened = True
        return client

    def _check_open(self) -> Client:
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        client = self._client
        # Per put and get: what _open finds in an opened queue, in one test.
        if self._opened and client is not None and not client._closed and self._pid == os.getpid():
            return client
        return self._open()

    # -- the queue's methods -------------------------------------------------

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put `obj` on the queue; with `block`, wait up to `timeout` seconds
        (None: for ever) for room in a full queue, else raise queue.Full.

        A message goes to the daemon without waiting for it, batched with the
        puts right after it (queue_stream.py), into room reserved beforehand:
        a refusal is raised by the next call on a queue. One that names blocks
        held through another client, or carries a large pickle, waits for the
        daemon."""
        data = self._check_open()
        stream = self._stream_of(data)
        stream.check()
        named: list[Buffer] = []
        packed = pack(obj, data, self._threshold, named=named)
        try:
            handles = [list(h) for h in packed.handles] if packed.handles else []
            want = self._credit_wanted()
            if (
                want == 1
                or len(packed.payload) >= WAITED_PAYLOAD_BYTES
                or (named and _elsewhere(named, data))
            ):
                # A small bounded queue (each put takes its slot itself), a
                # large pickle (a bound on queued bytes) or a message naming
                # blocks another client holds (its free could overtake the
                # put on another socket): it waits for the daemon, so a
                # refusal is raised right here.
                stream.flush()
                self._put_waiting(data, packed.payload, handles, block, timeout)
                free_all(packed.made)
                return
            stream.room_for(len(packed.payload))
            # Another thread may take the slots just reserved: reserve again.
            while not stream.put(self._name, packed.payload, handles, packed.made):
                stream.flush()
                self._reserve(data, stream, want, block, timeout)
        except BaseException:
            free_all(packed.made)  # not sent (a Buffer freed already is skipped)
            raise

    def _credit_wanted(self) -> int:
        """Puts to reserve room for in one round trip: many on an unbounded
        queue, an eighth of a bounded one (room reserved and unused counts as
        taken for other producers), one on a small one."""
        if self._maxsize == 0:
            return MAX_QUEUE_CREDIT
        return max(1, min(MAX_QUEUE_CREDIT, self._maxsize // 8))

    def _put_waiting(
        self, data: Client, payload: bytes, handles: list[Any], block: bool, timeout: float | None
    ) -> None:
        args = (self._name, payload, handles)
        try:
            data._request(Op.QPUT, *args, 0.0)
        except QueueFull:
            if not block or (timeout is not None and timeout <= 0):
                raise
            names.request_waiting(data, Op.QPUT, *args, timeout=timeout)

    def _reserve(
        self, data: Client, stream: Stream, want: int, block: bool, timeout: float | None
    ) -> None:
        if not block or (timeout is not None and timeout <= 0):
            credit, _ = data._request(Op.QRESERVE, self._name, want, 0.0)
        else:
            credit, _ = names.request_waiting(data, Op.QRESERVE, self._name, want, timeout=timeout)
        stream.add_credit(self._name, int(credit))

    def put_nowait(self, obj: Any) -> None:
        """`put(obj, block=False)`."""
        self.put(obj, block=False)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return the oldest object; with `block`, wait up to
        `timeout` seconds (None: for ever) for one, else raise queue.Empty.

        A consumer that keeps finding messages waiting takes several per
        round trip: the ones after the first are taken ahead and handed out
        by the next gets without asking the daemon; should this process die
        before handing them out, they go back to the queue for the others."""
        data = self._check_open()
        stream = self._stream_of(data)
        stream.check()
        message = stream.next_ahead(self._name)
        if message is None:
            message = self._take(data, stream, block, timeout)
        payload, handles = message
        buffers = [data._buffer(list(h), "retained") for h in handles] if handles else []
        try:
            return unpack(payload, buffers)
        except BaseException:
            release_all(buffers)
            raise

    def _take(
        self, data: Client, stream: Stream, block: bool, timeout: float | None
    ) -> tuple[bytes, list[Any]]:
        stream.flush()  # this process's own puts and acks first
        want = stream.want.get(self._name, 1)
        args = (self._name, want, TAKE_AHEAD_BYTES if want > 1 else 0)
        if not block or (timeout is not None and timeout <= 0):
            flat, left = data._request(Op.QTAKE, *args, 0.0)
        else:
            flat, left = names.request_waiting(data, Op.QTAKE, *args, timeout=timeout)
        messages = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
        if len(messages) > 1:
            stream.keep_ahead(self._name, messages[1:])
        stream.next_want(self._name, len(messages), want, int(left), MAX_PREFETCH + 1)
        return messages[0]

    def get_nowait(self) -> Any:
        """`get(block=False)`."""
        return self.get(block=False)

    def qsize(self) -> int:
        """How many messages the daemon holds for this queue now and no
        process has got yet (this process's puts and gets included)."""
        data = self._check_open()
        stream = self._stream_of(data)
        stream.check()
        stream.flush()
        ((size, _),) = data._request(Op.QSTAT, self._name)
        stream.check()  # a refusal of one of the puts it counted
        return int(size)

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return self._maxsize > 0 and self.qsize() >= self._maxsize

    def close(self) -> None:
        """This process uses the queue no more: later put/get raise
        ValueError. Objects it got stay valid. The daemon drops the queue,
        with what it still holds, once every process has left it."""
        if self._closed:
            return
        self._closed = True
        if self._pid == os.getpid() and self._opened:
            # the daemon gone: so is the queue
            with contextlib.suppress(ShmArenaError):
                data = self._data()
                stream = self._stream_of(data)
                stream.flush()
                _, ahead = stream.forget(self._name)
                if ahead:  # not handed out: back to the queue for the others
                    data._request(Op.QUNTAKE, self._name, ahead)
                data._request(Op.QCLOSE, self._name)

    def join_thread(self) -> None:
        """Nothing to wait for (a put is done when it returns); like the
        stdlib, only allowed after `close()`."""
        if not self._closed:
            raise AssertionError(f"Queue {self!r} not closed")

    def cancel_join_thread(self) -> None:
        """Nothing to cancel: there is no feeder thread."""
