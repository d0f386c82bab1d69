"""The daemon's listening socket and its file descriptors. I/O.

libzmq 4.3 aborts the process when accept() on an ipc listener fails with
EMFILE (ipc_listener.cpp's errno_assert). So while fewer than `fd_reserve`
descriptors are left the daemon takes no new connections: it renames its
socket file to `paused_path`, so that no client can reach the listener by
path, while the listener and every connection it accepted live on (an
unbind would close those too). The file gets its name back once `fd_resume`
are free: the reserve, room for a full backlog, and a margin so that it does
not flap (not twice the reserve: under a low limit, the daemon's own
descriptors may never leave that many free). Only the listen backlog (kept
well under the reserve) can still be accepted after the rename. New clients
meanwhile read why in `refusing_path`. The metrics endpoint's connections
come out of the same descriptors: the reserve holds its cap too.
"""

from __future__ import annotations

import contextlib
import os
import resource
from typing import Any

import zmq

from shmarena.daemon.logs import EventLog
from shmarena.daemon.metrics import METRICS_MAX_CONNECTIONS
from shmarena.rundir import write_note


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; the limit now in force.
    Each client costs the daemon two descriptors (its connection, a pidfd)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return int(min(soft, hard))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return int(hard)
    except (OSError, ValueError):
        return int(soft)


def remove(path: str) -> None:
    """Unlink `path` if it is there (never a directory: unlink refuses one)."""
    with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
        os.unlink(path)


def open_fds() -> int:
    """Descriptors this process has open (the limit when it cannot tell)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir used
    except OSError:
        return 1 << 30


class Listener:
    """The socket file clients connect to, paused and resumed by the
    descriptors left (see the module's docstring)."""

    def __init__(self, name: str, socket_path: str, gid: int | None, metrics: bool) -> None:
        self.name = name
        self.socket_path = socket_path
        self.gid = gid
        self.refusing_path = socket_path + ".refusing"
        self.paused_path = socket_path + ".paused"
        self.fd_limit = raise_fd_limit()
        self.fd_reserve = max(8, self.fd_limit // 4)
        if metrics:
            self.fd_reserve += METRICS_MAX_CONNECTIONS
        self.accept_backlog = max(1, min(128, self.fd_reserve // 4))
        self.fd_resume = self.fd_reserve + max(self.accept_backlog + 1, self.fd_reserve // 2)
        self.listening = False

    def has_room(self) -> bool:
        """Whether a descriptor may be spent beyond the reserve (a pidfd)."""
        return self.fd_limit - open_fds() >= self.fd_reserve

    def listen(self, router: zmq.Socket[Any]) -> None:
        """Bind the socket file: 0600, or 0660 and the group's with --group."""
        old_umask = os.umask(0o177 if self.gid is None else 0o117)
        try:
            router.bind(f"ipc://{self.socket_path}")
        finally:
            os.umask(old_umask)
        if self.gid is not None:
            os.chown(self.socket_path, -1, self.gid)
        self.listening = True
        remove(self.refusing_path)

    def check_fds(self, router: zmq.Socket[Any], log: EventLog) -> None:
        """Stop or resume accepting by the descriptors left."""
        free = self.fd_limit - open_fds()
        if self.listening and free < self.fd_reserve:
            self._pause(free, log)
        elif not self.listening and free >= self.fd_resume:
            try:
                os.rename(self.paused_path, self.socket_path)
                self.listening = True
                remove(self.refusing_path)
            except FileNotFoundError:  # someone removed it: listen on a new file
                with contextlib.suppress(zmq.ZMQError):
                    router.unbind(f"ipc://{self.socket_path}")
                self.listen(router)
            log(f"accepting new clients again ({free} file descriptors free)",
                "accept_resumed", fds_free=free)  # fmt: skip

    def _pause(self, free: int, log: EventLog) -> None:
        reason = (
            f"daemon {self.name!r} (pid {os.getpid()}) is not accepting new "
            f"clients: {self.fd_limit - free} of its {self.fd_limit} file descriptors are "
            "in use (two or three per client: a pidfd, the connection, and a second connection "
            "for pushes from a client with a cache); it accepts again when clients leave. "
            "Raise its limit (`ulimit -n` / LimitNOFILE=) to serve more clients at once"
        )
        write_note(self.refusing_path, reason + "\n")
        # Out of reach by path, so clients read why instead of timing out;
        # the connections made through it stay.
        with contextlib.suppress(FileNotFoundError):  # removed by someone: out of reach anyway
            os.rename(self.socket_path, self.paused_path)
        self.listening = False
        log(reason, "accept_paused", "warning", fds_used=self.fd_limit - free,
            fd_limit=self.fd_limit)  # fmt: skip

    def remove_notes(self) -> None:
        """Remove the refusal note and a paused socket file (a clean stop)."""
        remove(self.refusing_path)
        remove(self.paused_path)
