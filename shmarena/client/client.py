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
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from shmarena.client import arrays, names, registry
from shmarena.client.buffer import Buffer
from shmarena.client.cache import FLUSH_DELAY_S, Cache
from shmarena.client.transport import Transport
from shmarena.config import (
    DEFAULT_RETRY_S,
    DEFAULT_TIMEOUT_S,
    resolve_name,
    runtime_dir,
    socket_path,
)
from shmarena.errors import (
    DaemonUnavailable,
    InvalidRequest,
    OutOfMemory,
    QuotaExceeded,
    SessionLost,
    ShmArenaError,
    StaleHandle,
    UnknownOwner,
    lifetime_error,
)
from shmarena.protocol import (
    GEN_SHIFT,
    MAX_BATCH,
    MAX_LISTING_ROWS,
    MAX_WAIT_S,
    PIN,
    PROTOCOL_VERSION,
    UNPIN,
    Handle,
    Op,
)
from shmarena.shm import gens
from shmarena.shm.arena import map_segment
from shmarena.shm.backing import map_file
from shmarena.shm.segments import OFFSET_MASK, SEGMENT_SHIFT, SEGMENT_SPAN

# (shm name, epoch) -> (mapping, memoryview of all of it), one per process.
_MAPPINGS: dict[tuple[str, int], tuple[mmap.mmap, memoryview]] = {}
# key -> clients of this process that use the mapping; the last to close
# unmaps it if no buffer is left over it (see `_unmap`)
_MAPPING_USERS: dict[tuple[str, int], int] = {}
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
            # Frees of other processes' blocks may still be queued: send them.
            transport.close(wait_s=0.1, linger_s=0.5)
        client._flush_wake.set()


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

    def __init__(
        self, client: Client, name: str, detached: bool, owner_id: int, quota: int = 0
    ) -> None:
        self.client = client
        self.name = name
        self.detached = detached
        self.quota = quota  # bytes, 0: none (as the daemon said when this was opened)
        client._owner_ids[name] = (client.session, owner_id)

    @property
    def id(self) -> int:
        """The number this session's cache hand-outs name the owner by. The
        daemon forgets it when the owner is recycled (and never gives it
        again); using the owner after that opens it again, for a new id."""
        known = self.known_id()
        return self.client._reopen(self.name) if known is None else known

    def known_id(self) -> int | None:
        """`id` if it needs no round trip, else None."""
        client = self.client
        known = client._owner_ids.get(self.name)
        return known[1] if known is not None and known[0] == client.session else None

    def alloc(self, size: int, *, timeout: float | None = None, site: str | None = None) -> Buffer:
        """Like `Client.alloc`, into this owner. A detached owner's buffers are
        registered with the daemon before this returns (one round trip), so
        they outlive this process even if it is killed the next instant; so
        are those of an owner with a quota, which the daemon checks."""
        client = self.client
        if self.detached or self.quota or timeout is not None or site or client.track_sites:
            buf = client._alloc_direct(size, self.name, self.detached, timeout, site)
        else:
            buf = client._alloc_cached(size, self.id, self.name)
        buf._owner = self.name  # a recycle in this process finds it (Client.recycle)
        return buf

    def alloc_many(self, sizes: Sequence[int]) -> list[Buffer]:
        bufs = self.client._alloc_many(
            sizes, self.name, self.detached, self.id, direct=bool(self.quota)
        )
        for buf in bufs:
            buf._owner = self.name
        return bufs

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
    then raises DaemonUnavailable; a request still unanswered after `retry_s`
    is sent again with the same id (the daemon answers a repeat from its reply
    cache, never runs it twice). After the daemon was restarted, one call
    raises SessionLost and the next connects again (see `reconnect`).

    With `cache=True` (the default) sizes up to 1 MiB (less for small arenas)
    come from a per-process cache without a round trip, and what the daemon
    must know follows in batches: `stats()` and `shmarena owners` are exact
    after any call that waits for the daemon (`sync()`, `stats()`, an alloc
    that misses the cache ...) and at most a few milliseconds behind
    otherwise. With `cache=False` every alloc asks the daemon.

    `populate=True` maps every page of the arena when this process first
    connects (MAP_POPULATE: about 0.1-0.2 ms per MiB, once), so no buffer pays
    a page fault on first touch later (2-4 us per 4 KiB page otherwise). Frees of blocks
    that are not in this process's cache are sent without waiting, in both
    modes; a refusal (a double free, say) is raised by `sync()` or the next
    call that talks to the daemon (a cache hit does not).
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        runtime_dir: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        label: str = "",
        cache: bool = True,
        populate: bool = False,
        retry_s: float = DEFAULT_RETRY_S,
    ) -> None:
        self.name = resolve_name(name, os.environ)
        self.runtime_dir = runtime_dir or _default_runtime_dir()
        self.socket_path = socket_path(self.runtime_dir, self.name)
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.label = label
        self.cache_enabled = cache
        self.populate = populate
        # $SHMARENA_TRACK_SITES=1: every allocation is labelled with its caller
        self.track_sites = os.environ.get("SHMARENA_TRACK_SITES", "") == "1"
        self._lock = threading.Lock()
        self._transport: Transport | None = None
        self._daemon_uid: int | None = None  # the uid its runtime dir and segments belong to
        self._heartbeat: threading.Thread | None = None
        self._stop_heartbeat = threading.Event()
        self.info: dict[str, Any] = {}
        self.session = 0
        self.epoch = 0
        self._arena_view: memoryview | None = None  # segment 0
        self._arena_key: tuple[str, int] = ("", 0)
        # Segments: index -> where to map it (from the daemon), and the views
        # and mapping keys of those this client has mapped so far.
        self._segment_info: dict[int, dict[str, Any]] = {}
        self._views: dict[int, memoryview] = {}
        self._keys: dict[int, tuple[str, int]] = {}
        # segment -> its generation table, 64-bit words (shm/gens.py); absent
        # for a daemon that keeps none
        self._tables: dict[int, memoryview] = {}
        self._min_shift = 12
        self._used: set[tuple[str, int]] = set()  # mapping keys counted in _MAPPING_USERS
        self._cache: Cache | None = None
        self._flush_wake = threading.Event()
        self._flusher: threading.Thread | None = None
        self._pid = os.getpid()
        self._closed = False
        # rows asked for per page of a listing (list_owners, ...); the daemon
        # sends at most MAX_LISTING_ROWS
        self.listing_page = MAX_LISTING_ROWS
        # owner name -> (session, id) for ASSIGN events: see Owner.id
        self._owner_ids: dict[str, tuple[int, int]] = {}
        # A SessionLost found by the heartbeat thread, raised by the next call.
        self._pending_loss: SessionLost | None = None
        # The pin rule (client/buffer.py): address -> this process's live
        # Buffer allocated there that made a view (or came from the daemon),
        # so a recycle, a notice or a free by handle finds its views; and the
        # weak references that unpin a pinned block when its pin dies.
        self._viewed: dict[int, Buffer] = {}
        self._pins: dict[int, weakref.ref[memoryview]] = {}  # id(ref) -> ref
        self._prune_at = 1024  # table size at which dropped, unviewed Buffers are let go
        self._alive_at = 0.0  # monotonic time of the last reply (lease mode only)
        self._connect()
        _CLIENTS.add(self)

    # -- session -----------------------------------------------------------

    def _connect(self, resume: list[int] | None = None, old: Transport | None = None) -> None:
        """Open a socket and say hello: a new session, or with `resume`
        ([session, token]) the same session again if the daemon still has it
        (numbering requests on from the `old` socket's)."""
        transport = Transport(self.socket_path, self.name, self.timeout_s, self.retry_s, follow=old)
        try:
            (info,) = transport.request(
                Op.HELLO,
                PROTOCOL_VERSION,
                os.getpid(),
                _own_start_ticks(),
                self.label,
                resume or [],
            )
            segments = {int(s["index"]): s for s in info["segments"]}
            first = segments[0]
            key = (_locator(first), info["epoch"])
            view = _map(key, first, self.populate, self._used, transport.daemon_uid)
            table = _map_table(first, info["epoch"], self._used, transport.daemon_uid)
        except BaseException:
            transport.close()
            raise
        self.info = info
        self.session = info["session"]
        self.epoch = info["epoch"]
        self._segment_info = segments
        self._arena_key, self._arena_view = key, view
        self._views, self._keys = {0: view}, {0: key}
        # Resumed: the tables of other segments mapped so far are still the
        # daemon's (escape() may write them before a new lookup maps them).
        kept = self._tables if info.get("resumed") else {}
        self._tables = {**kept, 0: table} if table is not None else {}
        self._min_shift = int(info["min_block_bytes"]).bit_length() - 1
        self._token = int(info.get("token", 0))
        cache = self._cache
        if not info.get("resumed"):
            transport.next_id, transport.unconfirmed = 1, []  # a new session counts anew
        if cache is None or not info.get("resumed"):  # a new session: a new cache
            cache = Cache(
                self.session,
                self.epoch,
                int(info["min_block_bytes"]),
                int(first["size"]),
                self._wake_flusher,
                self,
                self._arena_view,
                enabled=self.cache_enabled,
            )
        transport.pending = cache.take_events
        transport.orphan = cache.orphan
        self._cache = cache
        self._transport = transport
        self._daemon_uid = transport.daemon_uid
        if not info.get("watched", True):
            self._start_heartbeat(float(info.get("lease_s", 10.0)))
        else:  # the class's own methods: no lease to check on the hot path
            self.__dict__.pop("alloc", None)
            self.__dict__.pop("_alloc_cached", None)

    def _start_heartbeat(self, lease_s: float) -> None:
        """For a session the daemon cannot watch by pid: ping every third of
        the lease, and check the session before each cache hit when the last
        reply is older than half the lease (after a SIGSTOP, say), so a
        process whose lease ran out never hands out a reclaimed block."""
        self._stop_heartbeat.set()
        self._stop_heartbeat = stop = threading.Event()
        interval = max(0.05, lease_s / 3)
        self._alive_at = time.monotonic()
        self.alloc = self._lease_checked(type(self).alloc, lease_s)  # type: ignore[method-assign]
        self._alloc_cached = self._lease_checked(  # type: ignore[method-assign]
            type(self)._alloc_cached, lease_s
        )

        def beat() -> None:
            while not stop.wait(interval):
                transport = self._transport
                if transport is None:
                    return
                try:
                    transport.request(Op.PING, late=False)  # refusals wait for the user
                    self._alive_at = time.monotonic()
                except SessionLost as error:
                    self._lose_session(transport, error, stash=True)
                    return
                except Exception:
                    pass  # the next real call reports what is wrong

        thread = threading.Thread(target=beat, name="shmarena-heartbeat", daemon=True)
        thread.start()
        self._heartbeat = thread

    def _wake_flusher(self) -> None:
        """Called (under the cache lock) when bookkeeping starts to queue up."""
        self._flush_wake.set()
        if self._flusher is None:
            thread = threading.Thread(target=self._flush_loop, name="shmarena-flush", daemon=True)
            self._flusher = thread
            thread.start()

    def _flush_loop(self) -> None:
        """Send queued bookkeeping at most FLUSH_DELAY_S after it started to
        queue, so the daemon's picture is never far behind an idle process.

        Idle, the thread waits for the first queued event. Busy, it looks every
        FLUSH_DELAY_S, so a stream of events costs 200 wake-ups a second, not
        one per event (a wake-up per event slows every round trip of a
        two-CPU machine)."""
        wake = self._flush_wake
        while True:
            wake.wait()
            wake.clear()
            while True:
                if self._closed or self._pid != os.getpid():
                    return
                time.sleep(FLUSH_DELAY_S)  # let a burst gather into one message
                cache, transport = self._cache, self._transport
                if cache is None or transport is None or not cache.dirty:
                    break  # everything went out with a request meanwhile: idle again
                try:
                    transport.flush()
                except Exception:
                    pass  # the next call that waits for the daemon reports it

    def _forked(self) -> None:
        if self._transport is not None:
            _ABANDONED.append(self._transport)
        self._transport = None
        self._heartbeat = None
        self._cache = None  # the parent's: its blocks are the parent session's
        self._viewed, self._pins = {}, {}  # the parent's Buffers and pins
        self._flusher = None
        self._flush_wake = threading.Event()
        self._lock = threading.Lock()

    def _lease_checked(self, method: Any, lease_s: float) -> Any:
        def checked(*args: Any, **kwargs: Any) -> Any:
            if time.monotonic() - self._alive_at > lease_s / 2:
                self._request(Op.PING)  # SessionLost if the lease ran out meanwhile
            return method(self, *args, **kwargs)

        return checked

    def _request(self, op: Op, *args: Any, timeout_s: float | None = None) -> list[Any]:
        while True:
            if self._pending_loss is not None:
                error, self._pending_loss = self._pending_loss, None
                raise error
            transport = self._transport
            if transport is None or self._pid != os.getpid():
                transport = self._reconnect_after_fork()
            try:
                result = transport.request(op, *args, timeout_s=timeout_s)
            except SessionLost as error:
                self._lose_session(transport, error)
                raise
            except DaemonUnavailable:
                if transport.closed and not self._closed and self._transport is not transport:
                    continue  # another thread found the session lost meanwhile
                raise
            self._alive_at = time.monotonic()
            return result

    def _lose_session(self, transport: Transport, error: SessionLost, stash: bool = False) -> None:
        """The daemon has no session for us (restarted, or our lease ran out):
        forget the session, its cache and its socket; the next call opens a
        new session. With `stash`, the next call raises `error` first."""
        with self._lock:
            if not stash:
                self._pending_loss = None  # the caller raises the news itself
            if self._transport is not transport:
                return  # another thread got there first
            self._transport = None
            self._cache = None  # its blocks are gone; its Buffers refuse a free
            # Its blocks went with it (the daemon restarted): nothing to pin.
            self._viewed.clear()
            self._pins.clear()
            self._stop_heartbeat.set()
            if stash:
                self._pending_loss = error
        transport.close()

    def reconnect(self) -> None:
        """Open a new socket to the daemon now: the same session if the daemon
        still has it (say, after DaemonUnavailable from a daemon that was only
        slow), else a new one (after a restart, or a lease that ran out)."""
        with self._lock:
            if self._closed:
                raise DaemonUnavailable(
                    f"this client of daemon {self.name!r} is closed; connect again",
                    socket_path=self.socket_path,
                )
            old, self._transport = self._transport, None
            self._pending_loss = None
            self._stop_heartbeat.set()
            resume = None
            if old is not None and self._pid == os.getpid():
                resume = [self.session, self._token]
                old.close()
            else:
                old = None
                self._cache = None
                self._pid = os.getpid()
            try:
                self._connect(resume, old)
            except BaseException:
                self._cache = None
                raise

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
        detached ones) and drops its pins. Its Buffers are done; views made
        from them stay mapped but must not be used after: their blocks may be
        reused (views must not outlive the client they came from)."""
        if self._closed:
            return
        self._closed = True
        self._stop_heartbeat.set()
        self._flush_wake.set()
        self._forget_views("closed")
        transport = self._transport
        if transport is None or self._pid != os.getpid():
            self._transport = None
            return
        try:
            transport.request(Op.BYE, timeout_s=min(self.timeout_s, 2.0), late=False)
        except ShmArenaError:
            pass  # gone already (daemon unreachable or restarted, session lost)
        finally:
            self._transport = None
            transport.close()
            self._unuse()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the pin rule (client/buffer.py) -------------------------------------

    def _forget_views(self, gone: str) -> None:
        """The session ends: its Buffers are done and its pins go with it
        (the daemon drops a session's pins when it ends). Views made from
        them must not outlive the session: their blocks may be reused."""
        viewed = list(self._viewed.values())
        self._viewed.clear()
        for buf in viewed:
            buf._done(gone)
        self._pins.clear()
        cache = self._cache
        if cache is not None:
            with cache.lock:
                cache.out.clear()  # so its other Buffers refuse a view too

    def _watch(self, pin: memoryview, address: int, gen: int) -> None:
        """Unpin the block once `pin`, kept alive only by the views made from
        it, is gone. The callback may run anywhere (in the garbage collector,
        inside a lock holder): it takes no lock and sends nothing, it only
        queues the work for the registry's worker thread."""
        registry.start_worker()
        pins, session = self._pins, self.session

        def gone(ref: weakref.ref[memoryview], queue_unpin: Any = registry.queue_unpin) -> None:
            pins.pop(id(ref), None)
            try:
                queue_unpin(self, session, address, gen)
            except Exception:  # interpreter shutdown: the session ends, and its pins with it
                pass

        ref = weakref.ref(pin, gone)
        pins[id(ref)] = ref

    def _unpin(self, session: int, address: int, gen: int) -> None:
        """The last view of a pinned block is gone (on the worker thread)."""
        cache = self._cache
        if cache is None or self._closed or session != self.session or self._pid != os.getpid():
            return  # that session is over, and its pins with it
        cache.post(UNPIN, address, gen)

    def _pin_owner(self, name: str) -> list[Buffer]:
        """Before a recycle of `name` by this process: release the views of
        its Buffers here and pin the blocks whose views outlive them. The
        Buffers, to be marked done once the recycle went through."""
        implicit = name == f"session-{self.session}"
        found = [
            b
            for b in list(self._viewed.values())
            if b._owner == name or (implicit and b._owner is None)
        ]
        cache = self._cache
        for buf in found:
            address = buf._offset
            if self._viewed.get(address) is buf:
                del self._viewed[address]
            pin = buf._release_views()
            if pin is None or cache is None:
                continue
            if buf._cache is cache:
                cache.pin_out(address, buf._gen)
            else:
                cache.post(PIN, address, buf._gen)
            self._watch(pin, address, buf._gen)
        return found

    @property
    def cache_max_bytes(self) -> int:
        """The largest size served from this process's cache (0: no cache)."""
        cache = self._cache
        return cache.max_bytes if cache is not None else 0

    # -- segments ----------------------------------------------------------

    def _segment_view(self, segment: int) -> memoryview:
        """The view of a segment, mapped the first time it is met. The
        daemon says where it lives (one round trip per new segment).
        StaleHandle when the segment no longer exists (released when empty)."""
        view = self._views.get(segment)
        if view is not None and (segment == 0 or _mapped_view(self._keys[segment]) is view):
            return view
        with self._lock:
            where = self._segment_info.get(segment)
        for _ in range(2):
            if where is None:
                (rows,) = self._request(Op.SEGMENTS)
                with self._lock:
                    self._segment_info = {int(row["index"]): row for row in rows}
                    where = self._segment_info.get(segment)
                _unmap_released(self.epoch, rows)
                if where is None:
                    break
            key = (_locator(where), self.epoch)
            try:
                view = _map(key, where, self.populate, self._used, self._daemon_uid)
            except ShmArenaError:
                if segment == 0:
                    raise
                where = None  # released since this client learnt of it: ask again
                continue
            table = _map_table(where, self.epoch, self._used, self._daemon_uid)
            with self._lock:
                self._views[segment], self._keys[segment] = view, key
                if table is not None:
                    self._tables[segment] = table
            return view
        raise StaleHandle(
            f"segment {segment} of arena {self.name!r} (epoch {self.epoch}) does not exist: "
            "it was released after it stood empty, or never made; the block is gone",
            segment=segment,
        )

    def _unuse(self) -> None:
        """This client is done with its mappings: the last user in the
        process unmaps each one that no buffer looks at any more, so the
        memory of a stopped daemon's arena is not kept alive by this process."""
        with _MAPPINGS_LOCK:
            for key in self._used:
                users = _MAPPING_USERS.get(key, 0) - 1
                if users > 0:
                    _MAPPING_USERS[key] = users
                    continue
                _MAPPING_USERS.pop(key, None)
                _unmap(key)
            self._used.clear()

    def _view_at(self, address: int, size: int) -> memoryview:
        """The bytes [address, address + size) of the arena (see segments.address)."""
        offset = address & OFFSET_MASK
        return self._segment_view(address >> SEGMENT_SHIFT)[offset : offset + size]

    @property
    def numa_nodes(self) -> list[int]:
        """The NUMA nodes the arena's pages are bound to (`--numa-node`,
        `--numa-interleave`); empty when the daemon placed them freely."""
        return list(self.info.get("numa", {}).get("nodes", []))

    def pin_to_arena(self) -> set[int]:
        """Run this process (its threads started from now on too) on the
        CPUs of the arena's NUMA node(s), so its reads and writes stay local.
        Returns those CPUs; ShmArenaError when the arena is not bound."""
        cpus = set(self.info.get("numa", {}).get("cpus", []))
        if not cpus:
            raise ShmArenaError(
                f"arena {self.name!r} is not bound to a NUMA node, so there is no node to run "
                "next to; start the daemon with --numa-node N to bind it"
            )
        os.sched_setaffinity(0, cpus)
        return cpus

    def segments(self) -> list[dict[str, Any]]:
        """The arena's segments now: index, size and where each lives."""
        (rows,) = self._request(Op.SEGMENTS)
        return list(rows)

    def __repr__(self) -> str:
        return f"<shmarena.Client {self.name!r} session={self.session} epoch={self.epoch}>"

    # -- buffers -----------------------------------------------------------

    def _buffer(self, wire: list[int], state: str) -> Buffer:
        _, segment, offset, size, gen = wire
        self._segment_view(segment)  # mapped now: a view of it is made on first use
        address = segment << SEGMENT_SHIFT | offset
        buf = Buffer(self, self.epoch, address, size, gen, state, None)
        if state == "owned":
            self._viewed[address] = buf  # a recycle here marks it done (cheap next to the trip)
            if len(self._viewed) >= self._prune_at:
                self._prune_viewed()
        return buf

    def _prune_viewed(self) -> None:
        """Forget the Buffers of the table nobody else references and that
        made no view (their blocks may have been freed by another process,
        which this one never hears of): nothing can use them any more."""
        viewed = self._viewed
        for address in list(viewed):
            buf = viewed.get(address)
            # references: the table, `buf`, getrefcount's argument
            if buf is not None and buf._view is None and sys.getrefcount(buf) <= 3:
                del viewed[address]
        self._prune_at = max(1024, 2 * len(viewed))

    def alloc(self, size: int, *, timeout: float | None = None, site: str | None = None) -> Buffer:
        """A buffer of exactly `size` bytes, owned by this session.

        Raises OutOfMemory (a MemoryError) when no free block is large enough;
        its message gives the largest free block and the free total. With
        `timeout` (seconds), an allocation that does not fit waits in the
        daemon, first come first served, until frees make room, and raises
        OutOfMemory only when the time is up. QuotaExceeded (an OutOfMemory)
        when it would take the session over its quota; that never waits.

        `site` labels the block with where it was allocated ("decoder"), shown
        per owner by `shmarena owners`, so a leak points at code; with
        $SHMARENA_TRACK_SITES=1 the caller's file, line and function are
        taken. A labelled allocation goes to the daemon (a round trip).
        """
        if timeout is not None or site or self.track_sites:
            return self._alloc_direct(size, None, False, timeout, site)
        cache = self._cache
        if cache is not None and type(size) is int and 0 < size <= cache.max_bytes:
            return cache.hand_out(size, 0) or self._alloc_miss(size, 0, None)
        return self._alloc(size, None, False)

    def alloc_many(self, sizes: Sequence[int]) -> list[Buffer]:
        """Several buffers; all or none, one round trip at most."""
        return self._alloc_many(sizes, None, False, 0)

    def _alloc_cached(self, size: int, owner_id: int, owner: str | None) -> Buffer:
        cache = self._cache
        if cache is not None and type(size) is int and 0 < size <= cache.max_bytes:
            return cache.hand_out(size, owner_id) or self._alloc_miss(size, owner_id, owner)
        return self._alloc(size, owner, False)

    def _alloc_miss(self, size: int, owner_id: int, owner: str | None) -> Buffer:
        """Refill the class (one round trip), then take from it."""
        while True:
            cache = self._cache
            if cache is None:  # forked: the next request opens our own session
                return self._alloc(size, owner, False)
            cls = cache.class_of(size)
            self._refill(cache, [cls, cache.batch(cls), 1], [], owner)
            buf = cache.hand_out(size, owner_id)
            if buf is not None:  # else another thread took them first: again
                return buf

    def _refill(
        self, cache: Cache, fills: list[int], sizes: list[int], owner: str | None
    ) -> list[list[int]]:
        """One FILL round trip (two when the arena is full, see `_request_room`:
        the daemon takes what is needed and only as many more as fit)."""
        taken, direct, notices = self._request_room(Op.FILL, fills, cache.mark(), sizes, owner)
        for offsets in taken:  # map new segments before their blocks are handed out
            if offsets and max(offsets) >= SEGMENT_SPAN:
                for segment in {o >> SEGMENT_SHIFT for o in offsets} - self._views.keys():
                    self._segment_view(segment)
        cache.notice(notices)
        for i, offsets in enumerate(taken):
            cache.add(fills[3 * i], offsets)
        return direct  # type: ignore[no-any-return]

    def _alloc(self, size: int, owner: str | None, detached: bool, site: str = "") -> Buffer:
        _check_size(size)
        if site:
            (wire,) = self._request_room(Op.ALLOC, size, owner, detached, 0.0, site)
        else:
            (wire,) = self._request_room(Op.ALLOC, size, owner, detached)
        return self._buffer(wire, "owned")

    def _alloc_direct(
        self,
        size: int,
        owner: str | None,
        detached: bool,
        timeout: float | None,
        site: str | None,
    ) -> Buffer:
        """An allocation the daemon makes itself (no cache): one that may wait,
        is labelled with its site, or goes to a detached or quota'd owner."""
        if site is None and self.track_sites:
            site = _caller_site()
        if timeout is not None:
            return self._alloc_waiting(size, owner, detached, timeout, site or "")
        return self._alloc(size, owner, detached, site or "")

    def _alloc_waiting(
        self, size: int, owner: str | None, detached: bool, timeout: float, site: str = ""
    ) -> Buffer:
        """An ALLOC the daemon keeps until it fits or `timeout` runs out. What
        this process's cache holds goes back first: waiting while holding
        free blocks would be waiting for ourselves."""
        _check_size(size)
        if not timeout >= 0:
            raise ValueError(f"timeout must be 0 or more seconds, got {timeout}")
        wait_s = min(float(timeout), MAX_WAIT_S)
        try:
            (wire,) = self._request(Op.ALLOC, size, owner, detached, 0.0, site)
        except OutOfMemory as error:
            if isinstance(error, QuotaExceeded) or wait_s <= 0:
                raise
            cache = self._cache
            if cache is not None:
                cache.drain_all()
            (wire,) = self._request(
                Op.ALLOC, size, owner, detached, wait_s, site, timeout_s=wait_s + self.timeout_s
            )
        return self._buffer(wire, "owned")

    def _request_room(self, op: Op, *args: Any) -> list[Any]:
        """An allocating request; on OutOfMemory, give this process's cached
        blocks back to the arena and try once more."""
        try:
            return self._request(op, *args)
        except OutOfMemory:
            cache = self._cache
            if cache is None or not cache.drain_all():
                raise
            return self._request(op, *args)

    def _alloc_many(
        self,
        sizes: Sequence[int],
        owner: str | None,
        detached: bool,
        owner_id: int,
        direct: bool = False,
    ) -> list[Buffer]:
        sizes = list(sizes)
        for size in sizes:
            _check_size(size)
        if not sizes:
            return []
        if len(sizes) > MAX_BATCH:
            raise InvalidRequest(
                f"alloc_many takes at most {MAX_BATCH} sizes per call, got {len(sizes)}"
            )
        cache = self._cache
        if cache is None or detached or direct or not cache.max_bytes:
            (wires,) = self._request_room(Op.ALLOC_MANY, sizes, owner, detached)
            return [self._buffer(w, "owned") for w in wires]
        # Count what the cache lacks per class; one FILL brings it, together
        # with the sizes too large for the cache; then every cached size hits.
        wanted: dict[int, int] = {}
        large = []
        for size in sizes:
            if size <= cache.max_bytes:
                cls = cache.class_of(size)
                wanted[cls] = wanted.get(cls, 0) + 1
            else:
                large.append(size)
        fills: list[int] = []
        for cls, count in wanted.items():
            missing = cache.missing(cls, count)
            if missing:
                fills += (cls, min(4096, missing + cache.batch(cls)), missing)
        uncached: list[list[int]] = []
        if fills or large:
            uncached = self._refill(cache, fills, large, owner)
        buffers = []
        direct_iter = iter(uncached)
        for size in sizes:
            if size > cache.max_bytes:
                buffers.append(self._buffer(next(direct_iter), "owned"))
            else:
                buffers.append(self._alloc_cached(size, owner_id, owner))
        return buffers

    def free(self, target: Buffer | Handle | Iterable[Buffer | Handle]) -> Recycled:
        """Free one buffer or handle, or many at once.

        A buffer from this process's cache goes back to it at once. Any other
        block is freed by the daemon, without waiting for its answer: a refusal
        (StaleHandle: it was freed or recycled already) is raised by the next
        call. Buffers are all checked before any is freed. Returns the number
        of blocks and bytes (as carved) given back.

        A block this process still has views of (a slice of `buf.view`, an
        array from `buf.ndarray`, a reader chunk ...) is not reused until the
        last of them is gone: it is *pinned* (`stats()["pinned_bytes"]`) and
        freed by itself then. The Buffer is done at once either way.
        """
        items = [target] if isinstance(target, (Buffer, Handle)) else list(target)
        seen = set()
        for item in items:
            if not isinstance(item, Buffer):
                epoch = _as_handle(item).epoch
                if epoch != self.epoch:
                    raise _other_epoch(epoch, self.epoch, "free")
            elif item._epoch != self.epoch:
                raise _other_epoch(item._epoch, self.epoch, "free")
            if isinstance(item, Buffer):
                if item._state == "done":
                    raise _freed_already(item)
                if id(item) in seen:
                    raise lifetime_error(
                        "double_free",
                        f"free of {len(items)} buffers",
                        f"{item!r} appears twice in it; nothing was freed",
                    )
                seen.add(id(item))
        total = 0
        for item in items:
            if isinstance(item, Buffer):
                total += self._free_buffer(item)
            else:
                total += self._free_handle(_as_handle(item))
        return Recycled(len(items), total)

    def _free_buffer(self, buf: Buffer) -> int:
        if buf._state == "done":
            raise _freed_already(buf)
        if buf._epoch != self.epoch:
            raise _other_epoch(buf._epoch, self.epoch, "free")
        cache = buf._cache
        if cache is not None and cache is self._cache:
            return cache.take_back(buf)
        address = buf._offset
        if self._viewed.get(address) is buf:
            del self._viewed[address]
        segment, offset = address >> SEGMENT_SHIFT, address & OFFSET_MASK
        handle = (self.epoch, segment, offset, buf._size, buf._gen)
        if buf._state == "owned":  # attach refuses it from now on, not once the daemon heard
            self._mark(address, buf._gen, gens.FREED)
        pin = buf._release_views()
        if pin is not None and self._cache is not None:
            # Views of it outlive the Buffer: pinned, freed, unpinned when they go.
            self._cache.post(PIN, address, buf._gen)
            self._watch(pin, address, buf._gen)
        carved = self._post_free(handle)
        buf._done()
        return carved

    def _free_handle(self, handle: Handle) -> int:
        address = handle.segment << SEGMENT_SHIFT | handle.offset
        buf = self._viewed.get(address) if 0 <= handle.offset <= OFFSET_MASK else None
        if buf is not None and buf._gen == handle.generation and buf._size == handle.size:
            return self._free_buffer(buf)  # its views here are checked as for buf.free()
        cache = self._cache
        if cache is not None and handle.generation >> GEN_SHIFT == self.session:
            if not 0 <= handle.offset <= OFFSET_MASK or handle.segment < 0:
                raise cache._stale(handle.offset, handle.generation, raw=True)
            # Made by this very cache: it knows whether the block is still out.
            address = handle.segment << SEGMENT_SHIFT | handle.offset
            return cache.free_through_daemon(address, handle.generation, handle.size)
        return self._post_free(tuple(handle))  # type: ignore[arg-type]

    def _post_free(self, handle: tuple[int, int, int, int, int]) -> int:
        cache = self._cache
        if cache is None:  # forked: open our own session first
            self._request(Op.PING)
            cache = self._cache
            assert cache is not None
        cache.post_free(handle)
        unit = cache.min_block
        return -(-handle[3] // unit) * unit

    def attach(self, handle: Handle, retain: bool = False) -> Buffer:
        """A Buffer over the block `handle` names, allocated by any process.

        Plain attach costs no round trip and takes no reference: the block
        lives as long as its owner keeps it. It checks the handle against the
        arena's generation table (shared memory, shm/gens.py) and raises
        StaleHandle, saying what happened, unless the block is live under the
        handle's generation: freed, owner recycled, its session ended (the
        producer exited), handed out again since, or never handed out. A block
        freed *after* a plain attach is not noticed: the Buffer then looks at
        bytes that may be handed out again. With `retain=True` this process
        holds a reference (the daemon refuses a freed block too): a free or
        recycle of the owner then waits until `buf.release()` (or this
        process's death) before the memory is reused.
        """
        handle = _as_handle(handle)
        if handle.epoch != self.epoch:
            raise _other_epoch(handle.epoch, self.epoch, "attach")
        try:
            view = self._segment_view(handle.segment) if handle.segment >= 0 else None
        except StaleHandle:
            view = None
        if view is None:
            sizes = {k: int(v["size"]) for k, v in self._segment_info.items()}
            raise InvalidRequest(
                f"handle {tuple(handle)} names segment {handle.segment}, which arena "
                f"{self.name!r} does not have: its segments (index: bytes) are {sizes}"
            )
        if handle.offset < 0 or handle.size <= 0 or handle.offset + handle.size > len(view):
            raise InvalidRequest(
                f"handle {tuple(handle)} lies outside segment {handle.segment} of the arena, "
                f"which has {len(view)} bytes"
            )
        table = self._tables.get(handle[1])
        if table is not None:  # the block's word: live under this very generation?
            offset, shift = handle[2], self._min_shift
            if table[offset >> shift] != handle[4] or offset & ((1 << shift) - 1):
                refusal = self._not_live(handle, table)
                if retain:  # the daemon may remember more (whose, which pid)
                    try:
                        self._request(Op.RETAIN, [list(handle)])
                    except StaleHandle as error:
                        if error.details.get("reason"):
                            raise
                        raise refusal from None
                    self._request(Op.RELEASE, [list(handle)])  # it took it: the table rules
                raise refusal
        if retain:
            self._request(Op.RETAIN, [list(handle)])
        return self._buffer(list(handle), "retained" if retain else "attached")

    def _not_live(self, handle: Handle, table: memoryview) -> StaleHandle:
        """Why attach refuses `handle`, from its block's word in the table."""
        index = handle.offset >> self._min_shift
        word = table[index]
        if index << self._min_shift != handle.offset:
            reason = "not_a_block"
            what = (
                f"offset {handle.offset:#x} is not the start of a block (blocks start at "
                f"multiples of {1 << self._min_shift} bytes): not a handle shmarena gave out"
            )
        else:
            reason = gens.reason_key(word, handle.generation)
            what = gens.what_happened(word, handle.generation) or "it is not live"
        place = f"offset {handle.offset:#x}" + (
            f" of segment {handle.segment}" if handle.segment else ""
        )
        return lifetime_error(
            _RULE_OF_REASON.get(reason, "use_after_free"),
            f"attach of handle {tuple(handle)} ({place})",
            f"{what}; nothing was attached (the bytes there may belong to someone else now)",
            handle=list(handle),
            reason=reason,
            word=word,
        )

    def _mark(self, address: int, generation: int, reason: int) -> None:
        """Write a block's word in the generation table: live under
        `generation` (reason gens.LIVE; its handle is leaving this process),
        or let go for `reason` if it is still live under `generation`."""
        table = self._tables.get(address >> SEGMENT_SHIFT)
        if table is None:
            return
        index = (address & OFFSET_MASK) >> self._min_shift
        if reason == gens.LIVE:
            table[index] = generation
        elif table[index] == generation:
            table[index] = gens.dead_word(generation, reason)

    def retain(self, target: Buffer | Handle) -> None:
        """Take a reader's reference on a block (see `attach`)."""
        handle = _handle_of(target)
        self._request(Op.RETAIN, [list(handle)])
        if isinstance(target, Buffer) and target._state == "attached":
            target._state = "retained"

    def release(self, target: Buffer | Handle) -> None:
        """Drop a reference taken with `attach(..., retain=True)` or `retain()`."""
        if isinstance(target, Buffer):
            handle = target._make_handle()  # its owner may have been recycled: still ours
        else:
            handle = _as_handle(target)
        pin = target._release_views() if isinstance(target, Buffer) else None
        cache = self._cache
        if pin is not None and cache is not None:
            # Views of it outlive this reference: keep the block out of reuse.
            cache.post(PIN, target._offset, handle.generation)  # type: ignore[union-attr]
            self._watch(pin, target._offset, handle.generation)  # type: ignore[union-attr]
        self._request(Op.RELEASE, [list(handle)])
        if isinstance(target, Buffer):
            target._done("released")

    def ndarray(
        self, shape: Any, dtype: Any = "float64", order: str = "C", *, site: str | None = None
    ) -> Any:
        """A new numpy array (uninitialised) in a block of its own, freed when the
        array and every view of it are gone; `shmarena.share(array)` names it for
        other processes; `site` labels its block as for `alloc`. Needs numpy
        (`pip install 'shmarena[numpy]'`)."""
        return arrays.ndarray(self, shape, dtype, order, site)

    def ndarray_like(self, array: Any, *, site: str | None = None) -> Any:
        """`client.ndarray` of `array`'s shape, dtype and order (Fortran for a
        Fortran-contiguous array), holding a copy of its data."""
        return arrays.ndarray_like(self, array, site)

    # -- owners ------------------------------------------------------------

    def owner(self, name: str, detached: bool = False, *, quota: int | None = None) -> Owner:
        """The owner `name`, created now if needed (it shows in `shmarena owners`
        at once). As a context manager, leaving the block recycles a
        session-scoped owner. `quota` (bytes; 0 removes it) caps what the
        owner may hold: an allocation over it raises QuotaExceeded. An owner
        with a quota allocates through the daemon (no cache), which checks it."""
        if quota is not None and (type(quota) is not int or quota < 0):
            raise ValueError(f"quota must be a number of bytes (0: none), got {quota!r}")
        (row,) = self._request(Op.OWNER, name, detached, -1 if quota is None else quota)
        return Owner(self, name, detached, int(row.get("id", 0)), int(row.get("quota", 0)))

    def _reopen(self, name: str) -> int:
        """A session-scoped owner used after it was recycled (or from a new
        session): open it again for the id of its cache hand-outs."""
        (row,) = self._request(Op.OWNER, name, False, -1)
        owner_id = int(row.get("id", 0))
        self._owner_ids[name] = (self.session, owner_id)
        return owner_id

    def set_quota(self, owner: str, quota: int) -> None:
        """Set the quota of the owner `owner` (any owner, by name; "" sets the
        daemon's per-session quota) to `quota` bytes, 0 for none. What is held
        already stays, even over it; `shmarena quota` does the same."""
        self._request(Op.QUOTA, owner, quota)

    def recycle(self, name: str) -> Recycled:
        """Free every block the owner holds, in one call, and remove the owner.

        Its Buffers in this process are done; blocks this process still has
        views of are pinned until the last of them is gone (see `free`).
        UnknownOwner if there is no owner of that name.
        """
        ours = self._pin_owner(name) if self._viewed else []
        try:
            (blocks, freed), notices = self._request(Op.RECYCLE, name)
        finally:
            self._owner_ids.pop(name, None)  # its id goes with it (Owner.id)
        for buf in ours:
            buf._done("recycled")
        if self._cache is not None:
            self._cache.notice(notices)
        return Recycled(blocks, freed)

    # -- named buffers -----------------------------------------------------

    def publish(self, name: str, target: Buffer | Handle, *, sealed: bool = True) -> Handle:
        """Bind `name` to the block, for any process to `lookup`. Sealed (the
        default): read-only from now on, for this Buffer and every lookup. The
        name vanishes by itself when the block leaves its owner. NameExists if
        the name is taken."""
        return names.publish(self, name, target, sealed)

    def unpublish(self, name: str) -> None:
        """Remove the name (the block stays); UnknownName if there is none."""
        self._request(Op.UNPUBLISH, name)

    def lookup(self, name: str, timeout: float | None = 0.0) -> Buffer:
        """The block published as `name`, retained for this process (let it go
        with `buf.release()`; it goes anyway when the process ends). Waits up to
        `timeout` seconds (None: for ever) and returns the moment it is
        published; UnknownName if it was not. The wait holds this client's
        connection: give a thread that waits long a client of its own."""
        return names.lookup(self, name, timeout)

    def names(self, prefix: str = "") -> list[dict[str, Any]]:
        """The published names starting with `prefix` (`shmarena names --json`)."""
        return self._listing(Op.NAMES, "name", prefix)

    def subscribe(self, prefix: str = "") -> names.Subscription:
        """Follow every publish and recycle of names starting with `prefix`
        from now on, in order (an iterator of `Event`; its own connection)."""
        return names.Subscription(self, prefix)

    # -- introspection -----------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The daemon's figures (the same as `shmarena stats --json`)."""
        (stats,) = self._request(Op.STATS)
        return dict(stats)

    def blocks(self, max_blocks: int | None = None) -> dict[str, Any]:
        """The arena's layout (what `shmarena map` draws): per segment its used
        blocks as flat [offset, size, holder index] and free runs as flat
        [offset, size], the holder names, and "truncated" when there were more
        than `max_blocks` blocks (default and cap: 200 000)."""
        args = () if max_blocks is None else (max_blocks,)
        (layout,) = self._request(Op.BLOCKS, *args)
        return dict(layout)

    def list_owners(self) -> list[dict[str, Any]]:
        """One row per owner (the same as `shmarena owners --json`): detached
        first, then by bytes held (most first), then by name."""
        rows = self._listing(Op.OWNERS, "name")
        rows.sort(key=lambda r: (r["scope"] != "detached", -r["bytes"], r["name"]))
        return rows

    def top_owners(self, count: int) -> list[dict[str, Any]]:
        """The `count` owners holding the most bytes (most first, then by
        name; at most 10 000), rows as in `list_owners`, in one request
        however many owners exist: what `shmarena top` shows. `stats()`
        has the number of owners in all."""
        if count < 1:
            raise ValueError(f"top_owners: count must be 1 or more, got {count}")
        rows, _ = self._request(Op.OWNERS, "", count, "bytes")
        return list(rows)

    def list_clients(self) -> list[dict[str, Any]]:
        """One row per connected session (the same as `shmarena clients --json`)."""
        return self._listing(Op.CLIENTS, "session")

    def _listing(self, op: Op, key: str, *args: Any) -> list[dict[str, Any]]:
        """Every row of a listing the daemon sends in pages (protocol.py,
        OWNERS), one request per page. A row that changed between pages
        may come twice: its later one is kept."""
        rows: dict[Any, dict[str, Any]] = {}
        cursor = ""
        while True:
            page, cursor = self._request(op, *args, cursor, self.listing_page)
            for row in page:
                rows.pop(row[key], None)
                rows[row[key]] = row
            if cursor is None:
                return list(rows.values())

    def check(self) -> list[str]:
        """Verify the daemon's allocator and ledger invariants; [] when healthy."""
        (problems,) = self._request(Op.CHECK)
        return list(problems)

    def sync(self) -> None:
        """Wait until the daemon has applied everything this client did so far
        (cache hand-outs, frees sent without waiting). Raises a refusal of any
        of them, as the exception the daemon gave."""
        (notices,) = self._request(Op.SYNC)
        cache, transport = self._cache, self._transport
        if cache is not None:
            cache.notice(notices)
        if transport is not None:
            try:
                transport.raise_late()
            except SessionLost as error:
                self._lose_session(transport, error)
                raise

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
    cache: bool = True,
    populate: bool = False,
    retry_s: float = DEFAULT_RETRY_S,
) -> Client:
    """Connect to the daemon `name` (see `Client`; `cache=False` sends every
    alloc to the daemon; `populate=True` maps every page of the arena up front)."""
    return Client(
        name,
        runtime_dir=runtime_dir,
        timeout_s=timeout_s,
        label=label,
        cache=cache,
        populate=populate,
        retry_s=retry_s,
    )


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _caller_site() -> str:
    """'file.py:LINE function' of the nearest caller outside shmarena."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return "?"
    code = frame.f_code
    return f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}"


def _default_runtime_dir() -> str:
    return runtime_dir(os.environ, os.getuid())


def _locator(where: dict[str, Any]) -> str:
    """A segment's shm name or file path, and its index: with the epoch, its
    mapping's key (a memfd's /proc path may come back for a later segment;
    indices never do)."""
    return f"{where.get('shm') or where['path']}#{int(where.get('index', 0))}"


def _mapped_view(key: tuple[str, int]) -> memoryview | None:
    found = _MAPPINGS.get(key)
    return None if found is None else found[1]


def _map(
    key: tuple[str, int],
    where: dict[str, Any],
    populate: bool,
    used: set[tuple[str, int]],
    owner_uid: int | None,
    words: bool = False,
) -> memoryview:
    """The process's one mapping of a segment: shm by name, or a file (a
    backing file, a hugetlbfs file, the daemon's memfd) by path and offset,
    made only if it belongs to `owner_uid`, the daemon's uid. The client
    whose `used` set this is counts as one of its users. With `words`, the
    view is of 64-bit words (a generation table)."""
    with _MAPPINGS_LOCK:
        found = _MAPPINGS.get(key)
        if found is None:
            size = int(where["size"])
            if "shm" in where:
                mapping = map_segment(str(where["shm"]), size, populate, owner_uid)
            else:
                offset = int(where["offset"])
                mapping = map_file(str(where["path"]), size, offset, populate, owner_uid)
            found = (mapping, memoryview(mapping).cast("Q") if words else memoryview(mapping))
            _MAPPINGS[key] = found
        if key not in used:
            used.add(key)
            _MAPPING_USERS[key] = _MAPPING_USERS.get(key, 0) + 1
        return found[1]


def _map_table(
    where: dict[str, Any], epoch: int, used: set[tuple[str, int]], owner_uid: int | None
) -> memoryview | None:
    """The process's one mapping of a segment's generation table, as 64-bit
    words; None when the daemon keeps none (an older daemon)."""
    table = where.get("gens")
    if not table:
        return None
    return _map(_table_key(where, epoch), table, False, used, owner_uid, words=True)


def _table_key(where: dict[str, Any], epoch: int) -> tuple[str, int]:
    """A table's mapping key: its name or path, the serial the daemon gave
    it (a name comes back with another object after a restart) and its
    segment's index."""
    table = where["gens"]
    name = table.get("shm") or table["path"]
    return (f"{name}@{int(table.get('serial', 0))}#{int(where.get('index', 0))}", epoch)


