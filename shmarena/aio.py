"""The asyncio client: `client = await shmarena.aio.connect()`, then `await client.alloc(n)`.

This module owns the bridge from the event loop to a sync `shmarena.Client`,
nothing else. Each AsyncClient wraps one Client and runs its calls, in the
order they were made, on one worker thread of its own (a ThreadPoolExecutor
with max_workers=1). A cache hit of `alloc` and a `free` never wait for the
daemon, so they run at once in the loop's thread without a hop.

Why a worker thread and not pyzmq's asyncio sockets: the transport (resends
with the same request id, the daemon's reply cache, late refusals, session
resume, fork detection, the client cache and its batched bookkeeping) lives in
one place, `shmarena.client`, and the asyncio client keeps every guarantee of
it by calling it; a second transport written for asyncio would have to
reproduce all of that and stay in step with it. A round trip costs about 0.2
ms; the thread hop adds some tens of microseconds to calls that talk to the
daemon and nothing to cache hits. One thread per client keeps the calls of a
client in order (a `sync()` runs after everything awaited or cancelled before
it) and a slow call of one client never holds up another client.

Calls that wait in the daemon for something to happen (a lookup with a
timeout, a subscription's next events) do not take the worker: each is a
request in flight on the client's own socket, awaited in the loop with no
thread of its own (shmarena/aio_requests.py), so it holds up no other call.

Cancellation never leaks a block. A call that hands something out (alloc,
alloc_many, an owner's alloc, attach/retain with a reference, lookup) carries
its undo. If the awaiting task is cancelled before the worker started the
call, the call is dropped; if the worker is in the middle of it, the worker
undoes the result itself as soon as it has it (before it runs the next call);
if the result was ready but the task was cancelled before it resumed, the
task queues the undo on the worker. The worker and the task decide under a
lock who owns the result, so exactly one of them gets it. Calls that give
something back (free, release, recycle, close) are not undone: cancelled
after they started, they still complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from shmarena import aio_requests
from shmarena.client import names
from shmarena.client.buffer import Buffer, Handle
from shmarena.client.client import Client, Owner, Recycled, _handle_of
from shmarena.client.lifecycle import move
from shmarena.config import DEFAULT_RETRY_S, DEFAULT_TIMEOUT_S
from shmarena.errors import DaemonUnavailable, SessionLost, ShmArenaError, UnknownName
from shmarena.protocol import Op

__all__ = ["AsyncClient", "AsyncOwner", "AsyncSubscription", "Opening", "connect"]

T = TypeVar("T")
_log = logging.getLogger("shmarena.aio")
_NOTHING: Any = object()

# A waiting lookup and a subscription's wait ask the daemon to keep them at
# most this long at a time, so one given up on (cancelled, closed) holds no
# kept request in the daemon for longer than this.
WAIT_SLICE_S = 1.0


class _Slot:
    """Who owns one call's result: the awaiting task, or (once it has gone
    away) the worker, which then undoes it."""

    __slots__ = ("lock", "abandoned", "result")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False
        self.result: Any = _NOTHING

    def work(
        self, fn: Callable[..., Any], args: tuple[Any, ...], undo: Callable[[Any], Any]
    ) -> Any:
        result = fn(*args)
        with self.lock:
            if not self.abandoned:
                self.result = result
                return result
        _undo_quietly(undo, result)  # the task was cancelled meanwhile
        return None

    def abandon(self) -> Any:
        """The task will not take the result: the result if it was ready
        (the caller must undo it), else _NOTHING (the worker will, if ever)."""
        with self.lock:
            self.abandoned = True
            result, self.result = self.result, _NOTHING
            return result


def _undo_quietly(undo: Callable[[Any], Any], result: Any) -> None:
    try:
        undo(result)
        _log.debug("undid the result of a cancelled call: %r", result)
    except ShmArenaError as error:
        # Gone already (its owner recycled, the session lost): nothing is held.
        _log.debug("undoing a cancelled call's result %r: %s", result, error)


async def _run(
    executor: ThreadPoolExecutor,
    fn: Callable[..., T],
    args: tuple[Any, ...],
    undo: Callable[[T], Any] | None = None,
) -> T:
    """`fn(*args)` on the worker, awaited; with `undo`, cancellation-safe (see
    the module docstring)."""
    if undo is None:
        return await asyncio.wrap_future(executor.submit(fn, *args))
    slot = _Slot()
    future: Future[T] = executor.submit(slot.work, fn, args, undo)
    try:
        return await asyncio.wrap_future(future)
    except BaseException:
        # Cancelled (or fn raised, and then there is no result to undo). The
        # wrapper's cancel also cancelled `future` if the worker had not
        # started it: then it never runs.
        result = slot.abandon()
        if result is not _NOTHING:
            _undo_later(executor, undo, result)
        raise


def _undo_later(executor: ThreadPoolExecutor, undo: Callable[[Any], Any], result: Any) -> None:
    """Undo on the worker, so a call made after the cancellation (a sync())
    runs after the undo; inline if the worker is gone."""
    try:
        executor.submit(_undo_quietly, undo, result)
    except RuntimeError:  # shut down (closed)
        _undo_quietly(undo, result)


def _free(target: Buffer | list[Buffer]) -> None:
    if isinstance(target, Buffer):
        target._client.free(target)
    elif target:
        target[0]._client.free(target)


def _release(buf: Buffer | None) -> None:
    if buf is not None and buf.retained:
        buf.release()


class Opening(Generic[T]):
    """What `connect`, `AsyncClient.owner` and `AsyncClient.subscribe` return:
    await it for the object, or use it directly as `async with ... as x`
    (which awaits it, and leaves through the object's own `async with`)."""

    def __init__(self, make: Callable[[], Awaitable[T]]) -> None:
        self._make = make
        self._value: Any = None

    def __await__(self) -> Generator[Any, None, T]:
        return self._make().__await__()

    async def __aenter__(self) -> T:
        self._value = await self._make()
        return await self._value.__aenter__()  # type: ignore[no-any-return]

    async def __aexit__(self, *exc: Any) -> Any:
        return await self._value.__aexit__(*exc)


class AsyncOwner:
    """An `Owner` whose calls are awaited (see `shmarena.Owner`). As `async
    with`, leaving the block recycles a session-scoped owner."""

    def __init__(self, aclient: AsyncClient, owner: Owner) -> None:
        self.client = aclient
        self.owner = owner  # the sync Owner

    @property
    def name(self) -> str:
        return self.owner.name

    @property
    def detached(self) -> bool:
        return self.owner.detached

    async def alloc(self, size: int) -> Buffer:
        """Like `AsyncClient.alloc`, into this owner. A detached owner's block
        is registered with the daemon before this returns."""
        owner_id = self.owner.known_id()  # None: it must be opened again, by the worker
        if not self.owner.detached and not self.owner.quota and owner_id is not None:
            buf = self.client._cache_hit(size, owner_id)  # a quota is checked by the daemon
            if buf is not None:
                return buf
        return await self.client._call(self.owner.alloc, size, undo=_free)

    async def alloc_many(self, sizes: Sequence[int]) -> list[Buffer]:
        """Like `AsyncClient.alloc_many`, into this owner."""
        return await self.client._call(self.owner.alloc_many, list(sizes), undo=_free)

    async def recycle(self) -> Recycled:
        """Free every block of this owner and remove it (see `Client.recycle`)."""
        return await self.client._call(self.owner.recycle)

    async def __aenter__(self) -> AsyncOwner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client._call(self.owner.__exit__, *exc)

    def __repr__(self) -> str:
        return f"<shmarena.aio.AsyncOwner {self.owner.name!r}>"


class AsyncSubscription:
    """An async iterator of the events of `client.subscribe(prefix)` (see
    `shmarena.Client.subscribe`). Its waits are requests in flight on the
    client's socket, so they never hold up the client's other calls; a `get`
    that timed out or was cancelled loses no event: the next `get` receives it."""

    def __init__(self, subscription: names.Subscription, aclient: AsyncClient) -> None:
        self.subscription = subscription  # the sync Subscription
        self._aclient = aclient
        self._pending: asyncio.Future[names.Event] | None = None
        self._closed = False

    async def _next(self) -> names.Event:
        sub = self.subscription
        while True:
            event = sub.ready()
            if event is not None:
                return event
            sub.absorb(await self._aclient._kept(Op.EVENTS, sub.cursor, sub.prefix))

    async def get(self, timeout: float | None = None) -> names.Event:
        """The next event; TimeoutError when none came within `timeout` s,
        ValueError once the subscription is closed."""
        if self._closed:
            raise ValueError("this subscription is closed; subscribe again")
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._next())
        pending = self._pending
        try:
            # shield: a timeout or a cancel leaves the wait running, for the
            # next get to take its event
            return await asyncio.wait_for(asyncio.shield(pending), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no event came within {timeout} s") from None
        finally:
            if pending.done():
                self._pending = None

    def __aiter__(self) -> AsyncIterator[names.Event]:
        return self

    async def __anext__(self) -> names.Event:
        try:
            return await self.get()
        except ValueError:
            raise StopAsyncIteration from None

    async def close(self) -> None:
        """Stop the subscription and its wait."""
        if self._closed:
            return
        self._closed = True
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, ShmArenaError):
                await pending
        self.subscription.close()

    async def __aenter__(self) -> AsyncSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncClient:
    """A `shmarena.Client` whose calls are awaited: make it with
    `await shmarena.aio.connect(...)`. Its calls run in order on a worker
    thread of its own (cache hits run at once), and a cancelled call that
    hands out a block frees it (see the module docstring). `sync_client` is
    the wrapped Client, for the calls that never wait (`pin_to_arena`, a
    buffer's `ndarray`)."""

    def __init__(self, client: Client, executor: ThreadPoolExecutor | None = None) -> None:
        self.sync_client = client
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="shmarena-aio")
        self._closed = False

    # -- plumbing -----------------------------------------------------------

    async def _call(
        self, fn: Callable[..., T], *args: Any, undo: Callable[[T], Any] | None = None
    ) -> T:
        if self._closed:
            raise DaemonUnavailable(
                f"this asyncio client of daemon {self.name!r} is closed; connect again",
                socket_path=self.sync_client.socket_path,
            )
        return await _run(self._executor, fn, args, undo)

    async def _kept(
        self,
        op: Op,
        *args: Any,
        wait_s: float = WAIT_SLICE_S,
        undo: Callable[[Any], Any] | None = None,
    ) -> list[Any]:
        """A request the daemon may keep up to `wait_s`, in flight on the
        client's socket without a thread; on the worker instead when the
        client must first open a session (forked, lost, or a loss to report).
        Cancelled, its result (should it come) goes to `undo` on the worker."""
        client = self.sync_client
        timeout_s = wait_s + client.timeout_s
        executor = self._executor
        undo_later = None if undo is None else lambda result: _undo_later(executor, undo, result)
        while True:
            transport = client._transport
            if (
                self._closed
                or transport is None
                or transport.closed
                or client._pid != os.getpid()
                or client._pending_loss is not None
            ):
                return await self._call(
                    lambda: client._request(op, *args, wait_s, timeout_s=timeout_s), undo=undo
                )
            try:
                return await aio_requests.request(
                    transport, op, (*args, wait_s), timeout_s, undo_later
                )
            except SessionLost as error:
                client._lose_session(transport, error)
                raise
            except DaemonUnavailable:
                if transport.closed and not client._closed and client._transport is not transport:
                    continue  # another thread found the session lost meanwhile: the new one
                raise

    def _cache_hit(self, size: int, owner_id: int) -> Buffer | None:
        """A buffer from the process's cache without leaving the loop's
        thread, or None (then the worker does the whole alloc). Not when the
        session is leased: its alloc checks the lease first, maybe by a
        round trip."""
        client = self.sync_client
        cache = client._cache
        if (
            cache is None
            or self._closed
            or type(size) is not int
            or not 0 < size <= cache.max_bytes
            or "alloc" in vars(client)  # the lease-checking alloc is installed
        ):
            return None
        return client._from_cache(size, owner_id)

    # -- plain properties ---------------------------------------------------

    @property
    def name(self) -> str:
        return self.sync_client.name

    @property
    def session(self) -> int:
        return self.sync_client.session

    @property
    def epoch(self) -> int:
        return self.sync_client.epoch

    @property
    def info(self) -> dict[str, Any]:
        return self.sync_client.info

    @property
    def numa_nodes(self) -> list[int]:
        return self.sync_client.numa_nodes

    @property
    def cache_max_bytes(self) -> int:
        return self.sync_client.cache_max_bytes

    @property
    def closed(self) -> bool:
        return self._closed

    # -- buffers ------------------------------------------------------------

    async def alloc(self, size: int, *, timeout: float | None = None) -> Buffer:
        """A buffer of exactly `size` bytes (see `Client.alloc`); OutOfMemory
        when no block fits. A cache hit costs no thread hop. With `timeout`
        the daemon keeps the request until room is made (this client's other
        calls wait behind it on its worker thread)."""
        if timeout is not None:
            alloc = self.sync_client.alloc
            return await self._call(lambda n: alloc(n, timeout=timeout), size, undo=_free)
        buf = self._cache_hit(size, 0)
        if buf is not None:
            return buf
        return await self._call(self.sync_client.alloc, size, undo=_free)

    async def alloc_many(self, sizes: Sequence[int]) -> list[Buffer]:
        """Several buffers, all or none (see `Client.alloc_many`)."""
        return await self._call(self.sync_client.alloc_many, list(sizes), undo=_free)

    async def free(self, target: Buffer | Handle | Iterable[Buffer | Handle]) -> Recycled:
        """Give blocks back (see `Client.free`), at once in the loop's thread:
        a free never waits for the daemon (a refusal comes from `sync()`)."""
        client = self.sync_client
        if self._closed or client._cache is None:  # closed, or forked: a hello first
            return await self._call(client.free, target)
        return client.free(target)

    async def attach(self, handle: Handle, retain: bool = False) -> Buffer:
        """A Buffer over the block `handle` names (see `Client.attach`); with
        `retain=True` a cancelled attach releases the reference it took."""
        return await self._call(self.sync_client.attach, handle, retain, undo=_release)

    async def retain(self, target: Buffer | Handle) -> None:
        """Take a reader's reference (see `Client.retain`); a cancelled retain
        that went through drops it again."""
        client = self.sync_client
        handle = _handle_of(target)
        was_attached = isinstance(target, Buffer) and target._state == "attached"

        def undo(_: None) -> None:
            client.release(handle)
            if was_attached:
                assert isinstance(target, Buffer)
                move(target, "unretain")

        await self._call(client.retain, target, undo=undo)

    async def release(self, target: Buffer | Handle) -> None:
        """Drop a reader's reference (see `Client.release`)."""
        await self._call(self.sync_client.release, target)

    # -- owners -------------------------------------------------------------

    def owner(self, name: str, detached: bool = False) -> Opening[AsyncOwner]:
        """The owner `name` (see `Client.owner`): `await` it, or `async with
        client.owner(name) as batch:` to recycle a session-scoped one on exit.
        A cancelled call may still have created the (empty) owner."""

        async def make() -> AsyncOwner:
            owner = await self._call(self.sync_client.owner, name, detached)
            return AsyncOwner(self, owner)

        return Opening(make)

    async def recycle(self, name: str) -> Recycled:
        """Free every block of the owner `name` and remove it; UnknownOwner if
        there is none."""
        return await self._call(self.sync_client.recycle, name)

    # -- named buffers (need a daemon and client with named buffers) ---------

    async def publish(self, name: str, target: Buffer | Handle, *, sealed: bool = True) -> Handle:
        """Bind `name` to the block (see `Client.publish`)."""
        publish = self._named("publish")
        return await self._call(lambda n, t: publish(n, t, sealed=sealed), name, target)

    async def unpublish(self, name: str) -> None:
        """Remove the name; the block stays (see `Client.unpublish`)."""
        await self._call(self._named("unpublish"), name)

    async def lookup(self, name: str, timeout: float | None = 0.0) -> Buffer:
        """The block bound to `name` as a retained Buffer (see `Client.lookup`).
        A lookup that waits is a request in flight on the client's socket, so
        it holds up none of this client's other calls; a cancelled lookup
        releases the block it found."""
        lookup = self._named("lookup")
        if timeout == 0:
            return await self._call(lookup, name, 0.0, undo=_release)
        if self._closed:
            await self._call(lookup, name, 0.0)  # raises the closed error
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be 0 or more seconds, or None; got {timeout}")
        client = self.sync_client
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout

        def release(result: list[Any]) -> None:
            client.release(Handle(*result[0][0]))

        while True:
            left = None if deadline is None else max(0.0, deadline - loop.time())
            wait_s = WAIT_SLICE_S if left is None else min(WAIT_SLICE_S, left)
            try:
                result = await self._kept(Op.LOOKUP, name, wait_s=wait_s, undo=release)
            except UnknownName as error:
                if left is None or wait_s < left:
                    continue
                raise type(error)(
                    f"{error} (the asyncio lookup waited {timeout:g} s in all)", **error.details
                ) from None
            # At once, in the loop's thread: a cancel cannot come between the
            # reply (a reference taken) and the Buffer that will release it.
            return names.found(client, result)

    async def names(self, prefix: str = "") -> list[dict[str, Any]]:
        """The bound names starting with `prefix` (see `Client.names`)."""
        return await self._call(self._named("names"), prefix)

    def subscribe(self, prefix: str = "") -> Opening[AsyncSubscription]:
        """The events of names starting with `prefix` from now on, as an
        AsyncSubscription: `async for event in await client.subscribe(p)`, or
        `async with client.subscribe(p) as sub`."""

        async def make() -> AsyncSubscription:
            subscription = await self._call(self._named("subscribe"), prefix, undo=_close)
            return AsyncSubscription(subscription, self)

        return Opening(make)

    def _named(self, method: str) -> Callable[..., Any]:
        found = getattr(self.sync_client, method, None)
        if found is None:
            raise NotImplementedError(
                f"client.{method}: this shmarena's sync Client has no {method}(); "
                "named buffers need a version that has them"
            )
        return found  # type: ignore[no-any-return]

    # -- introspection ------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        """The daemon's figures (see `Client.stats`)."""
        return await self._call(self.sync_client.stats)

    async def list_owners(self) -> list[dict[str, Any]]:
        """One row per owner (see `Client.list_owners`)."""
        return await self._call(self.sync_client.list_owners)

    async def top_owners(self, count: int) -> list[dict[str, Any]]:
        """The `count` owners holding most bytes (see `Client.top_owners`)."""
        return await self._call(self.sync_client.top_owners, count)

    async def list_clients(self) -> list[dict[str, Any]]:
        """One row per session (see `Client.list_clients`)."""
        return await self._call(self.sync_client.list_clients)

    async def check(self) -> list[str]:
        """The daemon's invariant check; [] when healthy."""
        return await self._call(self.sync_client.check)

    async def segments(self) -> list[dict[str, Any]]:
        """The arena's segments (see `Client.segments`)."""
        return await self._call(self.sync_client.segments)

    async def sync(self) -> None:
        """Wait until the daemon applied everything this client did, cancelled
        calls' undos included; raises a refusal of an earlier free."""
        await self._call(self.sync_client.sync)

    async def ping(self) -> float:
        """The daemon's clock; a round trip."""
        return await self._call(self.sync_client.ping)

    async def reconnect(self) -> None:
        """A new socket now (see `Client.reconnect`)."""
        await self._call(self.sync_client.reconnect)

    async def shutdown(self) -> None:
        """Ask the daemon to stop cleanly, then end this client's thread."""
        await self._call(self.sync_client.shutdown)
        await self.close()

    # -- lifecycle ----------------------------------------------------------

    async def close(self) -> None:
        """End the session (see `Client.close`) and stop the worker thread.
        Calls made before run first; calls made after raise DaemonUnavailable.
        Cancelled, the close still completes and the thread still ends."""
        if self._closed:
            return
        self._closed = True  # waits in flight end as the socket closes
        executor = self._executor
        future = executor.submit(self.sync_client.close)
        # From the worker itself, so the thread ends even if this await is
        # cancelled; wait=False: a thread cannot wait for its own end.
        future.add_done_callback(lambda _: executor.shutdown(wait=False))
        await asyncio.shield(asyncio.wrap_future(future))
        executor.shutdown(wait=True)  # only its exit is left to wait for: immediate

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<shmarena.aio.AsyncClient {self.name!r} session={self.session}{state}>"


def _close(subscription: Any) -> None:
    subscription.close()


def connect(
    name: str | None = None,
    *,
    runtime_dir: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    label: str = "",
    cache: bool = True,
    populate: bool = False,
    retry_s: float = DEFAULT_RETRY_S,
) -> Opening[AsyncClient]:
    """Connect to the daemon `name` as `shmarena.connect` does (same keywords),
    off the loop's thread: `client = await shmarena.aio.connect()`, or
    `async with shmarena.aio.connect() as client:` to close it on exit."""

    def make_client() -> Client:
        return Client(
            name,
            runtime_dir=runtime_dir,
            timeout_s=timeout_s,
            label=label,
            cache=cache,
            populate=populate,
            retry_s=retry_s,
        )

    async def make() -> AsyncClient:
        executor = ThreadPoolExecutor(1, thread_name_prefix="shmarena-aio")
        try:
            client = await _run(executor, make_client, (), undo=Client.close)
        except BaseException:
            executor.shutdown(wait=False)  # a queued undo still runs first
            raise
        return AsyncClient(client, executor)

    return Opening(make)
