"""The client library: connect, alloc, free, owners, attach, stats.

A Client is one session with the daemon. It maps the arena once per process
(the mapping is shared by every Client of the process and never unmapped
while the process lives, so no view can dangle), and turns handles into
Buffers by slicing that mapping.

Threads may share a Client. After fork() the child's first call opens a new
session of its own (new socket, new hello); the parent's socket is never
touched from the child.
"""

from __future__ import annotations

import atexit
import mmap
import os
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from shmarena.client.buffer import Buffer
from shmarena.client.transport import Transport
from shmarena.config import (
    DEFAULT_TIMEOUT_S,
    resolve_name,
    runtime_dir,
    socket_path,
)
from shmarena.errors import DaemonUnavailable, InvalidRequest, StaleHandle, UnknownOwner
from shmarena.protocol import PROTOCOL_VERSION, Handle, Op
from shmarena.shm.arena import map_segment

# (shm name, epoch) -> (mapping, memoryview of all of it), one per process.
_MAPPINGS: dict[tuple[str, int], tuple[mmap.mmap, memoryview]] = {}
_MAPPINGS_LOCK = threading.Lock()
_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()
# Transports inherited across fork(): kept referenced so they are never
# closed (or garbage collected) in the child, which would disturb the parent.
_ABANDONED: list[Transport] = []


def _after_fork_in_child() -> None:
    global _MAPPINGS_LOCK
    _MAPPINGS_LOCK = threading.Lock()
    for client in list(_CLIENTS):
        client._forked()


def _close_all_at_exit() -> None:
    """Close this process's sockets before the interpreter tears zmq down, so
    a normal exit prints no ResourceWarning. No bye: the daemon's pidfd sees
    the exit and reclaims the session anyway."""
    for client in list(_CLIENTS):
        client._stop_heartbeat.set()
        transport = client._transport
        if transport is not None and client._pid == os.getpid():
            transport.close(wait_s=0.1)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all_at_exit)


