"""Requests in flight awaited by an asyncio event loop, without a thread.

A request the daemon may keep (a lookup that waits, a subscription's next
events) is sent on the client's own socket (client/transport.py: `start`)
and awaited in the loop: while any such request of a transport is in flight,
the loop watches the transport's descriptor and hands out what came
(`pump`); a reply that another thread read is handed over the same way and
wakes the awaiting task (`notify`). The task sends its request again every
`retry_s` and gives up at its deadline, as a thread's `request` does.

A cancelled wait whose result would hold something (a lookup's retained
block) is not dropped: it goes on as a task of its own until its reply
comes, and the reply goes to an undo.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable
from typing import Any

from shmarena.client.transport import Call, Transport
from shmarena.protocol import Op

# loop -> descriptor -> (the transport it is of, requests of it in flight)
_watched: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, tuple[Transport, int]]]
_watched = weakref.WeakKeyDictionary()


def _watch(loop: asyncio.AbstractEventLoop, transport: Transport) -> None:
    fds = _watched.setdefault(loop, {})
    owner, count = fds.get(transport.fd, (transport, 0))
    if owner is not transport or count == 0:  # a closed transport's number, reused
        loop.add_reader(transport.fd, transport.pump)
        count = 0
    fds[transport.fd] = (transport, count + 1)


def _unwatch(loop: asyncio.AbstractEventLoop, transport: Transport) -> None:
    fds = _watched.get(loop, {})
    owner, count = fds.get(transport.fd, (None, 0))
    if owner is not transport:
        return  # its number went to another transport meanwhile
    if count > 1:
        fds[transport.fd] = (transport, count - 1)
        return
    del fds[transport.fd]
    with contextlib.suppress(OSError, ValueError):  # closed already
        loop.remove_reader(transport.fd)


async def request(
    transport: Transport,
    op: Op,
    args: tuple[Any, ...],
    timeout_s: float,
    undo: Callable[[list[Any]], Any] | None = None,
) -> list[Any]:
    """Send a request and await its result items (the daemon's refusal is
    raised, DaemonUnavailable after `timeout_s`). Cancelled while in flight,
    with `undo`: the reply, should it still come, goes to `undo`."""
    loop = asyncio.get_running_loop()
    came = asyncio.Event()

    def notify() -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(came.set)

    call = transport.start(op, args, notify)
    waiting = asyncio.ensure_future(_follow(loop, transport, call, came, timeout_s))
    if undo is None:
        return await waiting
    try:
        return await asyncio.shield(waiting)
    except asyncio.CancelledError:
        _ORPHANS.add(waiting)
        waiting.add_done_callback(lambda task: _orphaned(task, undo))
        raise


# Waits cancelled by their callers, referenced until their reply comes.
_ORPHANS: set[asyncio.Future[list[Any]]] = set()


def _orphaned(task: asyncio.Future[list[Any]], undo: Callable[[list[Any]], Any]) -> None:
    _ORPHANS.discard(task)
    if not task.cancelled() and task.exception() is None:
        undo(task.result())


async def _follow(
    loop: asyncio.AbstractEventLoop,
    transport: Transport,
    call: Call,
    came: asyncio.Event,
    timeout_s: float,
) -> list[Any]:
    _watch(loop, transport)
    try:
        step = min(timeout_s, transport.retry_s)
        now = loop.time()
        deadline, retry_at = now + timeout_s, now + step
        while True:
            came.clear()
            result = transport.check(call)
            if result is not None:
                return result
            now = loop.time()
            if now >= retry_at:
                transport.resend(call, timeout_s, overdue=now >= deadline)
                retry_at = now + step
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(came.wait(), retry_at - now)
    finally:
        transport.forget(call)
        _unwatch(loop, transport)
