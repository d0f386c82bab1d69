"""One DEALER socket to the daemon: request ids, timeouts, one-way posts, and
the ONE place where an error reply becomes an exception.

A Transport is safe to share between threads (one request at a time, under a
lock). It belongs to the process that made it: after fork() the client makes
a new one instead of touching this one (see client.py).

One-way requests (POST: batched bookkeeping and frees) get no reply when they
succeed. A refusal comes back later as a LATE_ERR reply; it is kept and raised
by the next request, before that request is sent, so the refusal is never
mistaken for the answer to something else and no result is lost to it.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import zmq

from shmarena.config import DEFAULT_RETRY_S
from shmarena.errors import (
    DaemonUnavailable,
    ProtocolError,
    Resend,
    SessionLost,
    ShmArenaError,
    from_wire,
)
from shmarena.protocol import (
    FREE_ID_BIT,
    LATE_ERR,
    MAX_FRAME_BYTES,
    MAX_FRAMES,
    OK,
    SEQUENCED_OPS,
    Op,
    decode,
    encoder,
)
from shmarena.rundir import check_runtime_dir, check_socket


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


# Fault injection for tests (see README, "Fault injection"): with
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


class Transport:
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
        self.context: zmq.Context[Any] = zmq.Context()
        sock = self.context.socket(zmq.DEALER)
        # A routing id of our own, secret like a token: a daemon that restarts
        # on a persistent arena knows this socket again when it reconnects.
        self.routing_id = b"\x01" + os.urandom(15)
        sock.setsockopt(zmq.ROUTING_ID, self.routing_id)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES * 64)
        sock.connect(f"ipc://{socket_path}")
        self.socket = sock
        # A Transport dropped unclosed in a reference cycle: the collector
        # clears weak references before it runs __del__, so the context's own
        # __del__ would no longer see the socket and wait for it for ever.
        # This callback runs before that and closes both.
        self._finalizer = weakref.finalize(self, _close_dropped, sock, self.context, os.getpid())
        self._finalizer.atexit = False  # at exit, Client closes what it must flush
        self.lock = threading.Lock()
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
        self.resent = 0  # requests sent again: unanswered ones, and lost ones
        self._resent_after: tuple[int, float] = (-1, 0.0)  # (seen, when) of the last Resend
        self.closed = False
        self.encode = encoder()
        # Called under the lock before anything is sent: bookkeeping that must
        # reach the daemon first (the client's cache events), as POST bodies.
        self.pending: Callable[[], list[list[int]]] = _no_events
        self.late: list[ShmArenaError] = []
        self.rcvtimeo = -1
        # request id -> (op, args) of allocating requests given up on; and what
        # to do with their results should they come after all.
        self.given_up: dict[int, tuple[Op, tuple[Any, ...]]] = {}
        self.orphan: Callable[[Op, tuple[Any, ...], list[Any]], None] = _no_orphans

    def request(
        self, op: Op, *args: Any, timeout_s: float | None = None, late: bool = True
    ) -> list[Any]:
        """Send one request and wait for its reply; returns the result items.

        An unanswered request is sent again (same id) every `retry_s`: the
        daemon answers a repeat from its reply cache, so it never runs twice.
        Raises the daemon's error as its exception class, or DaemonUnavailable
        when no reply comes within the timeout. First, unless `late` is False,
        raises the refusal of an earlier one-way request, if one came back.
        """
        timeout = self.timeout_s if timeout_s is None else timeout_s
        with self.lock:
            self._check_open()
            sock = self.socket
            if late:
                self._raise_late()
            self._send_pending(more=True)
            if op in SEQUENCED_OPS:
                request_id = self.next_id
                self.next_id += 1
                frame = self.encode([int(op), request_id, *args])
                self.unconfirmed.append((request_id, frame))
            else:
                request_id = self.next_free
                self.next_free += 1
                frame = self.encode([int(op), request_id, *args])
            if _FAULT is not None:
                _fault("before_send", op.name.lower())
            sock.send(frame)
            if _FAULT is not None:
                _fault("after_send", op.name.lower())
            wait_ms = max(1, int(min(timeout, self.retry_s) * 1000))
            if wait_ms != self.rcvtimeo:  # a blocking recv wakes faster than a poll
                sock.setsockopt(zmq.RCVTIMEO, wait_ms)
                self.rcvtimeo = wait_ms
            deadline = 0.0
            while True:
                try:
                    reply_frame = sock.recv()
                except zmq.Again:
                    now = time.monotonic()
                    if not deadline:  # first miss: only now is the clock worth reading
                        deadline = now - wait_ms / 1000 + timeout
                    if now >= deadline:
                        if op in ALLOCATING_OPS:
                            self.given_up[request_id] = (op, args)
                            if len(self.given_up) > MAX_ORPHANS:
                                del self.given_up[next(iter(self.given_up))]
                        raise DaemonUnavailable(
                            f"daemon {self.name!r} did not answer {op.name.lower()} within "
                            f"{timeout:g} s at {self.socket_path}; "
                            + (_refusing(self.socket_path) or "is it running (`shmarena status`)?"),
                            socket_path=self.socket_path,
                        ) from None
                    self.resent += 1
                    sock.send(frame)  # the same id: a repeat is answered, not re-run
                    continue
                reply = decode(reply_frame)
                if not isinstance(reply, list) or len(reply) < 2:
                    raise ProtocolError(f"malformed reply from the daemon: {reply!r:.80}")
                if reply[1] != request_id:
                    self._keep_if_late(reply)
                    continue  # or a late reply to an earlier request that timed out
                if reply[0] != OK and len(reply) > 2 and reply[2] == Resend.code:
                    self._resend(reply)
                    continue
                self.unconfirmed.clear()  # the daemon answers in order: it has all of them
                if _FAULT is not None:
                    _fault("after_reply", op.name.lower())
                if reply[0] == OK:
                    return reply[2:]
                raise _error(reply)

    def flush(self) -> None:
        """Send the pending bookkeeping now, without waiting for anything
        (unless many frames wait for confirmation: then a ping confirms them)."""
        with self.lock:
            if self.closed:
                return
            self._send_pending()
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

    def _collect(self) -> None:
        """Read what already came in (refusals of one-way requests, late
        replies to requests that timed out), without waiting."""
        sock = self.socket
        if not int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:  # cheaper than poll(0)
            return
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply = decode(frame)
            if isinstance(reply, list) and len(reply) >= 2:
                self._keep_if_late(reply)

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
        self._collect()
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
        """Close the socket. With `linger_s`, first send the pending
        bookkeeping and give it that long to leave. With `wait_s`, give up
        instead if another thread holds the socket that long (at exit)."""
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
            self.context.term()
            self._finalizer.detach()
        finally:
            self.lock.release()


def _close_dropped(sock: zmq.Socket[Any], context: zmq.Context[Any], pid: int) -> None:
    if os.getpid() == pid and not sock.closed:  # never a parent's socket after fork
        sock.close(linger=0)
        context.term()


def check_reachable(socket_path: str, name: str) -> int:
    """DaemonUnavailable, saying why, unless the runtime dir and the socket
    may be trusted (see shmarena.rundir), the socket exists and this process
    may connect to it (a refused permission would otherwise look like a
    daemon that never answers). The uid the daemon runs as."""
    run_dir = os.path.dirname(socket_path)
    owner_uid = check_runtime_dir(run_dir, name, socket_path)
    if not os.access(run_dir, os.X_OK) and os.path.isdir(run_dir):
        raise DaemonUnavailable(
            f"cannot reach daemon {name!r}: permission denied on its runtime dir "
            f"{run_dir} ({_describe(run_dir)}; this process runs as uid {os.getuid()}, "
            f"gid {os.getgid()}); run as the daemon's user, or start the daemon with "
            "--group G and run as a member of G",
            socket_path=socket_path,
        )
    refusing = _refusing(socket_path)
    if refusing:
        raise DaemonUnavailable(refusing, socket_path=socket_path)
    if not os.path.exists(socket_path):
        # It may have stopped listening just now (and said why since).
        refusing = _refusing(socket_path)
        if refusing:
            raise DaemonUnavailable(refusing, socket_path=socket_path)
        raise DaemonUnavailable(
            f"no shmarena daemon named {name!r}: socket {socket_path} does not exist; "
            f"start one with `shmarena daemon --name {name}` (or check --name, "
            "SHMARENA_NAME and SHMARENA_RUNTIME_DIR)",
            socket_path=socket_path,
        )
    if owner_uid is None:  # the dir was made after it was checked: check it now
        owner_uid = check_runtime_dir(run_dir, name, socket_path)
        if owner_uid is None:
            raise DaemonUnavailable(
                f"daemon {name!r} stopped listening on {socket_path} just now; try again",
                socket_path=socket_path,
            )
    check_socket(socket_path, name, owner_uid)
    if not os.access(socket_path, os.W_OK):
        if not os.path.exists(socket_path):  # gone between the two checks
            raise DaemonUnavailable(
                _refusing(socket_path)
                or f"daemon {name!r} stopped listening on {socket_path} just now; try again",
                socket_path=socket_path,
            )
        raise DaemonUnavailable(
            f"cannot reach daemon {name!r}: permission denied on its socket {socket_path} "
            f"({_describe(socket_path)}; this process runs as uid {os.getuid()}, gid "
            f"{os.getgid()}); run as the daemon's user, or start the daemon with --group G "
            "and run as a member of G",
            socket_path=socket_path,
        )
    return owner_uid


def _refusing(socket_path: str) -> str:
    """Why the daemon does not take new clients now, if it said so."""
    path = socket_path + ".refusing"
    try:  # never through a link, never blocking on a FIFO
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    with os.fdopen(fd, errors="replace") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return f.read(4096).strip()


def _describe(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot stat: {exc.strerror}"
    return f"mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid}, group gid {st.st_gid}"


def _error(reply: list[Any]) -> ShmArenaError:
    return from_wire(*(reply[2:5] + [None] * (5 - len(reply))))
