"""The process's one ZeroMQ Context, shared by every Client of the process.

A Context owns an I/O thread; one per Client cost two OS threads per Client.
The Context here is made on first use and belongs to the process that made
it: a forked child makes its own on first use and never touches (closes,
terminates or collects) the parent's. A Client's close closes its socket,
never the Context.

At exit, after the clients closed their sockets (client.py's hook runs first:
it is registered later), the Context is terminated so that frames still
queued with a linger (frees of other processes' blocks) leave before the
process does; only when every socket made from it is closed, since a
terminate waits for open sockets for ever.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from typing import Any

import zmq

_lock = threading.Lock()
_context: zmq.Context[Any] | None = None
_pid = 0
_sockets: weakref.WeakSet[zmq.Socket[Any]] = weakref.WeakSet()
# Contexts inherited across fork(): referenced for ever, so the child never
# collects (and so terminates) its parent's.
_inherited: list[zmq.Context[Any]] = []


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


def dealer_socket() -> zmq.Socket[Any]:
    """A new DEALER socket of this process's Context (made now if need be)."""
    global _context, _pid
    with _lock:
        if _context is None or _pid != os.getpid():
            if _context is not None:
                _inherited.append(_context)
                _sockets.clear()  # the parent's: not ours to wait for at exit
            _context, _pid = zmq.Context(), os.getpid()
        sock = _context.socket(zmq.DEALER)
        _sockets.add(sock)
        return sock


def _term_at_exit() -> None:
    """Let lingering frames of closed sockets leave, if no socket is open."""
    context = _context
    if context is None or _pid != os.getpid() or context.closed:
        return
    if any(not sock.closed for sock in list(_sockets)):
        return  # a thread still holds one: never wait for it
    context.term()


atexit.register(_term_at_exit)