def _unmap_released(epoch: int, rows: list[dict[str, Any]]) -> None:
    """Unmap this process's mappings of segments of `epoch` that the daemon's
    table `rows` shows released (below its newest index and not listed:
    indices only grow, so an older table cannot hide a newer segment),
    unless a buffer still looks at them."""
    listed = {_locator(row) for row in rows}
    listed |= {_table_key(row, epoch)[0] for row in rows if row.get("gens")}
    newest = max((int(row["index"]) for row in rows), default=0)
    with _MAPPINGS_LOCK:
        for key in list(_MAPPINGS):
            index = int(key[0].rsplit("#", 1)[1])
            if key[1] == epoch and 0 < index < newest and key[0] not in listed:
                _MAPPING_USERS.pop(key, None)
                _unmap(key)


def _unmap(key: tuple[str, int]) -> None:
    """Unmap a mapping unless a buffer still looks at it (then it stays,
    with a fresh view). Called with _MAPPINGS_LOCK held."""
    found = _MAPPINGS.get(key)
    if found is None:
        return
    mapping, view = found
    words = view.format == "Q"  # a generation table
    try:
        view.release()
        mapping.close()
    except BufferError:  # buffers (or arrays made from them) still look at it
        _MAPPINGS[key] = (mapping, memoryview(mapping).cast("Q") if words else memoryview(mapping))
        return
    del _MAPPINGS[key]


