"""The client a process uses when the caller names none.

`shmarena.dumps`, `shmarena.Queue`, `shmarena.share` and the stdlib drop-ins
take an optional `client`; without one they use the process default daemon
(client/chosen.py has the rule: set_default's client, else the first
connect's daemon, else $SHMARENA_NAME). Given by `set_default`, that client
itself is used. Otherwise they share one client per daemon per process, made
on first use and made again in a forked child (a child must not use its
parent's session). These shared clients keep no cache, so a block handed to
a queue or a message and then freed goes back to the daemon, never to a
cache that would hand it out again at once; and their own connects choose no
default.
"""

from __future__ import annotations

import os
import threading

from shmarena.client import chosen
from shmarena.client.client import Client, connect
from shmarena.config import resolve_name
from shmarena.config import runtime_dir as default_runtime_dir

__all__ = [
    "close_default_clients",
    "default_client",
    "default_daemon",
    "get_default",
    "set_default",
]

_LOCK = threading.Lock()
_CLIENTS: dict[tuple[str, str, int], Client] = {}


def default_daemon(name: str | None = None, runtime_dir: str | None = None) -> tuple[str, str]:
    """The daemon (name, runtime dir) a call naming `name`/`runtime_dir` (or
    neither) means, resolved now: what the call names, else the process
    default (see client/chosen.py), else the environment."""
    if name is None and runtime_dir is None:
        picked = chosen.chosen_daemon()
        if picked is not None:
            return picked
    return (
        resolve_name(name, os.environ),
        runtime_dir or default_runtime_dir(os.environ, os.getuid()),
    )


def default_client(name: str | None = None, runtime_dir: str | None = None) -> Client:
    """This process's client of the daemon `name` (by default the process
    default daemon): the client given to `shmarena.set_default` if it is of
    that daemon and open here, else a shared uncached one."""
    given = chosen.given_client()
    where = default_daemon(name, runtime_dir)
    if given is not None and (given.name, given.runtime_dir) == where:
        return given
    key = (*where, os.getpid())
    client = _CLIENTS.get(key)
    if client is not None and not client._closed:
        return client
    with _LOCK:
        client = _CLIENTS.get(key)
        if client is None or client._closed:
            for old in [k for k in _CLIENTS if k[2] != key[2]]:
                del _CLIENTS[old]  # a parent's, inherited by fork
            with chosen.quietly():  # the default's own connect chooses nothing
                client = connect(
                    where[0], runtime_dir=where[1], cache=False, label="shmarena-default"
                )
            _CLIENTS[key] = client
        return client


def set_default(client: Client | None) -> None:
    """Make `client` this process's default: `shmarena.dumps`, `loads`,
    `discard`, `share`, `attach_array`, `Queue`, `SharedMemory` and
    `ShareableList` called without `client=` use it (a forked child, or any
    call after it was closed, uses a separate client of its daemon).
    `set_default(None)` forgets the choice, the first connect's too: the
    environment ($SHMARENA_NAME) applies again until the next connect.

    Without a call to set_default, the first `shmarena.connect(...)` in the
    process chooses the default daemon. An explicit `client=` (or a Queue's
    or SharedMemory's own daemon) always wins over the default."""
    if client is not None and not isinstance(client, Client):
        raise TypeError(
            f"shmarena.set_default takes a shmarena.Client or None, got {type(client).__name__}; "
            "pass the client that shmarena.connect(...) returned"
        )
    chosen.set_given(client)


def get_default() -> Client:
    """The client calls without `client=` use now (connecting a shared one
    to the default daemon if there is none yet; DaemonUnavailable if that
    daemon is not running)."""
    return default_client()


def close_default_clients(name: str | None = None, runtime_dir: str | None = None) -> None:
    """Close this process's shared clients of that daemon (its session ends:
    what it held goes back), e.g. before the daemon is stopped. A client
    given to set_default is the caller's to close."""
    with _LOCK:
        client = _CLIENTS.pop((*default_daemon(name, runtime_dir), os.getpid()), None)
    if client is not None:
        client.close()
