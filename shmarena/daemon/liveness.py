"""Is a client still alive: pidfds, /proc, and who is at the other end of a
connection (the kernel's peer credentials). I/O; decides nothing.

The service asks for a watch (`Watch` effect) when a session begins; the
server opens a pidfd for the client's pid here, after checking that the pid
still names the process that said hello, and polls it: readable means the
process is gone and its session is reclaimed. A process it cannot watch
(gone already, another pid namespace, descriptors short) lives on a lease.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import zmq

from shmarena.daemon.admission import Creds


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks
    since boot. With the pid it names one process for the life of the host."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_groups(pid: int) -> tuple[int, ...]:
    """The supplementary groups of a process (empty when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return ()


def peer_creds(frame: zmq.Frame, group_gid: int | None) -> Creds:
    """Who sent `frame`: libzmq attaches the SO_PEERCRED of an ipc
    connection to each message as "Peer-Address" = "host:UID:GID:PID".
    The supplementary groups are read only when a --group could let a
    process in by one of them. uid -1: not known (refused at hello)."""
    try:
        _, *ids = str(frame.get("Peer-Address")).rsplit(":", 3)
        uid, gid, pid = map(int, ids)
    except (zmq.ZMQError, ValueError, AttributeError):
        return Creds(-1, -1, 0)
    groups: tuple[int, ...] = ()
    if group_gid is not None and gid != group_gid and uid not in (0, os.getuid()):
        groups = process_groups(pid)
    return Creds(uid, gid, pid, groups)


class Watcher:
    """The pidfds of watched clients, registered with the loop's poller."""

    def __init__(self, poller: zmq.Poller, has_room: Callable[[], bool]) -> None:
        self.poller = poller
        self.has_room = has_room  # whether a descriptor may be spent on a pidfd
        self.pidfds: dict[int, int] = {}  # fd -> session id
        self.session_fds: dict[int, int] = {}  # session id -> fd

    def watch(self, session_id: int, pid: int, start_ticks: int) -> bool:
        """Watch a client pid with a pidfd, if it is the process that said
        hello. The pidfd is opened first and the start time checked after, so
        the pidfd cannot refer to a newer process that reused the pid."""
        if not self.has_room():
            return False  # keep the last descriptors for connections: lease instead
        try:
            fd = os.pidfd_open(pid)
        except (OSError, AttributeError, OverflowError, ValueError):
            return False  # gone already, another pid namespace, or no pidfd support
        if process_start_ticks(pid) != start_ticks:
            os.close(fd)
            return False
        self.pidfds[fd] = session_id
        self.session_fds[session_id] = fd
        self.poller.register(fd, zmq.POLLIN)
        return True

    def unwatch(self, session_id: int) -> None:
        """Stop watching a session's process (nothing when it was not)."""
        fd = self.session_fds.pop(session_id, None)
        if fd is not None:
            self.pidfds.pop(fd, None)
            self.poller.unregister(fd)
            os.close(fd)

    def died(self, events: dict[Any, int]) -> list[int]:
        """The sessions whose process the poll says is gone."""
        return [self.pidfds[fd] for fd in events if isinstance(fd, int) and fd in self.pidfds]

    def close(self) -> None:
        """Close every pidfd."""
        for session_id in list(self.session_fds):
            self.unwatch(session_id)
