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

__all__ = ["default_client"]

_LOCK = threading.Lock()
_CLIENTS: dict[tuple[str | None, str | None, int], Client] = {}


def default_client(name: str | None = None, runtime_dir: str | None = None) -> Client:
    """This process's shared client of the daemon `name` (default as for
    `shmarena.connect`: $SHMARENA_NAME, else "default")."""
    key = (name, runtime_dir, os.getpid())
    client = _CLIENTS.get(key)
    if client is not None and not client._closed:
        return client
    with _LOCK:
        client = _CLIENTS.get(key)
        if client is None or client._closed:
            for old in [k for k in _CLIENTS if k[2] != key[2]]:
                del _CLIENTS[old]  # a parent's, inherited by fork
            client = _CLIENTS[key] = connect(
                name, runtime_dir=runtime_dir, cache=False, label="shmarena-default"
            )
        return client
