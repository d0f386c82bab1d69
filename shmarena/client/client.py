"""The client library: connect, alloc, free, owners, attach, stats.

This module is the Client's session: hello, resume, reconnect, fork, the
heartbeat and the flusher, and every use of the Transport (client/transport.py)
is here. The Client's other jobs are one module each, assembled by the MRO
(see client/base.py): allocating.py, freeing.py, owners.py, attaching.py,
admin.py and ndarrays.py; the mappings it shares with the process's other
clients are client/mappings.py.

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
import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from shmarena.client import chosen, mappings, pushes
from shmarena.client.admin import Admin
from shmarena.client.allocating import Allocating
from shmarena.client.attaching import Attaching
from shmarena.client.buffer import Buffer
from shmarena.client.cache import FLUSH_DELAY_S, Cache
from shmarena.client.freeing import Freeing
from shmarena.client.gentables import GenTables
from shmarena.client.handles import handle_of as _handle_of
from shmarena.client.ndarrays import Arrays
from shmarena.client.owners import Owner, Owning, Recycled
from shmarena.client.transport import Transport
from shmarena.config import (
    DEFAULT_RETRY_S,
    DEFAULT_TIMEOUT_S,
    resolve_name,
    runtime_dir,
    socket_path,
)
from shmarena.errors import DaemonUnavailable, SessionLost, ShmArenaError
from shmarena.limits import MAX_LISTING_ROWS
from shmarena.protocol import PROTOCOL_VERSION, Op

# Importable from here as before this module was split (users, aio.py).
__all__ = ["Buffer", "Client", "Owner", "Recycled", "_handle_of", "connect"]

_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()
# Transports inherited across fork(): kept referenced so they are never
# closed (or garbage collected) in the child, which would disturb the parent.
_ABANDONED: list[Transport] = []


def _after_fork_in_child() -> None:
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


class Client(Allocating, Freeing, Owning, Attaching, Admin, Arrays):
    """A connection to the shmarena daemon called `name`.

    `name` defaults to $SHMARENA_NAME, else "default"; `runtime_dir` to
    $SHMARENA_RUNTIME_DIR, else $XDG_RUNTIME_DIR/shmarena, else
    /tmp/shmarena-<uid>. Every call waits at most `timeout_s` for the daemon,
    then raises DaemonUnavailable; a request still unanswered after `retry_s`
    is sent again with the same id (the daemon answers a repeat from its reply
    cache, never runs it twice). After the daemon was restarted, one call
    raises SessionLost and the next connects again (see `reconnect`).

    The first Client of a process (any name) makes its daemon the process
    default, which `shmarena.dumps`, `Queue`, `share` ... use when given no
    `client=`; `shmarena.set_default` chooses explicitly (client/chosen.py).

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
        self._stop_heartbeat = threading.Event()
        self.info: dict[str, Any] = {}
        self.session = 0
        self.epoch = 0
        self._arena_view: memoryview | None = None  # segment 0
        self._segment_info: dict[int, dict[str, Any]] = {}
        self._views: dict[int, memoryview] = {}
        self._keys: dict[int, mappings.Key] = {}
        self._gentables = GenTables()
        self._used: set[mappings.Key] = set()
        self._token = 0
        self._cache: Cache | None = None
        self._flush_wake = threading.Event()
        self._flusher: threading.Thread | None = None
        self._push: weakref.finalize[Any, Any] | None = None  # closes this session's push socket
        self._push_sub: pushes.Subscription | None = None  # that socket, for sync()
        self._pid = os.getpid()
        self._closed = False
        # rows asked for per page of a listing (list_owners, ...); the daemon
        # sends at most MAX_LISTING_ROWS
        self.listing_page = MAX_LISTING_ROWS
        self._owner_ids: dict[str, tuple[int, int]] = {}
        # A SessionLost found by the heartbeat thread, raised by the next call.
        self._pending_loss: SessionLost | None = None
        # The pin rule (client/buffer.py): so a recycle, a notice or a free by
        # handle finds the views of a block.
        self._viewed: dict[int, Buffer] = {}
        self._pins: dict[int, weakref.ref[memoryview]] = {}  # id(ref) -> ref
        self._prune_at = 1024  # table size at which dropped, unviewed Buffers are let go
        self._alive_at = 0.0  # monotonic time of the last reply (lease mode only)
        self._connect()
        _CLIENTS.add(self)
        chosen.note_connect(self.name, self.runtime_dir)  # the first chooses the process default

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
            key = (mappings.locator(first), info["epoch"])
            view = mappings.map_view(key, first, self.populate, self._used, transport.daemon_uid)
            table = mappings.map_table(first, info["epoch"], self._used, transport.daemon_uid)
        except BaseException:
            transport.close()
            raise
        self.info = info
        self.session = info["session"]
        self.epoch = info["epoch"]
        self._segment_info = segments
        self._arena_view = view
        self._views, self._keys = {0: view}, {0: key}
        # Resumed: the tables of other segments mapped so far are still the
        # daemon's (escape() may write them before a new lookup maps them).
        tables = self._gentables.tables
        if table is None or not info.get("resumed"):
            tables.clear()
        if table is not None:
            tables[0] = table
        self._gentables.min_shift = int(info["min_block_bytes"]).bit_length() - 1
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
                self._gentables.mark,
                self._recall,
                view,
                enabled=self.cache_enabled,
                clock=time.monotonic,
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
        self._listen(cache, transport)

    def _listen(self, cache: Cache, transport: Transport) -> None:
        """A push socket for this session (client/pushes.py), replacing the
        last one: notices and requests to give memory back come on it."""
        if self._push is not None:
            self._push()  # the previous session's (or socket's)
            self._push = None
        if not cache.max_bytes:
            return  # no cache: nothing to be told, nothing to give
        sub = pushes.subscribe(self.socket_path, self.session, self._token, cache, transport)
        self._push_sub = sub
        if sub is not None:
            self._push = weakref.finalize(self, pushes.unsubscribe, sub, os.getpid())
            self._push.atexit = False  # at exit the listener closes them all

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
                except Exception:  # noqa: BLE001 - the next real call reports what is wrong
                    pass

        threading.Thread(target=beat, name="shmarena-heartbeat", daemon=True).start()

    def _wake_flusher(self) -> None:
        """Called (under the cache lock) when bookkeeping starts to queue up."""
        self._flush_wake.set()
        if self._flusher is None:
            thread = threading.Thread(target=self._flush_loop, name="shmarena-flush", daemon=True)
            self._flusher = thread
            thread.start()

    def _flush_loop(self) -> None:
        """Send queued bookkeeping at most FLUSH_DELAY_S after it started to
        queue, so the daemon's picture is never far behind an idle process;
        and give back the large blocks the cache kept idle too long.

        Idle, the thread waits for the first queued event, or for the moment
        the coldest kept large block is due (Cache.decay: a few times a second
        at most, never while none is kept). Busy, it looks every
        FLUSH_DELAY_S, so a stream of events costs 200 wake-ups a second, not
        one per event (a wake-up per event slows every round trip of a
        two-CPU machine)."""
        wake = self._flush_wake
        due: float | None = None
        while True:
            wake.wait(due)
            wake.clear()
            while True:
                if self._closed or self._pid != os.getpid():
                    return
                time.sleep(FLUSH_DELAY_S)  # let a burst gather into one message
                cache, transport = self._cache, self._transport
                if cache is None or transport is None:
                    due = None
                    break
                due = cache.decay()
                if not cache.dirty:
                    break  # everything went out with a request meanwhile: idle again
                # Whatever fails here, the next call that waits for the daemon reports.
                with contextlib.suppress(Exception):
                    transport.flush()

    def _forked(self) -> None:
        if self._transport is not None:
            _ABANDONED.append(self._transport)
        self._transport = None
        self._cache = None  # the parent's: its blocks are the parent session's
        self._viewed, self._pins = {}, {}  # the parent's Buffers and pins
        self._flusher = None
        self._flush_wake = threading.Event()
        self._lock = threading.Lock()
        if self._push is not None:
            self._push.detach()  # the parent's push socket: never touched here
            self._push = None
        self._push_sub = None

    def _lease_checked(self, method: Callable[..., Buffer], lease_s: float) -> Any:
        """`method`, checking the session first when the lease may have run out."""

        def checked(*args: Any, **kwargs: Any) -> Buffer:
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
        self._forget_views("close")
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
            mappings.unuse(self._used)
            self._push_sub = None
            if self._push is not None:
                self._push()  # its push socket, closed by the listener thread

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def cache_max_bytes(self) -> int:
        """The largest size served from this process's cache (0: no cache)."""
        cache = self._cache
        return cache.max_bytes if cache is not None else 0

    @property
    def _tables(self) -> dict[int, memoryview]:
        """Segment -> its generation table (shm/gens.py), for tests."""
        return self._gentables.tables

    def __repr__(self) -> str:
        return f"<shmarena.Client {self.name!r} session={self.session} epoch={self.epoch}>"

    def sync(self) -> None:
        """Wait until the daemon has applied everything this client did so far
        (cache hand-outs, frees sent without waiting). Raises a refusal of any
        of them, as the exception the daemon gave."""
        notices, pushed = self._request(Op.SYNC)[:2]
        cache, transport = self._cache, self._transport
        if cache is not None:
            cache.notice(notices)
        sub = self._push_sub
        if pushed and sub is not None:
            # Notices pushed before the SYNC reply: back in the cache once
            # the listener handled them (a lost push only costs the wait).
            sub.wait_noticed(pushed, self.timeout_s)
        if transport is not None:
            try:
                transport.raise_late()
            except SessionLost as error:
                self._lose_session(transport, error)
                raise

    def shutdown(self) -> None:
        """Ask the daemon to stop cleanly (it removes socket, lock and arena).
        If it was this process's default daemon, it no longer is."""
        self._request(Op.SHUTDOWN)
        self._closed = True
        chosen.forget(self.name, self.runtime_dir)  # no longer anyone's default daemon
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
    alloc to the daemon; `populate=True` maps every page of the arena up front;
    `label` names this client in `shmarena clients`). The first connect of a
    process makes its daemon the process default (see `shmarena.set_default`)."""
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


def _default_runtime_dir() -> str:
    return runtime_dir(os.environ, os.getuid())
