"""shmarena: a shared-memory allocator service for Python processes on one host.

    client = shmarena.connect()          # the daemon named "default"
    buf = client.alloc(65536)            # zero-copy Buffer; buf.view, buf.handle
    other = client.attach(buf.handle)    # the same bytes, from any process

This module is the public API, re-exported; nothing else lives here.
"""

from typing import Any

from shmarena._version import __version__
from shmarena.client.arrays import attach_array, share
from shmarena.client.buffer import Buffer, Handle
from shmarena.client.client import Client, Owner, Recycled, connect
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
    "loads",
    "share",
]


def __getattr__(name: str) -> Any:
    # shmarena.aio (the asyncio client) loads on first use: a plain
    # `import shmarena` does not pay the ~30 ms of importing asyncio.
    if name == "aio":
        import importlib

        return importlib.import_module("shmarena.aio")
    raise AttributeError(f"module 'shmarena' has no attribute {name!r}")
