"""What the daemon tells a client without being asked: one thread per process.

Each Client with a cache opens a second DEALER socket (from the process's one
Context, client/context.py) and sends LISTEN [session, token] on it, so the
daemon can reach it while its application makes no call (see
daemon/pressure.py). The pushes:

- notices (blocks of this session's cache that came back through somebody
  else): handed to `Cache.notice`, so a pipeline's frames return to the
  producer's reuse without a round trip on its critical path;
- reclaim (an allocation somewhere does not fit, or the arena is nearly
  full): the cache's free blocks go back to the arena (`Cache.drain_all`),
  and a PING, which carries the drains, tells the daemon this client answered.

One listener thread owns every push socket of the process: it polls their
descriptors and a wake pipe. A ZeroMQ socket's descriptor is edge triggered,
so a socket is read until its EVENTS say nothing more is there after every
wake-up and once when it is added. The thread is started by the first client
that listens; a forked child starts its own on its first listen and never
touches the parent's sockets or thread. A Client's close (or its collection)
hands its socket back to the thread, which closes it; at exit every push
socket is closed so that the Context can terminate and let queued frees
leave.

The socket's LISTEN is answered before the client's connect returns, so a
client is reachable as soon as it is connected.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from shmarena.client.context import dealer_socket
from shmarena.limits import MAX_FRAME_BYTES
from shmarena.protocol import FREE_ID_BIT, OK, PUSH, PUSH_NOTICES, PUSH_RECLAIM, Op, decode, encode

if TYPE_CHECKING:
    from shmarena.client.cache import Cache
    from shmarena.client.transport import Transport

_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)
_LISTEN_TIMEOUT_S = 5.0  # at most this long for the LISTEN reply (the hello came already)


class Subscription:
    """One session's push socket, and what to do with what comes on it
    (called in the listener thread)."""

    def __init__(
        self,
        sock: zmq.Socket[Any],
        on_notices: Callable[[list[int]], None],
        on_reclaim: Callable[[], None],
    ) -> None:
        self.sock = sock
        self.fd = int(sock.getsockopt(zmq.FD))
        self.on_notices = on_notices
        self.on_reclaim = on_reclaim
        self.received = 0  # pushes handled (tests)
        # The number of the last NOTICES push handled, and its change told
        # (Client.sync waits for the number the daemon's SYNC reply gives).
        self.noticed = 0
        self.noticed_changed = threading.Condition()

    def wait_noticed(self, number: int, timeout_s: float) -> bool:
        """Wait until the NOTICES push `number` was handled (its blocks are
        back in the cache); False if it did not come within `timeout_s`."""
        with self.noticed_changed:
            return self.noticed_changed.wait_for(lambda: self.noticed >= number, timeout_s)


class Listener:
    """The process's push thread (see the module's docstring)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._adds: list[Subscription] = []
        self._closes: list[Subscription] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="shmarena-pushes", daemon=True)
        self._thread.start()

    def add(self, sub: Subscription) -> None:
        """Hand a connected socket over to the thread (it owns it from now on)."""
        with self._lock:
            self._adds.append(sub)
        self._wake()

    def remove(self, sub: Subscription) -> None:
        """The thread closes the socket (soon: a closed client's descriptors go)."""
        with self._lock:
            self._closes.append(sub)
        self._wake()

    def stop(self, wait_s: float) -> None:
        """Close every socket and end the thread (at exit)."""
        with self._lock:
            self._stopping = True
        self._wake()
        self._thread.join(wait_s)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: it wakes anyway
            os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        subs: dict[int, Subscription] = {}
        while True:
            with self._lock:
                adds, self._adds = self._adds, []
                closes, self._closes = self._closes, []
                stopping = self._stopping
            for sub in closes + (list(subs.values()) if stopping else []):
                if subs.pop(sub.fd, None) is sub:
                    poller.unregister(sub.fd)
                sub.sock.close(linger=0)
            if stopping:
                return
            for sub in adds:
                if not sub.sock.closed:
                    subs[sub.fd] = sub
                    poller.register(sub.fd, select.POLLIN)
                    _read(sub)
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                elif (sub_of_fd := subs.get(fd)) is not None:
                    _read(sub_of_fd)


