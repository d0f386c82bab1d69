"""The client a process uses when the caller names none.

`shmarena.dumps`, `shmarena.Queue`, `shmarena.share` and the stdlib drop-ins
take an optional `client`; without one they share one client per daemon per
process, made on first use and made again in a forked child (a child must not
use its parent's session). These clients keep no cache: a block they hand to a
queue or a message may be freed by them while the queue still holds it, and a
cached block would be handed out again at once.
"""

from __future__ import annotations

import os
import threading

from shmarena.client.client import Client, connect
from shmarena.config import resolve_name
from shmarena.config import runtime_dir as default_runtime_dir

__all__ = ["close_default_clients", "default_client"]

_LOCK = threading.Lock()
_CLIENTS: dict[tuple[str, str, int], Client] = {}


def _key(name: str | None, runtime_dir: str | None) -> tuple[str, str, int]:
    # Resolved now, so callers that name the daemon and callers that leave it
    # to the environment share one client of the same daemon.
    return (
        resolve_name(name, os.environ),
        runtime_dir or default_runtime_dir(os.environ, os.getuid()),
        os.getpid(),
    )


def default_client(name: str | None = None, runtime_dir: str | None = None) -> Client:
    """This process's shared client of the daemon `name` (default as for
    `shmarena.connect`: $SHMARENA_NAME, else "default")."""
    key = _key(name, runtime_dir)
    client = _CLIENTS.get(key)
    if client is not None and not client._closed:
        return client
    with _LOCK:
        client = _CLIENTS.get(key)
        if client is None or client._closed:
            for old in [k for k in _CLIENTS if k[2] != key[2]]:
                del _CLIENTS[old]  # a parent's, inherited by fork
            client = _CLIENTS[key] = connect(
                key[0], runtime_dir=key[1], cache=False, label="shmarena-default"
            )
        return client


def close_default_clients(name: str | None = None, runtime_dir: str | None = None) -> None:
    """Close this process's shared clients of that daemon (its session ends:
    what it held goes back), e.g. before the daemon is stopped."""
    with _LOCK:
        client = _CLIENTS.pop(_key(name, runtime_dir), None)
    if client is not None:
        client.close()
