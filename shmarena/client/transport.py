"""One DEALER socket to the daemon: request ids, timeouts, and the ONE place
where an error reply becomes an exception.

A Transport is safe to share between threads (one request at a time, under a
lock). It belongs to the process that made it: after fork() the client makes
a new one instead of touching this one (see client.py).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import zmq

from shmarena.errors import DaemonUnavailable, ProtocolError, from_wire
from shmarena.protocol import MAX_FRAME_BYTES, OK, Op, decode, encode


class Transport:
    def __init__(self, socket_path: str, name: str, timeout_s: float) -> None:
        self.socket_path = socket_path
        self.name = name
        self.timeout_s = timeout_s
        if not os.path.exists(socket_path):
            raise DaemonUnavailable(
                f"no shmarena daemon named {name!r}: socket {socket_path} does not exist; "
                f"start one with `shmarena daemon --name {name}` (or check --name, "
                "SHMARENA_NAME and SHMARENA_RUNTIME_DIR)",
                socket_path=socket_path,
            )
        self.context: zmq.Context[Any] = zmq.Context()
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES * 64)
        sock.connect(f"ipc://{socket_path}")
        self.socket = sock
        self.lock = threading.Lock()
        self.next_id = 1
        self.closed = False

    def request(self, op: Op, *args: Any, timeout_s: float | None = None) -> list[Any]:
        """Send one request and wait for its reply; returns the result items.

        Raises the daemon's error as its exception class, or DaemonUnavailable
        when no reply comes within the timeout.
        """
        timeout = self.timeout_s if timeout_s is None else timeout_s
        with self.lock:
            if self.closed:
                raise DaemonUnavailable(
                    f"this client of daemon {self.name!r} is closed; connect again",
                    socket_path=self.socket_path,
                )
            request_id = self.next_id
            self.next_id += 1
            sock = self.socket
            sock.send(encode([int(op), request_id, *args]))
            deadline_ms = timeout * 1000
            while True:
                if not sock.poll(max(0, int(deadline_ms)), zmq.POLLIN):
                    raise DaemonUnavailable(
                        f"daemon {self.name!r} did not answer {op.name.lower()} within "
                        f"{timeout:g} s at {self.socket_path}; is it running "
                        "(`shmarena status`)?",
                        socket_path=self.socket_path,
                    )
                reply = decode(sock.recv())
                if not isinstance(reply, list) or len(reply) < 2:
                    raise ProtocolError(f"malformed reply from the daemon: {reply!r:.80}")
                if reply[1] != request_id:
                    continue  # a late reply to an earlier request that timed out
                if reply[0] == OK:
                    return reply[2:]
                raise from_wire(*(reply[2:5] + [None] * (5 - len(reply))))

    def close(self, wait_s: float | None = None) -> None:
        """Close the socket (pending messages are dropped). With `wait_s`, give
        up instead if another thread holds the socket that long (at exit)."""
        if not self.lock.acquire(timeout=-1 if wait_s is None else wait_s):
            return
        try:
            if self.closed:
                return
            self.closed = True
            self.socket.close(linger=0)
            self.context.term()
        finally:
            self.lock.release()