def _read(sub: Subscription) -> None:
    """Everything that came on the socket (until EVENTS says no more)."""
    sock = sub.sock
    while True:
        try:
            if not int(sock.getsockopt(_EVENTS)) & _POLLIN:
                return
            frame = sock.recv(_NOBLOCK)
        except zmq.ZMQError:  # Again, or a socket closed under us (the Context ended)
            return
        # A push must never end the thread: whatever is wrong, the next request reports.
        with contextlib.suppress(Exception):
            _handle(sub, frame)


def _handle(sub: Subscription, frame: bytes) -> None:
    message = decode(frame)
    if not isinstance(message, list) or len(message) < 3 or message[0] != PUSH:
        return  # not a push (a reply to a LISTEN given up on)
    sub.received += 1
    if message[1] == PUSH_NOTICES and isinstance(message[2], list):
        try:
            sub.on_notices(message[2])
        finally:
            if len(message) > 3 and isinstance(message[3], int):
                with sub.noticed_changed:
                    sub.noticed = max(sub.noticed, message[3])
                    sub.noticed_changed.notify_all()
    elif message[1] == PUSH_RECLAIM:
        sub.on_reclaim()


_listener: Listener | None = None
_lock = threading.Lock()
# Listeners inherited across fork(): referenced for ever, never touched.
_inherited: list[Listener] = []


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


def _the_listener() -> Listener:
    global _listener
    with _lock:
        if _listener is None or _listener.pid != os.getpid():
            if _listener is not None:
                _inherited.append(_listener)
            _listener = Listener()
        return _listener


def _answers(cache: Cache, transport: Transport) -> tuple[Any, Any]:
    """What a session's pushes do to its cache, holding neither (nor so the
    Client) alive: a dropped client is collected as before."""
    cache_ref, transport_ref = weakref.ref(cache), weakref.ref(transport)

    def on_notices(flat: list[int]) -> None:
        found = cache_ref()
        if found is not None:
            found.notice(flat)

    def on_reclaim() -> None:
        found, sender = cache_ref(), transport_ref()
        if found is not None:
            found.drain_all()
        if sender is not None and not sender.closed:
            sender.request(Op.PING, late=False)  # carries the drains; says "answered"

    return on_notices, on_reclaim


def subscribe(
    socket_path: str, session: int, token: int, cache: Cache, transport: Transport
) -> Subscription | None:
    """Open a push socket for `session` and hand it to the process's listener;
    None when the daemon does not take it (then notices come with replies
    only, and this client is not asked to give memory back)."""
    sock = dealer_socket()
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES * 64)
        sock.connect(f"ipc://{socket_path}")
        sock.send(encode([int(Op.LISTEN), FREE_ID_BIT, session, token]))
        if not sock.poll(int(_LISTEN_TIMEOUT_S * 1000), zmq.POLLIN):
            raise TimeoutError
        reply = decode(sock.recv())
        if not isinstance(reply, list) or not reply or reply[0] != OK:
            raise ValueError(reply)
    except Exception:  # noqa: BLE001 - no push socket: the client works as before
        sock.close(linger=0)
        return None
    sub = Subscription(sock, *_answers(cache, transport))
    _the_listener().add(sub)
    return sub


def unsubscribe(sub: Subscription, pid: int) -> None:
    """Close a push socket (by the listener thread); not a parent's after fork."""
    listener = _listener
    if listener is not None and listener.pid == pid == os.getpid():
        listener.remove(sub)


def _stop_at_exit() -> None:
    listener = _listener
    if listener is not None and listener.pid == os.getpid():
        listener.stop(0.5)


atexit.register(_stop_at_exit)