def _freed_already(buf: Buffer) -> StaleHandle:
    where = f"offset {buf.offset:#x}" + (f" of segment {buf.segment}" if buf.segment else "")
    recycled = buf._gone == "recycled"
    return lifetime_error(
        "owner_recycled" if recycled else "double_free",
        f"free of the buffer at {where} (generation {buf._gen})",
        "its owner was recycled already; nothing was freed"
        if recycled
        else "this Buffer was freed (or released) already; nothing was freed",
        offset=buf.offset,
        generation=buf._gen,
    )


def _other_epoch(epoch: int, current: int, what: str) -> StaleHandle:
    return StaleHandle(
        f"{what}: the block is from arena epoch {epoch}, the daemon serves epoch {current}: "
        "it was restarted since and that block no longer exists (its bytes are no longer "
        "shared with anyone); nothing was done",
        epoch=epoch,
        daemon_epoch=current,
    )


def _check_size(size: int) -> None:
    if type(size) is not int or size <= 0:
        raise InvalidRequest(f"buffer size must be a positive int of bytes, got {size!r}")


def _as_handle(value: Any) -> Handle:
    if type(value) is Handle:  # the common case, checked without a loop (attach's hot path)
        e, s, o, z, g = value
        if (
            type(e) is type(s) is type(o) is type(z) is type(g) is int
            and -_HANDLE_FIELD_LIMIT <= min(value)
            and max(value) < 2 * _HANDLE_FIELD_LIMIT
        ):
            return value
    if isinstance(value, Handle):
        handle = value
    elif isinstance(value, (tuple, list)) and len(value) == 5:
        handle = Handle(*(int(v) for v in value))
    else:
        raise InvalidRequest(f"not a shmarena handle: {value!r:.80}")
    bad = [
        f"{name} {field:#x}"
        for name, field in zip(Handle._fields, handle, strict=True)
        if not (type(field) is int and -_HANDLE_FIELD_LIMIT <= field < 2 * _HANDLE_FIELD_LIMIT)
    ]
    if bad:  # it could not even be sent: the daemon would refuse it anyway
        raise InvalidRequest(
            f"not a shmarena handle: {', '.join(bad)} does not fit in 64 bits; nothing was done",
            handle=[repr(f)[:40] for f in handle],
        )
    return handle


_HANDLE_FIELD_LIMIT = 1 << 63
# The rule a stale attach broke, by what the generation table says happened.
_RULE_OF_REASON = {
    "recycled": "owner_recycled",
    "session_ended": "producer_exited",
    "never": "handle_altered",
    "not_a_block": "handle_altered",
}


def _handle_of(item: Buffer | Handle) -> Handle:
    return item.handle if isinstance(item, Buffer) else _as_handle(item)
