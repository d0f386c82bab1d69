"""The loop's wait: one epoll over every descriptor, ZeroMQ sockets included. I/O.

`zmq.Poller.poll` asks each socket for its state and makes two poll system
calls per call (a look without waiting, then the wait), through a Python
wrapper that builds its lists each time; with a pidfd per client it walks
them all on every wake-up. This poller keeps one epoll set instead, so a
wake-up costs one epoll_wait whatever the number of descriptors, and asks
a ZeroMQ socket for its state only when that can have changed.

A ZeroMQ socket's descriptor (`zmq.FD`) is edge-triggered and says only
"look at `zmq.EVENTS`": a message can be waiting while it stays quiet (the
socket took the signal in a send, say). So a socket the loop sends on is
looked at before every wait (`always`), and the wait does not block while
it has a message. Any other socket is looked at when its descriptor fired,
and from its registration or from a report that it is readable on, until it
says it has nothing: its descriptor signals a new message only after a look
found none (the pipe's reader went to sleep), so a socket never looked at
could fill up unseen (the monitor socket's events, which then stall the I/O
thread).

It is a `zmq.Poller` to whoever registers with it (liveness.Watcher adds
its pidfds), with the same `register`, `unregister` and `poll`.
"""

from __future__ import annotations

import contextlib
import select
from typing import Any

import zmq

# Plain ints: zmq's are IntFlags, whose `&` runs through enum's Python code.
POLLIN = int(zmq.POLLIN)
EVENTS = int(zmq.EVENTS)


class EpollPoller(zmq.Poller):
    """`zmq.Poller`'s interface over one epoll set (see the module's docstring).
    Only readability is watched: the loop registers for nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self._epoll = select.epoll()
        # Sockets typed Any: their getsockopt says int | bytes, and FD and
        # EVENTS are ints.
        self._sockets: dict[int, Any] = {}  # its descriptor -> a ZeroMQ socket
        self._always: list[tuple[int, Any]] = []  # looked at before every wait
        self._sticky: set[int] = set()  # sockets reported readable: look again

    def register(self, socket: Any, flags: int = POLLIN, always: bool = False) -> None:  # noqa: ARG002
        """Watch a ZeroMQ socket, a descriptor or an object with `fileno()`
        for readability (`flags` is zmq.Poller's: readability is all the
        loop asks for); `always`: a socket the loop also sends on."""
        fd: int
        if isinstance(socket, zmq.Socket):
            fd = int(socket.getsockopt(zmq.FD))
            self._sockets[fd] = socket
            if always:
                self._always.append((fd, socket))
            else:  # its state is not known yet (see the module's docstring)
                self._sticky.add(fd)
        else:
            fd = socket if isinstance(socket, int) else socket.fileno()
        self._epoll.register(fd, select.EPOLLIN)

    def unregister(self, socket: Any) -> None:
        """Stop watching it (a descriptor closed meanwhile is simply forgotten)."""
        fd: int
        if isinstance(socket, zmq.Socket):
            fd = int(socket.getsockopt(zmq.FD))
            self._sockets.pop(fd, None)
            self._sticky.discard(fd)
            self._always = [(f, s) for f, s in self._always if s is not socket]
        else:
            fd = socket if isinstance(socket, int) else socket.fileno()
        with contextlib.suppress(OSError, ValueError):  # closed already: the kernel dropped it
            self._epoll.unregister(fd)

    def poll(self, timeout: float | None = None, checked: bool = False) -> list[tuple[Any, int]]:
        """Wait up to `timeout` ms (None or negative: without end) for something
        readable; (socket or descriptor, POLLIN) for each. `checked`: the
        caller read EVENTS of the `always` sockets as not readable and did
        nothing on them since, so they are not looked at again before the
        wait (each look is a system call in ZeroMQ)."""
        ready: list[tuple[Any, int]] = []
        looked: set[int] = set()  # sockets whose state is known now
        for fd, socket in () if checked else self._always:
            looked.add(fd)
            if socket.getsockopt(EVENTS) & POLLIN:
                ready.append((socket, POLLIN))
        for fd in list(self._sticky):
            looked.add(fd)
            if self._sockets[fd].getsockopt(EVENTS) & POLLIN:
                ready.append((self._sockets[fd], POLLIN))
            else:
                self._sticky.discard(fd)
        if ready:  # no wait: what is known stays known
            fired = self._epoll.poll(0.0)
        else:  # after a wait, a fired socket is looked at again
            fired = self._epoll.poll(-1.0 if timeout is None or timeout < 0 else timeout / 1000)
            looked.clear()
        for fd, _ in fired:
            socket = self._sockets.get(fd)
            if socket is None:
                ready.append((fd, POLLIN))
            elif fd not in looked and socket.getsockopt(EVENTS) & POLLIN:
                if all(fd != always for always, _ in self._always):
                    self._sticky.add(fd)
                ready.append((socket, POLLIN))
        return ready

    def close(self) -> None:
        """Close the epoll descriptor."""
        self._epoll.close()
