"""The one-way queue traffic of one client: puts and acks, batched, in order.

shmarena.Queue does not wait for the daemon on a put, nor on a get that finds
a message taken ahead (daemon/queues.py has the daemon's side). What it sends
without waiting goes through the client's Stream:

- Puts. A producer reserves room (QRESERVE, a round trip for up to
  MAX_QUEUE_CREDIT puts) and then queues each put here; the Stream sends the
  puts of one queue as one QPUTS frame (one-way). So `maxsize` still bounds
  the queue, and a refusal (a bound on queued bytes, a stale block) comes back
  as a late error that the next call on a queue raises.
- Acks. A consumer takes the oldest message and some more ahead (QTAKE); each
  one it then hands out of its buffer is acknowledged here (QACK, one-way).
  Taken ahead and not handed out, a message goes back to the queue if the
  process dies; handed out and acknowledged, it does not.

Everything goes out in the order it was queued, so a report a consumer puts
after a get can never reach the daemon before the ack of that get, and a get
or `qsize` after a put in the same process sees the put: each call that asks
the daemon anything sends the Stream first. Between calls a thread of the
Stream's own sends what gathered after GATHER_S (a burst of puts becomes one
frame, as the client's flusher batches its bookkeeping); a put that carries
blocks goes at once, and so does a batch that reached MAX_BATCH_BYTES or
MAX_BATCH_MESSAGES. Before a fork what is queued is sent (the child's puts
come after its parent's); at exit it is sent and confirmed by a round trip,
since a process that ends with os._exit drops what its socket still holds.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing.util as mp_util
import os
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any

from shmarena.errors import ShmArenaError
from shmarena.limits import MAX_FRAME_BYTES
from shmarena.pickling import free_all
from shmarena.protocol import Op

if TYPE_CHECKING:
    from shmarena.client.buffer import Buffer
    from shmarena.client.client import Client

GATHER_S = 0.0005  # what gathers this long after the first put goes as one frame
MAX_BATCH_BYTES = MAX_FRAME_BYTES // 2  # in-band bytes per QPUTS frame, well below the limit
MAX_BATCH_MESSAGES = 512


def _nothing() -> None:
    pass


class Stream:
    """One client's queued one-way queue traffic, and what its queues know
    without asking: the room reserved for puts, the messages taken ahead."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._reset()

    def _reset(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.RLock()
        self.items: list[list[Any]] = []  # [op, queue name, messages or count], in order
        self.made: list[Buffer] = []  # blocks of queued puts: freed once sent
        self.batch_bytes = 0
        self.batch_messages = 0
        self.credit: dict[str, int] = {}  # queue name -> puts reserved
        self.ahead: dict[str, deque[tuple[bytes, list[Any]]]] = {}  # taken ahead
        self.want: dict[str, int] = {}  # queue name -> messages the next take asks for
        self.streak: dict[str, int] = {}
        self.transport: Any = None  # the socket the credit and the messages ahead are of
        self.errors: list[ShmArenaError] = []
        self.sent = False  # frames went out since `confirm` last made sure they arrived
        self.wake = threading.Event()
        self.scheduled = False  # the thread was woken for what is queued now
        self.thread: threading.Thread | None = None

    def check(self) -> None:
        """Raise what went wrong sending earlier (a refusal of a one-way put or
        ack, from the daemon), once; forget credit and messages of a session
        the client has lost."""
        if self.pid != os.getpid():
            self._reset()
        if self.transport is not None and self.transport is not self.client._transport:
            with self.lock:  # a new session: the old one's room and messages are gone
                self.credit.clear()
                self.ahead.clear()
                self.transport = None
        transport = self.client._transport
        # Only what came back already (a late error lands in `late` whenever
        # any call reads the socket): a look at a list, not a socket call.
        if transport is not None and transport.late:
            try:
                transport.raise_late()
            except ShmArenaError as error:
                self.errors.append(error)
        if self.errors:
            first, self.errors = self.errors[0], []
            raise first

    # -- puts ----------------------------------------------------------------

    def put(self, name: str, payload: bytes, handles: list[list[int]], made: list[Buffer]) -> bool:
        """Queue one put into a slot reserved for `name` and send it with its
        batch; False (nothing queued) when no slot is left."""
        with self.lock:
            credit = self.credit.get(name, 0)
            if not credit:
                return False
            self.credit[name] = credit - 1
            last = self.items[-1] if self.items else None
            if last is not None and last[0] is Op.QPUTS and last[1] == name:
                last[2] += (payload, handles)
            else:
                self.items.append([Op.QPUTS, name, [payload, handles]])
            self.made += made
            self.batch_bytes += len(payload)
            self.batch_messages += 1
            now = (
                handles
                or self.batch_bytes >= MAX_BATCH_BYTES
                or self.batch_messages >= MAX_BATCH_MESSAGES
            )
            if now:
                self.flush()
        if not now:
            self._later()
        return True

    def room_for(self, payload_bytes: int) -> None:
        """Send what is queued first if `payload_bytes` more would make the
        frame too large."""
        if self.batch_bytes + payload_bytes >= MAX_BATCH_BYTES:
            self.flush()

    def add_credit(self, name: str, credit: int) -> None:
        """The slots reserved for `name` now (QRESERVE's answer)."""
        with self.lock:
            self.credit[name] = credit
            self.transport = self.client._transport

    # -- gets ----------------------------------------------------------------

    def next_ahead(self, name: str) -> tuple[bytes, list[Any]] | None:
        """The oldest message taken ahead, acknowledged (the ack goes out with
        the next batch), or None."""
        with self.lock:
            ahead = self.ahead.get(name)
            if not ahead:
                return None
            message = ahead.popleft()
            last = self.items[-1] if self.items else None
            if last is not None and last[0] is Op.QACK and last[1] == name:
                last[2] += 1
            else:
                self.items.append([Op.QACK, name, 1])
            drained = not ahead
        if drained:
            self.flush()  # the last of a batch: the producer may be waiting for room
        else:
            self._later()
        return message

    def keep_ahead(self, name: str, messages: list[tuple[bytes, list[Any]]]) -> None:
        with self.lock:
            self.ahead.setdefault(name, deque()).extend(messages)
            self.transport = self.client._transport

    def next_want(self, name: str, got: int, asked: int, left: int, most: int) -> None:
        """How many the next take of `name` asks for: one at first (a get then
        behaves as a plain get, and a process that gets a few messages and
        stops holds none ahead), then, after two takes in a row that got all
        they asked and left more queued, enough for what is queued (up to
        `most`), so a consumer behind a busy producer takes many per round trip."""
        with self.lock:
            if got >= asked and left > 0:
                streak = self.streak.get(name, 0) + 1
                self.streak[name] = streak
                if streak >= 2:
                    self.want[name] = min(most, max(asked * 2, left + 1))
            else:
                self.streak[name] = 0

    def forget(self, name: str) -> tuple[int, int]:
        """Leave queue `name`: (credit, messages taken ahead) it had."""
        with self.lock:
            ahead = self.ahead.pop(name, ())
            return self.credit.pop(name, 0), len(ahead)

    # -- sending -------------------------------------------------------------

    def flush(self) -> None:
        """Send everything queued, in order, without waiting for an answer."""
        with self.lock:
            if self.pid != os.getpid() or not self.items:
                return
            items, self.items = self.items, []
            made, self.made = self.made, []
            self.batch_bytes = self.batch_messages = 0
            try:
                for op, name, body in items:
                    self._send(op, name, body)
            finally:
                # Sent (or not sendable): the queue holds its own references
                # from its first frame on, so these blocks can go.
                free_all(made)

    def _send(self, op: Op, name: str, body: Any) -> None:
        client = self.client
        transport = client._transport
        if transport is None or client._pid != os.getpid():
            transport = client._reconnect_after_fork()
        for _ in range(2):
            try:
                call = transport.start(op, (name, body), _nothing)
            except ShmArenaError as error:
                self.errors.append(error)  # raised by the next call on a queue
                if transport.closed:
                    return
                continue  # a late refusal of an earlier frame: this one is not sent yet
            transport.forget(call)
            self.sent = True
            return

    def confirm(self) -> None:
        """Send what is queued and wait until the daemon has it (a round trip
        after it on the same socket): at exit, since a process that ends with
        os._exit (a multiprocessing child) drops what its socket still holds."""
        self.flush()
        transport = self.client._transport
        if self.sent and transport is not None and self.pid == os.getpid():
            self.sent = False
            transport.request(Op.PING, late=False)

    def _later(self) -> None:
        """Have the Stream's thread send what is queued after GATHER_S."""
        if self.scheduled:
            return  # an Event.set per put costs microseconds
        self.scheduled = True
        if self.thread is None:
            thread = threading.Thread(target=self._loop, name="shmarena-queue", daemon=True)
            self.thread = thread
            thread.start()
        self.wake.set()

    def _loop(self) -> None:
        wake, pid = self.wake, self.pid
        while True:
            wake.wait()
            wake.clear()
            if self.pid != pid or self.client._closed:
                return
            time.sleep(GATHER_S)  # let a burst gather into one frame
            self.scheduled = False  # what is queued from here on wakes it again
            # Whatever fails here, the next call on a queue reports (`check`).
            with contextlib.suppress(Exception):
                self.flush()


_STREAMS: weakref.WeakKeyDictionary[Client, Stream] = weakref.WeakKeyDictionary()
_STREAMS_LOCK = threading.Lock()


_exit_hooked_pid = 0  # the process whose multiprocessing exit runs _flush_at_exit


def stream_of(client: Client) -> Stream:
    """The client's one Stream (made at its first use)."""
    global _exit_hooked_pid
    stream = _STREAMS.get(client)
    pid = os.getpid()
    if stream is None or _exit_hooked_pid != pid:
        with _STREAMS_LOCK:
            if _exit_hooked_pid != pid:
                # A multiprocessing child ends with os._exit, after running
                # multiprocessing's exit finalizers (atexit handlers do not
                # run): flush there too. Its registry is per process.
                _exit_hooked_pid = pid
                mp_util.Finalize(None, _flush_at_exit, exitpriority=100)
            stream = _STREAMS.get(client)
            if stream is None:
                stream = _STREAMS[client] = Stream(client)
    return stream


def _flush_before_fork() -> None:
    # What was put before a fork leaves before the child can put anything.
    for stream in list(_STREAMS.values()):
        if stream.pid == os.getpid() and not stream.client._closed:
            with contextlib.suppress(Exception):
                stream.flush()


os.register_at_fork(before=_flush_before_fork)


@atexit.register
def _flush_at_exit() -> None:
    # Registered after the clients' own exit handler (this module imports the
    # client first), so it runs before it: the puts leave before the BYE.
    for stream in list(_STREAMS.values()):
        if stream.pid == os.getpid() and not stream.client._closed:
            with contextlib.suppress(Exception):
                stream.confirm()