def _own_start_ticks() -> int:
    try:
        with open("/proc/self/stat", "rb") as f:
            data = f.read()
        return int(data[data.rfind(b")") + 2 :].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


class Recycled(NamedTuple):
    """What a recycle (or free) gave back."""

    blocks: int
    bytes: int


class Owner:
    """A named group of blocks, recycled in one call.

    Session scope (the default): recycled when this process's session ends,
    and when a `with` block over it exits. Detached: survives this process and
    is recycled only explicitly (`recycle()`, `client.recycle(name)` or
    `shmarena recycle NAME`).
    """

    def __init__(self, client: Client, name: str, detached: bool) -> None:
        self.client = client
        self.name = name
        self.detached = detached

    def alloc(self, size: int) -> Buffer:
        return self.client._alloc(size, self.name, self.detached)

    def alloc_many(self, sizes: Sequence[int]) -> list[Buffer]:
        return self.client._alloc_many(sizes, self.name, self.detached)

    def recycle(self) -> Recycled:
        return self.client.recycle(self.name)

    def __enter__(self) -> Owner:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.detached:
            try:
                self.recycle()
            except UnknownOwner:
                pass  # recycled inside the block already

    def __repr__(self) -> str:
        scope = "detached" if self.detached else "session"
        return f"<shmarena.Owner {self.name!r} {scope}>"


class Client:
    """A connection to the shmarena daemon called `name`.

    `name` defaults to $SHMARENA_NAME, else "default"; `runtime_dir` to
    $SHMARENA_RUNTIME_DIR, else $XDG_RUNTIME_DIR/shmarena, else
    /tmp/shmarena-<uid>. Every call waits at most `timeout_s` for the daemon,
    then raises DaemonUnavailable.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        runtime_dir: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        label: str = "",
    ) -> None:
        self.name = resolve_name(name, os.environ)
        self.runtime_dir = runtime_dir or _default_runtime_dir()
        self.socket_path = socket_path(self.runtime_dir, self.name)
        self.timeout_s = timeout_s
        self.label = label
        self._lock = threading.Lock()
        self._transport: Transport | None = None
        self._heartbeat: threading.Thread | None = None
        self._stop_heartbeat = threading.Event()
        self.info: dict[str, Any] = {}
        self.session = 0
        self.epoch = 0
        self._arena_view: memoryview | None = None
        self._pid = os.getpid()
        self._closed = False
        self._connect()
        _CLIENTS.add(self)

    # -- session -----------------------------------------------------------

    def _connect(self) -> None:
        transport = Transport(self.socket_path, self.name, self.timeout_s)
        try:
            (info,) = transport.request(
                Op.HELLO, PROTOCOL_VERSION, os.getpid(), _own_start_ticks(), self.label
            )
            self._arena_view = _map(info["segments"][0][0], info["epoch"], info["size_bytes"])
        except BaseException:
            transport.close()
            raise
        self._transport = transport
        self.info = info
        self.session = info["session"]
        self.epoch = info["epoch"]
        if not info.get("watched", True):
            self._start_heartbeat(float(info.get("lease_s", 10.0)))

    def _start_heartbeat(self, lease_s: float) -> None:
        self._stop_heartbeat = stop = threading.Event()
        interval = max(0.05, lease_s / 3)

        def beat() -> None:
            while not stop.wait(interval):
                transport = self._transport
                if transport is None:
                    return
                try:
                    transport.request(Op.PING)
                except Exception:
                    pass  # the next real call reports what is wrong

        thread = threading.Thread(target=beat, name="shmarena-heartbeat", daemon=True)
        thread.start()
        self._heartbeat = thread

    def _forked(self) -> None:
        if self._transport is not None:
            _ABANDONED.append(self._transport)
        self._transport = None
        self._heartbeat = None
        self._lock = threading.Lock()

    def _request(self, op: Op, *args: Any, timeout_s: float | None = None) -> list[Any]:
        transport = self._transport
        if transport is None or self._pid != os.getpid():
            transport = self._reconnect_after_fork()
        return transport.request(op, *args, timeout_s=timeout_s)

    def _reconnect_after_fork(self) -> Transport:
        with self._lock:
            if self._closed:
                raise DaemonUnavailable(
                    f"this client of daemon {self.name!r} is closed; connect again",
                    socket_path=self.socket_path,
                )
            if self._transport is None or self._pid != os.getpid():
                if self._transport is not None:
                    _ABANDONED.append(self._transport)
                self._pid = os.getpid()
                self._connect()
            assert self._transport is not None
            return self._transport

    def close(self) -> None:
        """End the session: the daemon recycles this session's owners (not the
        detached ones). Buffers stay mapped but must not be used after."""
        if self._closed:
            return
        self._closed = True
        self._stop_heartbeat.set()
        transport, self._transport = self._transport, None
        if transport is None or self._pid != os.getpid():
            return
        try:
            transport.request(Op.BYE, timeout_s=min(self.timeout_s, 2.0))
        except DaemonUnavailable:
            pass
        finally:
            transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<shmarena.Client {self.name!r} session={self.session} epoch={self.epoch}>"

    # -- buffers -----------------------------------------------------------

    def _buffer(self, wire: list[int], state: str) -> Buffer:
        handle = Handle(*wire)
        assert self._arena_view is not None
        view = self._arena_view[handle.offset : handle.offset + handle.size]
        return Buffer(self, handle, view, state)

    def alloc(self, size: int) -> Buffer:
        """A buffer of exactly `size` bytes, owned by this session.

        Raises OutOfMemory (a MemoryError) when no free block is large enough;
        its message gives the largest free block and the free total.
        """
        return self._alloc(size, None, False)

    def alloc_many(self, sizes: Sequence[int]) -> list[Buffer]:
        """Several buffers in one round trip; all or none."""
        return self._alloc_many(sizes, None, False)

    def _alloc(self, size: int, owner: str | None, detached: bool) -> Buffer:
        _check_size(size)
        (wire,) = self._request(Op.ALLOC, size, owner, detached)
        return self._buffer(wire, "owned")

    def _alloc_many(self, sizes: Sequence[int], owner: str | None, detached: bool) -> list[Buffer]:
        sizes = list(sizes)
        for size in sizes:
            _check_size(size)
        if not sizes:
            return []
        (wires,) = self._request(Op.ALLOC_MANY, sizes, owner, detached)
        return [self._buffer(w, "owned") for w in wires]

    def free(self, target: Buffer | Handle | Iterable[Buffer | Handle]) -> Recycled:
        """Free one buffer or handle, or many in one request (all or none).

        StaleHandle when one was freed or recycled already; then nothing is freed.
        """
        items = [target] if isinstance(target, (Buffer, Handle)) else list(target)
        handles = [_handle_of(item) for item in items]
        if not handles:
            return Recycled(0, 0)
        ((blocks, freed),) = self._request(Op.FREE, [list(h) for h in handles])
        for item in items:
            if isinstance(item, Buffer):
                item._done()
        return Recycled(blocks, freed)

    def attach(self, handle: Handle, retain: bool = False) -> Buffer:
        """A Buffer over the block `handle` names, allocated by any process.

        Plain attach costs no round trip and takes no reference: the block
        lives as long as its owner keeps it. With `retain=True` this process
        holds a reference: a free or recycle of the owner then waits until
        `buf.release()` (or this process's death) before the memory is reused.
        """
        handle = _as_handle(handle)
        if handle.epoch != self.epoch:
            raise StaleHandle(
                f"handle is from arena epoch {handle.epoch}, the daemon serves epoch "
                f"{self.epoch}: it was restarted and that block no longer exists",
                handle=list(handle),
            )
        size_bytes = int(self.info["size_bytes"])
        if (
            handle.segment != 0
            or handle.offset < 0
            or handle.size <= 0
            or (handle.offset + handle.size > size_bytes)
        ):
            raise InvalidRequest(
                f"handle {tuple(handle)} lies outside the arena of {size_bytes} bytes"
            )
        if retain:
            self._request(Op.RETAIN, [list(handle)])
        return self._buffer(list(handle), "retained" if retain else "attached")

    def retain(self, target: Buffer | Handle) -> None:
        """Take a reader's reference on a block (see `attach`)."""
        handle = _handle_of(target)
        self._request(Op.RETAIN, [list(handle)])
        if isinstance(target, Buffer) and target._state == "attached":
            target._state = "retained"

    def release(self, target: Buffer | Handle) -> None:
        """Drop a reference taken with `attach(..., retain=True)` or `retain()`."""
        handle = _handle_of(target)
        self._request(Op.RELEASE, [list(handle)])
        if isinstance(target, Buffer):
            target._done()

    # -- owners ------------------------------------------------------------

    def owner(self, name: str, detached: bool = False) -> Owner:
        """The owner `name`, created now if needed (it shows in `shmarena owners`
        at once). As a context manager, leaving the block recycles a
        session-scoped owner."""
        self._request(Op.OWNER, name, detached)
        return Owner(self, name, detached)

    def recycle(self, name: str) -> Recycled:
        """Free every block the owner holds, in one call, and remove the owner.

        UnknownOwner if there is no owner of that name.
        """
        ((blocks, freed),) = self._request(Op.RECYCLE, name)
        return Recycled(blocks, freed)

    # -- introspection -----------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The daemon's figures (the same as `shmarena stats --json`)."""
        (stats,) = self._request(Op.STATS)
        return dict(stats)

    def list_owners(self) -> list[dict[str, Any]]:
        """One row per owner (the same as `shmarena owners --json`)."""
        (rows,) = self._request(Op.OWNERS)
        return list(rows)

    def list_clients(self) -> list[dict[str, Any]]:
        """One row per connected session (the same as `shmarena clients --json`)."""
        (rows,) = self._request(Op.CLIENTS)
        return list(rows)

    def check(self) -> list[str]:
        """Verify the daemon's allocator and ledger invariants; [] when healthy."""
        (problems,) = self._request(Op.CHECK)
        return list(problems)

    def ping(self) -> float:
        (now,) = self._request(Op.PING)
        return float(now)

    def shutdown(self) -> None:
        """Ask the daemon to stop cleanly (it removes socket, lock and arena)."""
        self._request(Op.SHUTDOWN)
        self._closed = True
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()


def connect(
    name: str | None = None,
    *,
    runtime_dir: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    label: str = "",
) -> Client:
    """Connect to the daemon `name` (see `Client`)."""
    return Client(name, runtime_dir=runtime_dir, timeout_s=timeout_s, label=label)


def _default_runtime_dir() -> str:
    return runtime_dir(os.environ, os.getuid())


def _map(shm_name: str, epoch: int, size_bytes: int) -> memoryview:
    key = (shm_name, epoch)
    with _MAPPINGS_LOCK:
        found = _MAPPINGS.get(key)
        if found is None:
            mapping = map_segment(shm_name, size_bytes)
            found = (mapping, memoryview(mapping))
            _MAPPINGS[key] = found
        return found[1]


def _check_size(size: int) -> None:
    if type(size) is not int or size <= 0:
        raise InvalidRequest(f"buffer size must be a positive int of bytes, got {size!r}")


def _as_handle(value: Any) -> Handle:
    if isinstance(value, Handle):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 5:
        return Handle(*(int(v) for v in value))
    raise InvalidRequest(f"not a shmarena handle: {value!r:.80}")


def _handle_of(item: Buffer | Handle) -> Handle:
    return item.handle if isinstance(item, Buffer) else _as_handle(item)
