"""shmarena: a shared-memory allocator service for Python processes on one host.

    client = shmarena.connect()          # the daemon named "default"
    buf = client.alloc(65536)            # zero-copy Buffer; buf.view, buf.handle
    other = client.attach(buf.handle)    # the same bytes, from any process
    data = shmarena.dumps(obj)           # uses the process default: the first
                                         # connect's daemon, or shmarena.set_default(c)

This module is the public API, re-exported; nothing else lives here. It imports
only `shmarena._version` itself: every other name is looked up on first use
(PEP 562), so `import shmarena` (and any pure module under it, the daemon's core
included) loads no zmq, msgpack, posix_ipc or mmap until a client is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from shmarena._version import __version__

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
    from shmarena import aio as aio
    from shmarena.client.arrays import attach_array, share
    from shmarena.client.buffer import Buffer, Handle
    from shmarena.client.client import Client, Owner, Recycled, connect
    from shmarena.client.default import get_default, set_default
    from shmarena.client.names import Event, Subscription
    from shmarena.compat import ShareableList, SharedMemory
    from shmarena.errors import (
        AccessDenied,
        DaemonStartError,
        DaemonUnavailable,
        InternalError,
        InvalidRequest,
        LimitReached,
        NameExists,
        OutOfMemory,
        ProtocolError,
        QueueEmpty,
        QueueFull,
        QuotaExceeded,
        SessionLost,
        ShmArenaError,
        StaleHandle,
        UnknownName,
        UnknownOwner,
    )
    from shmarena.pickling import discard, dumps, loads
    from shmarena.queue import Queue
    from shmarena.reader import BufferReader

__all__ = [
    "AccessDenied",
    "Buffer",
    "BufferReader",
    "Client",
    "DaemonStartError",
    "DaemonUnavailable",
    "Handle",
    "Event",
    "InternalError",
    "InvalidRequest",
    "LimitReached",
    "NameExists",
    "OutOfMemory",
    "Owner",
    "ProtocolError",
    "Queue",
    "QueueEmpty",
    "QueueFull",
    "QuotaExceeded",
    "Recycled",
    "SessionLost",
    "ShareableList",
    "SharedMemory",
    "ShmArenaError",
    "StaleHandle",
    "Subscription",
    "UnknownName",
    "UnknownOwner",
    "__version__",
    "attach_array",
    "connect",
    "discard",
    "dumps",
    "get_default",
    "loads",
    "set_default",
    "share",
]

# Where each public name lives: `__getattr__` imports the module on first use.
_LAZY: dict[str, str] = {
    "AccessDenied": "shmarena.errors",
    "attach_array": "shmarena.client.arrays",
    "Buffer": "shmarena.client.buffer",
    "BufferReader": "shmarena.reader",
    "Client": "shmarena.client.client",
    "connect": "shmarena.client.client",
    "DaemonStartError": "shmarena.errors",
    "DaemonUnavailable": "shmarena.errors",
    "discard": "shmarena.pickling",
    "dumps": "shmarena.pickling",
    "Event": "shmarena.client.names",
    "get_default": "shmarena.client.default",
    "Handle": "shmarena.client.buffer",
    "InternalError": "shmarena.errors",
    "InvalidRequest": "shmarena.errors",
    "LimitReached": "shmarena.errors",
    "loads": "shmarena.pickling",
    "NameExists": "shmarena.errors",
    "OutOfMemory": "shmarena.errors",
    "Owner": "shmarena.client.client",
    "ProtocolError": "shmarena.errors",
    "Queue": "shmarena.queue",
    "QueueEmpty": "shmarena.errors",
    "QueueFull": "shmarena.errors",
    "QuotaExceeded": "shmarena.errors",
    "Recycled": "shmarena.client.client",
    "set_default": "shmarena.client.default",
    "SessionLost": "shmarena.errors",
    "share": "shmarena.client.arrays",
    "ShareableList": "shmarena.compat",
    "SharedMemory": "shmarena.compat",
    "ShmArenaError": "shmarena.errors",
    "StaleHandle": "shmarena.errors",
    "Subscription": "shmarena.client.names",
    "UnknownName": "shmarena.errors",
    "UnknownOwner": "shmarena.errors",
}


def __getattr__(name: str) -> Any:
    # shmarena.aio (the asyncio client) is a submodule: `shmarena.aio` and
    # `from shmarena import aio` import it on first use like the names above.
    if name == "aio":
        return importlib.import_module("shmarena.aio")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shmarena' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # found once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, "aio"})
