"""Which daemon this process uses when a call names none: the process default.

`shmarena.dumps`, `loads`, `discard`, `share`, `attach_array`, `Queue`,
`SharedMemory` and `ShareableList` take an optional `client`; without one they
use the process default, found in this order (the first that applies wins):

1. the daemon named in the call itself (a pickled Queue or SharedMemory
   carries its daemon; a `client=` argument is that client);
2. the client given to `shmarena.set_default(client)` (that client itself,
   while it is open in this process; after it was closed, or in a forked
   child, a separate client of its daemon);
3. the daemon of the first `shmarena.connect(...)` / `Client(...)` in this
   process, whatever its name and runtime dir;
4. $SHMARENA_NAME and $SHMARENA_RUNTIME_DIR, else "default" in the usual
   runtime dir.

A forked child keeps its parent's choice of daemon (never its session: it
connects anew). A spawned child starts with no choice and connects or calls
`set_default` itself; a Queue or SharedMemory sent to it names its daemon.
Shutting a daemon down through a client of this process (`client.shutdown()`)
forgets it as the default, so the next connect chooses again.

This module only records the choice; client/default.py makes the clients.
It must import no client module: client.py reports every connect here.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shmarena.client.client import Client

__all__ = ["chosen_daemon", "forget", "given_client", "note_connect", "quietly", "set_given"]

Daemon = tuple[str, str]  # (name, runtime dir), as resolved by Client

_LOCK = threading.Lock()
_first: Daemon | None = None  # the first connect's daemon
_given: Client | None = None  # set_default's client
_given_pid = 0  # the process that called set_default
_quiet = threading.local()  # set while client/default.py connects


@contextlib.contextmanager
def quietly() -> Iterator[None]:
    """Connects in this block (this thread) are not a process's first
    connect: the default clients' own connects choose nothing."""
    _quiet.on = True
    try:
        yield
    finally:
        _quiet.on = False


def note_connect(name: str, runtime_dir: str) -> None:
    """Called by every Client once connected: the first one (not made
    `quietly`) chooses the process default daemon."""
    global _first
    if _first is None and not getattr(_quiet, "on", False):
        with _LOCK:
            if _first is None:
                _first = (name, runtime_dir)


def set_given(client: Client | None) -> None:
    """`shmarena.set_default`: `client` is the process default; None forgets
    both it and the first connect's choice."""
    global _given, _given_pid, _first
    with _LOCK:
        _given, _given_pid = client, os.getpid()
        if client is None:
            _first = None


def given_client() -> Client | None:
    """set_default's client, if this process may use it as it is (open, and
    not inherited by fork: a child must not use its parent's session)."""
    client = _given
    if client is None or _given_pid != os.getpid() or client._closed:
        return None
    return client


def chosen_daemon() -> Daemon | None:
    """The daemon set_default or the first connect chose, or None."""
    client = _given
    if client is not None:
        return (client.name, client.runtime_dir)
    return _first


def forget(name: str, runtime_dir: str) -> None:
    """That daemon is gone (shut down from this process): it stops being
    the default, and the next connect chooses again."""
    global _first, _given
    with _LOCK:
        if _first == (name, runtime_dir):
            _first = None
        if _given is not None and (_given.name, _given.runtime_dir) == (name, runtime_dir):
            _given = None
