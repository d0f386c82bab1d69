"""One DEALER socket to the daemon: request ids, timeouts, one-way posts,
several requests in flight at once, and the ONE place where an error reply
becomes an exception.

A Transport is safe to share between threads, and a thread waiting for its
reply never holds up another thread's request: a request waiting in the
daemon (a Queue.get, a subscription, a lookup with a timeout) is one request
in flight among others on the same socket, its reply matched by request id.
Every socket call happens under one short lock. Of the threads waiting for a
reply, one at a time (the reader) waits on the socket's file descriptor
without the lock, then reads what came and hands each reply to the call it
answers; when its own reply is there it passes the reading role on to
another waiting thread (leader/follower: no thread of its own, no thread
hop on a plain request). ZeroMQ's descriptor is edge triggered: after every
socket call `zmq.EVENTS` is read and what came handed out before anyone waits
on it again; a thread that hands the reader its reply wakes it through a pipe.
Its socket comes from the process's one ZeroMQ Context (client/context.py);
after fork() the client makes a new Transport instead of touching this one.

One-way requests (POST: batched bookkeeping and frees) get no reply when they
succeed. A refusal comes back later as a LATE_ERR reply; it is kept and raised
by the next request, before that request is sent, so the refusal is never
mistaken for the answer to something else and no result is lost to it.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import select
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import zmq

from shmarena.client.context import dealer_socket
from shmarena.client.reach import check_reachable, refusing
from shmarena.config import DEFAULT_RETRY_S
from shmarena.errors import (
    DaemonUnavailable,
    ProtocolError,
    Resend,
    SessionLost,
    ShmArenaError,
    from_wire,
)
from shmarena.limits import MAX_FRAME_BYTES, MAX_FRAMES
from shmarena.protocol import FREE_ID_BIT, LATE_ERR, OK, SEQUENCED_OPS, Op, decode, encoder


def _no_events() -> list[list[int]]:
    return []


def _no_orphans(op: Op, args: tuple[Any, ...], result: list[Any]) -> None:
    pass


# Requests whose result holds memory: if the answer comes after the caller
# gave up (DaemonUnavailable from a daemon that was only slow), the result is
# handed to `Transport.orphan` so the memory is given back, not leaked.
ALLOCATING_OPS = frozenset({Op.ALLOC, Op.ALLOC_MANY, Op.FILL})
MAX_ORPHANS = 256
# Frames of state-changing requests are kept until a reply shows the daemon
# has them (see Transport.unconfirmed); past this many, a flush asks for one.
MAX_UNCONFIRMED = 256
# Plain ints: pyzmq's enum members cost microseconds per operation on the
# path of every request.
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)


# Fault injection for tests (see docs/reliability.md, "Testing faults"): with
# SHMARENA_FAULT=POINT:OP[#N] this process SIGKILLs itself at POINT of its
# Nth request of kind OP (default the first). POINT is before_send (nothing
# sent yet), after_send (sent, reply not read) or after_reply (the daemon
# acted and answered; the caller never sees it). OP is an op name in lower
# case (hello, alloc, alloc_many, fill, owner, recycle, sync, ...) or post
# for the one-way messages that carry cache bookkeeping and frees (points
# before_send, and after_send for a post sent on its own by the flusher).
FAULT_POINTS = ("before_send", "after_send", "after_reply")


def _parse_fault(text: str | None) -> list[Any] | None:
    if not text:
        return None
    match = re.fullmatch(r"\s*(\w+):(\w+)(?:#(\d+))?\s*", text)
    if not match or match.group(1) not in FAULT_POINTS:
        raise ValueError(
            f"SHMARENA_FAULT={text!r} is not POINT:OP[#N] with POINT one of "
            f"{', '.join(FAULT_POINTS)}; unset it unless you are testing shmarena"
        )
    point, op, nth = match.groups()
    return [point, op.lower(), int(nth or 1)]


_FAULT = _parse_fault(os.environ.get("SHMARENA_FAULT"))


def _fault(point: str, op: str) -> None:
    """Kill this process if the fault hook names this point of this op."""
    fault = _FAULT
    if fault is None or fault[1] != op:
        return
    if point == "before_send":  # count each request once, at its first point
        fault[2] -= 1
    if fault[0] == point and fault[2] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)


class Call:
    """One request in flight: its frame (sent again, same id, while no reply
    comes), the highest sequence number sent up to and with it (its reply
    shows the daemon applied every number up to that one), and its reply
    once the reader handed it over."""

    __slots__ = ("request_id", "op", "args", "frame", "high", "reply", "notify")

    def __init__(self, request_id: int, op: Op, args: tuple[Any, ...], frame: bytes, high: int):
        self.request_id = request_id
        self.op = op
        self.args = args
        self.frame = frame
        self.high = high
        self.reply: list[Any] | None = None
        # For a call waited for by an event loop (see `start`): told, from
        # any thread and under the lock, when its reply came or the socket closed.
        self.notify: Callable[[], None] | None = None


class Transport:
    """The client's one socket to its daemon, shared by all its threads (see
    the module docstring): `request` sends one request and waits for its
    reply, `flush` sends queued bookkeeping, `close` closes the socket."""

    def __init__(
        self,
        socket_path: str,
        name: str,
        timeout_s: float,
        retry_s: float = DEFAULT_RETRY_S,
        follow: Transport | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.name = name
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        # The uid the daemon runs as (its runtime dir's owner): the client
        # maps only segments of that uid.
        self.daemon_uid = check_reachable(socket_path, name)
        sock = dealer_socket()
        # A routing id of our own, secret like a token: a daemon that restarts
        # on a persistent arena knows this socket again when it reconnects.
        self.routing_id = b"\x01" + os.urandom(15)
        sock.setsockopt(zmq.ROUTING_ID, self.routing_id)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES * 64)
        sock.connect(f"ipc://{socket_path}")
        self.socket = sock
        # The reader waits on the socket's descriptor and on a pipe another
        # thread writes to when it handed the reader its reply (or closed).
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller = select.poll()
        self._fd = int(sock.getsockopt(zmq.FD))
        self._poller.register(self._fd, select.POLLIN)
        self._poller.register(self._wake_r, select.POLLIN)
        # A Transport dropped unclosed in a reference cycle: close its socket
        # and pipe (never a parent's after fork).
        self._finalizer = weakref.finalize(
            self, _close_dropped, sock, (self._wake_r, self._wake_w), os.getpid()
        )
        self._finalizer.atexit = False  # at exit, Client closes what it must flush
        self.lock = threading.Lock()
        self._turn = threading.Condition(self.lock)  # a reply came, or the reader left
        self._calls: dict[int, Call] = {}  # request id -> call in flight
        self._reader: Call | None = None  # the call whose thread reads the socket
        # State-changing requests are numbered 1, 2, ... per session (the
        # daemon applies each number once, in order); others use free ids.
        # Sent frames stay in `unconfirmed` until a reply shows the daemon
        # applied them: a daemon restarted from a persistent table may have
        # lost the last ones, and asks for them again (Resend).
        self.next_id = 1
        self.next_free = FREE_ID_BIT
        self.unconfirmed: list[tuple[int, bytes]] = []
        if follow is not None:  # the same session from a new socket
            self.next_id = follow.next_id
            self.unconfirmed = list(follow.unconfirmed)
        # Sequenced calls a caller was waiting for when this socket closed:
        # sent again from the socket that follows this one
        # with their own id, so a request the daemon keeps is not made twice
        # (its reply goes to the session's new socket: see `_adopt`).
        self._dropped: list[Call] = []
        self._predecessor = follow
        self.resent = 0  # requests sent again: unanswered ones, and lost ones
        self._resent_after: tuple[int, float] = (-1, 0.0)  # (seen, when) of the last Resend
        self.closed = False
        self.encode = encoder()
        # Called under the lock before anything is sent: bookkeeping that must
        # reach the daemon first (the client's cache events), as POST bodies.
        self.pending: Callable[[], list[list[int]]] = _no_events
        self.late: list[ShmArenaError] = []
        # request id -> (op, args) of allocating requests given up on; and what
        # to do with their results should they come after all.
        self.given_up: dict[int, tuple[Op, tuple[Any, ...]]] = {}
        self.orphan: Callable[[Op, tuple[Any, ...], list[Any]], None] = _no_orphans

    def request(
        self, op: Op, *args: Any, timeout_s: float | None = None, late: bool = True
    ) -> list[Any]:
        """Send one request and wait for its reply; returns the result items.

        Other threads' requests go out and get their replies meanwhile. An
        unanswered request is sent again (same id) every `retry_s`: the
        daemon answers a repeat from its reply cache, so it never runs twice.
        Raises the daemon's error as its exception class, or DaemonUnavailable
        when no reply comes within the timeout. First, unless `late` is False,
        raises the refusal of an earlier one-way request, if one came back.
        """
        timeout = self.timeout_s if timeout_s is None else timeout_s
        self.lock.acquire()
        try:
            self._check_open()
            if late:
                self._raise_late()
            call = self._send(op, args)
        except BaseException:
            self.lock.release()
            raise
        reply = self._await(call, timeout)  # releases the lock
        if _FAULT is not None:
            _fault("after_reply", op.name.lower())
        if reply[0] == OK:
            return reply[2:]
        raise _error(reply)

    def _send(self, op: Op, args: tuple[Any, ...]) -> Call:
        """Number, send and register one request (under the lock)."""
        self._send_pending(more=True)
        call = self._adopt(op, args)
        if call is not None:
            request_id, frame = call.request_id, call.frame
        elif op in SEQUENCED_OPS:
            request_id = self.next_id
            self.next_id += 1
            frame = self.encode([int(op), request_id, *args])
            self.unconfirmed.append((request_id, frame))
        else:
            request_id = self.next_free
            self.next_free += 1
            frame = self.encode([int(op), request_id, *args])
        if call is None:
            call = Call(request_id, op, args, frame, self.next_id - 1)
        self._calls[request_id] = call
        if _FAULT is not None:
            _fault("before_send", op.name.lower())
        try:
            self.socket.send(frame)
        except BaseException:
            del self._calls[request_id]
            raise
        if _FAULT is not None:
            _fault("after_send", op.name.lower())
        return call

    def _adopt(self, op: Op, args: tuple[Any, ...]) -> Call | None:
        """A call the socket this one follows dropped as it closed, if this
        request repeats it (same op, same arguments but for the wait): sent
        again as it was, same id; the caller that retries gets its reply."""
        before = self._predecessor
        if before is None or op not in SEQUENCED_OPS:
            return None
        calls = before._dropped
        for index, call in enumerate(calls):
            if call.op is op and _fixed(call.args) == _fixed(args):
                del calls[index]
                call.reply = None
                return call
        return None

    def _drop(self, call: Call) -> None:
        """Keep a sequenced call the closing of this socket cut short, for
        the socket that follows it (see `_adopt`)."""
        if call.request_id < FREE_ID_BIT:
            self._dropped.append(call)

    def _await(self, call: Call, timeout: float) -> list[Any]:
        """The reply to `call` (not a Resend): read the socket as the reader,
        or wait for the reader to hand it over; send it again every
        `retry_s`; DaemonUnavailable at the deadline. Entered with the lock
        held (the send and the first wait need no second acquire), leaves
        without it."""
        lock = self.lock
        step = min(timeout, self.retry_s)
        retry_at = deadline = 0.0  # set at the first wait
        readable = False  # the descriptor said something came
        try:
            while True:
                self._drain(call, readable)  # after every socket call, before any wait
                readable = False
                if call.reply is not None:
                    reply = self._take(call)
                    if reply is not None:
                        return reply
                now = time.monotonic()
                if not retry_at:
                    retry_at, deadline = now + step, now + timeout
                elif now >= retry_at:
                    if now >= deadline:
                        raise self._give_up(call, timeout)
                    self.resent += 1
                    self.socket.send(call.frame)  # the same id: a repeat is answered, not re-run
                    retry_at = now + step
                    continue
                if self._reader is None or self._reader is call:
                    self._reader = call
                    lock.release()
                    try:
                        readable = self._poll(retry_at - now)
                    finally:
                        lock.acquire()
                else:
                    self._turn.wait(retry_at - now)
                if self.closed:
                    self._drop(call)
                    self._check_open()
        finally:
            self._calls.pop(call.request_id, None)
            if self._reader is call:
                self._reader = None
                if self.closed:
                    self._close_pipe()
                elif self._calls:
                    self._turn.notify_all()  # one of them reads next
            lock.release()

    def _poll(self, seconds: float) -> bool:
        """Wait (without the lock) until the socket may have something, a
        thread woke the reader, or `seconds` passed; whether the socket's
        descriptor was readable."""
        readable = False
        for fd, _ in self._poller.poll(max(1, math.ceil(seconds * 1000))):
            if fd == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(fd, 4096)
            else:
                readable = True
        return readable

    def _drain(self, me: Call | None, readable: bool = False) -> None:
        """Hand every reply that came to its call (under the lock, after any
        socket call: the descriptor signals only new arrivals). `me` is the
        calling thread's own call, if any; `readable`: the descriptor just
        said something came, so try a read before asking EVENTS."""
        sock = self.socket
        woken = False
        while readable or int(sock.getsockopt(_EVENTS)) & _POLLIN:
            readable = False
            try:
                reply = decode(sock.recv(_NOBLOCK))
            except zmq.Again:
                break  # the descriptor spoke of something else
            if not isinstance(reply, list) or len(reply) < 2:
                raise ProtocolError(f"malformed reply from the daemon: {reply!r:.80}")
            call = self._calls.get(reply[1])
            if call is None:
                self._keep_if_late(reply)  # or a late reply to a request given up on
                continue
            call.reply = reply
            if call is me and len(self._calls) == 1:
                # Nobody else waits: leave the rest for the next caller, who
                # reads EVENTS before waiting (saves a call on every request).
                break
            if call is not me:
                if call.notify is not None:
                    call.notify()
                elif call is self._reader:
                    self._wake()
                else:
                    woken = True
        if woken:
            self._turn.notify_all()

    def _take(self, call: Call) -> list[Any] | None:
        """The reply handed to `call`, unless there is none yet or it asks for
        lost frames again (then they are sent, and the wait goes on)."""
        reply = call.reply
        while reply is not None and reply[0] != OK and len(reply) > 2 and reply[2] == Resend.code:
            call.reply = None
            self._resend(reply)
            self._drain(call)  # the sends may have taken the descriptor's signal
            reply = call.reply
        if reply is None:
            return None
        call.reply = None
        # The daemon applied every number up to this call's: forget their frames.
        unconfirmed = self.unconfirmed
        if unconfirmed and unconfirmed[-1][0] <= call.high:
            unconfirmed.clear()
        elif unconfirmed:
            count = next(
                (i for i, (rid, _) in enumerate(unconfirmed) if rid > call.high), len(unconfirmed)
            )
            del unconfirmed[:count]
        return reply

    def _give_up(self, call: Call, timeout: float) -> DaemonUnavailable:
        if call.op in ALLOCATING_OPS:
            self.given_up[call.request_id] = (call.op, call.args)
            if len(self.given_up) > MAX_ORPHANS:
                del self.given_up[next(iter(self.given_up))]
        return DaemonUnavailable(
            f"daemon {self.name!r} did not answer {call.op.name.lower()} within "
            f"{timeout:g} s at {self.socket_path}; "
            + (refusing(self.socket_path) or "is it running (`shmarena status`)?"),
            socket_path=self.socket_path,
        )

    # -- for a caller that waits elsewhere (an event loop: shmarena/aio.py) --

    @property
    def fd(self) -> int:
        """The descriptor to watch for replies (edge triggered: call `pump`
        when it is readable, and `check` after every wake-up)."""
        return self._fd

    def start(self, op: Op, args: tuple[Any, ...], notify: Callable[[], None]) -> Call:
        """Send a request without waiting for it (after raising a refusal of
        an earlier one-way request, if one came back); `notify` is called
        from any thread when its reply came or the socket closed. Its
        owner then calls `check`, `resend` every `retry_s`, and `forget`."""
        with self.lock:
            self._check_open()
            self._raise_late()
            call = self._send(op, args)
            call.notify = notify
            self._drain(call)
            return call

    def check(self, call: Call) -> list[Any] | None:
        """The result items of `call` (raising the daemon's error), or None
        while none came; DaemonUnavailable once the socket is closed."""
        with self.lock:
            if self.closed:
                self._drop(call)
            self._check_open()
            self._drain(call)
            reply = self._take(call)
        if reply is None:
            return None
        if reply[0] == OK:
            return reply[2:]
        raise _error(reply)

    def resend(self, call: Call, timeout: float, overdue: bool) -> None:
        """Send `call` again (same id); with `overdue`, give up on it instead
        (DaemonUnavailable, as `request` does after `timeout` seconds)."""
        with self.lock:
            self._check_open()
            if overdue:
                self._calls.pop(call.request_id, None)
                raise self._give_up(call, timeout)
            self.resent += 1
            self.socket.send(call.frame)
            self._drain(call)

    def forget(self, call: Call) -> None:
        """Its caller no longer waits for it: a reply is dropped as a late one."""
        with self.lock:
            self._calls.pop(call.request_id, None)

    def pump(self) -> None:
        """Hand out whatever replies came (an event loop's reader callback)."""
        with self.lock:
            if not self.closed:
                self._drain(None)

    def flush(self) -> None:
        """Send the pending bookkeeping now, without waiting for anything
        (unless many frames wait for confirmation: then a ping confirms them)."""
        with self.lock:
            if self.closed:
                return
            self._send_pending()
            self._drain(None)
            confirm = len(self.unconfirmed) > MAX_UNCONFIRMED
        if confirm:
            self.request(Op.PING, late=False)

    def _resend(self, reply: list[Any]) -> None:
        """The daemon lost frames (it restarted): send again, in order, every
        unconfirmed frame after the last one it applied."""
        error = _error(reply)
        seen = error.details.get("seen")
        if not isinstance(seen, int):
            raise ProtocolError(f"malformed resend request from the daemon: {error}")
        if seen >= self.next_id - 1:
            return  # it has every one of them
        # Every frame after a gap is refused with the same request; answer
        # them once (again after retry_s, should the frames be lost again).
        now = time.monotonic()
        last_seen, last_time = self._resent_after
        if seen == last_seen and now - last_time < self.retry_s:
            return
        self._resent_after = (seen, now)
        missing = [frame for rid, frame in self.unconfirmed if rid > seen]
        if not self.unconfirmed or self.unconfirmed[0][0] > seen + 1:
            raise SessionLost(
                f"the daemon {self.name!r} lost requests {seen + 1}.. of this session that "
                "this client no longer has; the session cannot go on. The client opens a "
                "new session on its next call",
                reason="restarted",
            )
        for frame in missing:
            self.socket.send(frame)
        self.resent += len(missing)

    def raise_late(self) -> None:
        """Raise a refusal of an earlier one-way request, if one came back."""
        with self.lock:
            if not self.closed:
                self._raise_late()

    def _send_pending(self, more: bool = False) -> None:
        """Send the queued posts; with `more`, the last of them go as the first
        frames of the message whose final frame the caller sends next."""
        frames = []
        for events in self.pending():
            frame = self.encode([int(Op.POST), self.next_id, events])
            self.unconfirmed.append((self.next_id, frame))
            self.next_id += 1
            frames.append(frame)
        if _FAULT is not None and frames:
            _fault("before_send", "post")
        send = self.socket.send
        room = MAX_FRAMES - 1 if more else MAX_FRAMES  # the daemon's limit per message
        while len(frames) > room:  # rare: a very large backlog
            group, frames = frames[:MAX_FRAMES], frames[MAX_FRAMES:]
            for frame in group[:-1]:
                send(frame, zmq.SNDMORE)
            send(group[-1])
        for index, frame in enumerate(frames):
            send(frame, zmq.SNDMORE if more or index < len(frames) - 1 else 0)
        if _FAULT is not None and frames and not more:
            _fault("after_send", "post")

    def _keep_if_late(self, reply: list[Any]) -> None:
        if reply[0] == LATE_ERR:
            if len(reply) > 2 and reply[2] == Resend.code:
                self._resend(reply)
                return
            self.late.append(_error(reply))
        elif self.given_up:
            request = self.given_up.pop(reply[1], None)
            if request is not None and reply[0] == OK:
                self.orphan(request[0], request[1], reply[2:])

    def _raise_late(self) -> None:
        self._drain(None)
        if self.late:
            # A lost session explains every other refusal: it goes first.
            lost = [e for e in self.late if isinstance(e, SessionLost)]
            if lost:
                self.late.clear()
                raise lost[0]
            first, rest = self.late[0], len(self.late) - 1
            self.late.clear()
            if rest:
                first.message = f"{first.message} (and {rest} more refusals)"
                first.args = (first.message,)
            raise first

    def _check_open(self) -> None:
        if self.closed:
            raise DaemonUnavailable(
                f"this client of daemon {self.name!r} is closed; connect again",
                socket_path=self.socket_path,
            )

    def close(self, wait_s: float | None = None, linger_s: float = 0.0) -> None:
        """Close the socket (never the process's Context); requests still in
        flight raise DaemonUnavailable. With `linger_s`, first send the
        pending bookkeeping and give it that long to leave. With `wait_s`,
        give up instead if another thread holds the lock that long (at exit)."""
        if not self.lock.acquire(timeout=-1 if wait_s is None else wait_s):
            return
        try:
            if self.closed:
                return
            self.closed = True
            linger = 0
            if linger_s > 0:
                try:
                    self._send_pending()
                    linger = int(linger_s * 1000)
                except zmq.ZMQError:
                    pass
            self.socket.close(linger=linger)
            self._finalizer.detach()
            if self._reader is None:
                self._close_pipe()  # else the reader closes it as it leaves
            else:
                self._wake()
            self._turn.notify_all()
            for call in self._calls.values():
                if call.notify is not None:
                    call.notify()
        finally:
            self.lock.release()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: it will wake anyway
            os.write(self._wake_w, b"\0")

    def _close_pipe(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)


def _close_dropped(sock: zmq.Socket[Any], pipe: tuple[int, int], pid: int) -> None:
    if os.getpid() == pid and not sock.closed:  # never a parent's socket after fork
        sock.close(linger=0)
        for fd in pipe:
            os.close(fd)


def _fixed(args: tuple[Any, ...]) -> list[Any]:
    """A request's arguments less its wait (the only float among them)."""
    return [arg for arg in args if not isinstance(arg, float)]


def _error(reply: list[Any]) -> ShmArenaError:
    return from_wire(*(reply[2:5] + [None] * (5 - len(reply))))
