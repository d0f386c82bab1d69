"""The daemon's I/O shell: ZeroMQ ROUTER, pidfds, signals, timers. Decides nothing.

Every request frame goes to `Service.receive`; the server sends the replies
it returns and performs its effects (effects.py): it watches a new client's
pid with a pidfd and tells the service whether it could (`Service.watched`,
which answers the hello), closes the pidfd of a session that ended, writes
the log events and stops when asked. Around that it does what the pure
service cannot: it owns the runtime dir, the lock file, the arena (arenas.py)
and the socket (listener.py); a readable pidfd (liveness.py) reclaims a dead
client's blocks at once; it runs the lease timer for clients it cannot
watch; it sends replies (outbound.py); and it stops cleanly on SIGTERM,
SIGINT or a shutdown request, removing socket, lock and arena. It reads the
time from a `Clock` (clock.py).

Each call into the service and each piece of the loop's own per-turn work
(timers, reclaims, the metrics snapshot, commits) runs through `_isolated`:
a bug there is handed to `Service.internal_error` (counted, logged with its
traceback, state checked) and the loop goes on. The one failure that stops
the daemon on purpose is a persistent table that cannot be written.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import zmq

from shmarena.config import DEFAULT_MIN_BLOCK_BYTES, format_size, lock_path, shm_name, socket_path
from shmarena.daemon.arenas import Arenas
from shmarena.daemon.clock import Clock, SystemClock
from shmarena.daemon.effects import Effect, Log, Outcome, Stop, Unwatch, Watch
from shmarena.daemon.listener import Listener, remove
from shmarena.daemon.liveness import Watcher, peer_creds, process_start_ticks
from shmarena.daemon.logs import EventLog, LogEvent
from shmarena.daemon.logwriter import QueuedWriter
from shmarena.daemon.metrics import METRICS_MAX_CONNECTIONS, Exporter
from shmarena.daemon.options import DaemonOptions, resolve_group
from shmarena.daemon.outbound import Outbound
from shmarena.daemon.poller import EpollPoller
from shmarena.daemon.service import Creds, Service
from shmarena.daemon.startup import announce, arena_info, log_stop, take_lock
from shmarena.daemon.store import Store, new_epoch
from shmarena.daemon.table import State
from shmarena.errors import DaemonStartError, ShmArenaError
from shmarena.limits import (
    MAX_BUFFERED_REPLIES,
    MAX_FRAME_BYTES,
    MAX_FRAMES,
    MAX_QUEUED_REPLY_BYTES,
)
from shmarena.rundir import clear_socket_path, prepare_runtime_dir
from shmarena.shm import gens
from shmarena.shm.arena import Arena, GenTable, remove_stale_segments
from shmarena.shm.journal import CrashPoints

__all__ = ["DaemonOptions", "Server", "process_start_ticks", "resolve_group", "run_daemon"]

# Messages handled per wake-up of the loop before pidfds and timers get a turn.
MESSAGES_PER_WAKE = 32
# Plain ints for the per-message calls (zmq's are enums: `|` and `&` on them
# run Python code).
NOBLOCK, RCVMORE, EVENTS, POLLIN = (
    int(zmq.NOBLOCK), int(zmq.RCVMORE), int(zmq.EVENTS), int(zmq.POLLIN)
)  # fmt: skip
# Unix socket paths are limited to 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


class Server:
    """One daemon: start, serve, close (see the module's docstring)."""

    def __init__(
        self, options: DaemonOptions, log: EventLog | None = None, clock: Clock | None = None
    ) -> None:
        self.options = options
        self.clock: Clock = clock or SystemClock()
        self.writer: QueuedWriter | None = None
        if log is None:
            # Lines leave through a thread: a stderr nobody reads never stalls serving.
            self.writer = QueuedWriter(
                lambda line: print(line, file=sys.stderr, flush=True), self._dropped_note
            )
            log = EventLog(options.log_format, self.writer, self.clock.time)
        self.log = log
        self.socket_path = socket_path(options.run_dir, options.name)
        self.lock_path = lock_path(options.run_dir, options.name)
        self.shm_name = shm_name(options.name)
        self.lock_fd: int | None = None
        self.gid = resolve_group(options.group) if options.group is not None else None
        self.arenas = Arenas(options, self.gid, log, self.clock)
        self.store: Store | None = None
        self.crash = CrashPoints(options.debug_crash_at)
        self.context: zmq.Context[Any] | None = None
        self.router: zmq.Socket[Any] | None = None
        self.service: Service | None = None
        self.poller = EpollPoller()
        self.listener = Listener(
            options.name, self.socket_path, self.gid, options.metrics_port is not None
        )
        self.watcher = Watcher(self.poller, self.listener.has_room)
        self.outbound: Outbound | None = None
        self._stop_signal: int | None = None
        self._stopping = False  # a Stop effect: a shutdown request
        self._wake_r = self._wake_w = -1
        self.monitor: zmq.Socket[Any] | None = None
        self._served = False  # the table was written at start: a clean stop may write it
        self.metrics: Exporter | None = None
        # With a durable table, replies wait until what they acknowledge is
        # written: per wake-up (batch) or per request (sync).
        self._durable = options.backing is not None and options.durability != "none"
        self._unsent: list[tuple[bytes, bytes]] = []

    def _dropped_note(self, count: int) -> str:
        note = f"{count} log lines dropped: stderr was not read fast enough"
        return self.log.render(LogEvent("log_dropped", note, "warning", {"lines": count}))

    # -- start -------------------------------------------------------------

    def start(self) -> None:
        """Take the name, create the arena, bind the socket. On failure,
        everything already made is removed again and DaemonStartError raised."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        opts = self.options
        if len(self.socket_path) > MAX_SOCKET_PATH:
            raise DaemonStartError(
                f"socket path {self.socket_path} is {len(self.socket_path)} bytes, over the "
                f"{MAX_SOCKET_PATH}-byte limit of Unix sockets; use a shorter "
                "SHMARENA_RUNTIME_DIR or --name"
            )
        prepare_runtime_dir(opts.run_dir, self.gid)
        self.lock_fd = take_lock(self.lock_path, opts.name)
        if clear_socket_path(self.socket_path):
            self.log(f"removed stale socket {self.socket_path}", "stale_socket_removed",
                     path=self.socket_path)  # fmt: skip
        clear_socket_path(self.listener.paused_path)  # a dead daemon's, renamed while paused
        started_at = self.clock.time()
        state = None
        if opts.backing is not None:
            self.store, state = Store.open(
                opts.backing, opts.size_bytes, opts.min_block_bytes, opts.allocator,
                opts.name, opts.durability, self.gid, self.crash, opts.compact_bytes, self.log,
            )  # fmt: skip
            header = self.store.backing.header
            size_bytes, min_block = header.data_bytes, header.min_block_bytes
            epoch, allocator = state.epoch, header.allocator
        else:
            size_bytes = self._make_first_segment()
            epoch = new_epoch()
            min_block = opts.min_block_bytes or DEFAULT_MIN_BLOCK_BYTES
            allocator = opts.allocator or "extents"
        data_offset = self.store.backing.header.data_offset if self.store else 0
        info = arena_info(
            opts,
            (size_bytes, min_block, epoch, allocator),
            (self.shm_name, self.socket_path, data_offset),
            self.arenas.pages,
            self.arenas.node_cpus,
            self.gid,
            started_at,
        )
        self.service = Service(
            info, new_token=lambda: secrets.randbits(63), grow=self.arenas.add_segment
        )
        self.arenas.service = self.service
        self._first_table(size_bytes, min_block)
        self.service.extra_checks = self.arenas.check_tables
        self.service.extra_stats = self._extra_stats
        self.service.faults = frozenset(opts.debug_fail)
        if self.store is not None and state is not None:
            self._recover(self.store, state, started_at)
        self._open_socket()

    def _make_first_segment(self) -> int:
        """Create segment 0 of a shm arena; its size (whole pages)."""
        opts = self.options
        assert opts.size_bytes is not None
        pages = self.arenas.pages = self.arenas.plan_pages(opts.size_bytes)
        size_bytes = pages.round(opts.size_bytes)
        if size_bytes != opts.size_bytes:
            self.log(
                f"--size {format_size(opts.size_bytes)} rounded up to "
                f"{format_size(size_bytes)}, a whole number of "
                f"{format_size(pages.page_bytes)} pages",
                "size_rounded",
                requested_bytes=opts.size_bytes,
                size_bytes=size_bytes,
                page_bytes=pages.page_bytes,
            )
        # Segments a daemon of this name left when it died (after the lock:
        # no live daemon of this runtime dir holds them).
        for directory in {"/dev/shm", pages.directory}:
            for path in remove_stale_segments(self.shm_name, directory):
                self.log(f"removed stale segment {path}", "stale_segment_removed", path=path)
        self.arenas.arenas[0] = Arena.create(self.shm_name, size_bytes, self.gid, pages)
        return size_bytes

    def _first_table(self, size_bytes: int, min_block: int) -> None:
        """The generation table of segment 0, and where clients map both."""
        assert self.service is not None
        arenas, tables = self.arenas.arenas, self.arenas.tables
        if 0 in arenas:
            self.service.segments[0] = {"index": 0, **arenas[0].locator}
            tables[0] = GenTable.create(
                self.shm_name, size_bytes, min_block, self.gid, arenas[0].kind
            )
        else:
            assert self.options.backing is not None
            path = os.path.abspath(self.options.backing) + gens.TABLE_SUFFIX
            tables[0] = GenTable.beside(path, size_bytes, min_block, self.gid)
        self.service.segments[0]["gens"] = tables[0].locator
        self.service.ledger.gens = self.arenas.mark

    def _open_socket(self) -> None:
        opts = self.options
        self.context = zmq.Context()
        router = self.context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        # A client that does not read its replies fills its pipe: the send
        # then fails at once (ROUTER_MANDATORY, NOBLOCK) instead of queueing
        # without end (see outbound.py).
        router.setsockopt(zmq.SNDHWM, MAX_BUFFERED_REPLIES)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.RCVHWM, 100_000)
        router.setsockopt(zmq.BACKLOG, self.listener.accept_backlog)
        self.router = router
        assert self.service is not None
        self.outbound = Outbound(router, self.log, self.service.session_of, self.clock)
        self.outbound.debug(opts.debug_drop_replies, opts.debug_delay_ms, opts.debug_seed)
        self.listener.listen(router)
        self.poller.register(router, zmq.POLLIN, always=True)  # replies go out on it
        self.monitor = router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.poller.register(self.monitor, zmq.POLLIN)
        if opts.metrics_port is not None:
            self.metrics = Exporter(opts.metrics_bind, opts.metrics_port)
            self.metrics.start()
            self.poller.register(self.metrics.fd, zmq.POLLIN)
            self.log(
                f"metrics: Prometheus text at {self.metrics.url}", "metrics", url=self.metrics.url
            )

    def _recover(self, store: Store, state: State, now: float) -> None:
        """Load the table into the service; reclaim sessions whose process is
        gone; watch the others while they have `grace_s` to come back."""
        assert self.service is not None
        service = self.service
        ledger, links = store.build(state, self.options.name, now)
        service.adopt(ledger, links, now)
        self.arenas.rebuild_table(ledger)
        ledger.gens = self.arenas.mark
        for note in store.recovered.notes:
            self.log(note, "recovery_note")
        if store.recovered.reset:
            self.log(store.recovered.reset, "table_reset", "warning")
        for session_id, session in list(ledger.sessions.items()):
            # A session that was watched by pidfd names a process of this pid
            # namespace: if that is gone, so is the client. One on a lease may
            # come from another namespace (its pid means nothing here): it has
            # the grace, then its lease.
            if session.watched and process_start_ticks(session.pid) != session.start_ticks:
                service.reclaim(session_id, "exited", now)  # the service logs it
                continue
            watching = self.watcher.watch(session_id, session.pid, session.start_ticks)
            service.watched(session_id, watching)
        store.begin(service, self.options.backing or "")
        self._served = True
        ledger.take_changes()
        self._perform(service.take_effects())
        self.log(
            store.describe(), "table_opened", backing=store.backing.path, durability=store.mode
        )

    def _extra_stats(self) -> dict[str, Any]:
        """What only the server knows: the pages as the kernel reports them,
        NUMA placement, and the persistent table's figures."""
        extra: dict[str, Any] = self.store.stats() if self.store is not None else {}
        # what the generation tables that `attach` checks take (8 bytes per min block)
        tables = self.arenas.tables.values()
        extra["generation_table_bytes"] = sum(t.mapping.size() for t in tables)
        if self.outbound is not None:
            extra["replies"] = self.outbound.stats()
        # The server's own bounds, beside the service's (docs/reliability.md)
        limits = self.service.limits() if self.service is not None else {}
        limits["buffered_replies"] = MAX_BUFFERED_REPLIES
        limits["queued_reply_bytes"] = MAX_QUEUED_REPLY_BYTES
        extra["limits"] = limits
        if self.metrics is not None:
            limits["metrics_connections"] = METRICS_MAX_CONNECTIONS
            extra["metrics"] = self.metrics.where
        extra.update(self.arenas.page_stats())
        return extra

    def _commit(self) -> None:
        """Make this wake-up's changes durable (a file-backed arena), or
        forget them (a shm arena keeps no table)."""
        assert self.service is not None
        if self.store is None:
            self.service.ledger.drop_changes()
            return
        try:
            try:
                if "commit" in self.options.debug_fail:  # a bug that took the changes
                    self.service.ledger.take_changes()
                    raise RuntimeError("fault injected by --debug-fail commit")
                self.store.commit(self.service)
            except OSError:
                raise
            except Exception as error:  # noqa: BLE001 - a bug: the changes it took are written whole instead
                self.service.internal_error(
                    "writing the allocation table", error, None, self.clock.time()
                )
                self.store.rewrite(self.service)
        except OSError:
            raise ShmArenaError(
                f"{self.store.failed}; the daemon stops without answering the requests that "
                "depend on it. Free space or fix the file system and start it again: the "
                "table recovers to the last acknowledged change"
            ) from None

    # -- loop --------------------------------------------------------------

    def serve(self) -> None:
        """Serve until SIGTERM/SIGINT or a shutdown request."""
        assert self.router is not None and self.service is not None and self.outbound
        self._install_signals()
        info = self.service.info
        where = info.backing or self.arenas.arenas[0].where
        announce(self.log, self.options, info, where, self.arenas.pages_kind)
        tick_ms = int(max(0.1, min(1.0, self.options.lease_s / 4)) * 1000)
        next_tick = self.clock.monotonic()
        quiet = -1  # replies sent when the router last read as idle (-1: not known)
        while self._stop_signal is None and not self._stopping:
            wait_ms = self._wait_ms(tick_ms)  # (may send held replies: before the test)
            events = dict(self.poller.poll(wait_ms, quiet == self.outbound.sends))
            quiet = self._read_requests() if events.get(self.router) else -1
            if self._on_events(events):
                quiet = -1
            if self.clock.monotonic() >= next_tick:
                next_tick = self.clock.monotonic() + tick_ms / 1000
                self._on_tick()
                quiet = -1
        self._perform(self.service.take_effects())
        service = self.service
        uptime_s = self.clock.time() - service.info.started_at
        used, sessions = service.ledger.owned_bytes, len(service.ledger.sessions)
        log_stop(self.log, service.info, self._stop_signal, uptime_s, used, sessions)

    def _wait_ms(self, tick_ms: int) -> int:
        """How long the next poll may wait: until the next timer is due."""
        assert self.service is not None and self.outbound is not None
        service = self.service
        recovering = service.admission.recovering and service.recovering_peers()
        wait_ms = tick_ms if not recovering else min(tick_ms, 50)
        wait_ms = self.outbound.wait_ms(wait_ms)
        wake_at = service.next_wake()
        if wake_at is not None:
            wait_ms = min(wait_ms, max(0, int((wake_at - self.clock.time()) * 1000) + 1))
        return wait_ms

    def _read_requests(self) -> int:
        """Drain what is pending, up to a bound: a steady stream of requests
        must not starve the pidfds, signals and timers. The poll said a
        message waits; after each, the socket's EVENTS says whether another
        does (a recv that finds none raises, which costs more). Returns
        `outbound.sends` if that EVENTS, read after the replies, found none
        (the next poll need not look again while nothing is sent), else -1."""
        assert self.router is not None and self.service is not None and self.outbound
        quiet = -1
        router: Any = self.router  # (its getsockopt says int | bytes; EVENTS is an int)
        each = self.store is not None and self.options.durability == "sync"
        for _ in range(MESSAGES_PER_WAKE):
            try:
                peer = router.recv(NOBLOCK)
            except zmq.Again:
                break
            payloads, creds = self._read_message(peer)
            now = self.clock.time()
            for payload in payloads:
                self._deliver(self._receive(peer, payload, now, creds), commit=each)
            if self._stopping:
                break
            if not router.getsockopt(EVENTS) & POLLIN:
                quiet = -1 if self._durable else self.outbound.sends  # (durable: sent below)
                break
        self._commit()
        self._flush()
        return quiet

    def _read_message(self, peer: bytes) -> tuple[list[bytes], Creds | None]:
        """The frames of one message (a client's queued one-way posts, then
        its request: handled in order), and, for a peer without a session
        (its hello), who it is from the kernel, attached to the frame."""
        assert self.router is not None and self.service is not None
        router = self.router
        creds = None
        if self.service.session_of(peer) is not None:
            payloads = [router.recv()]
        else:
            first = router.recv(copy=False)
            creds = peer_creds(first, self.gid)
            payloads = [first.bytes]
        while router.getsockopt(RCVMORE):
            frame = router.recv()
            if len(payloads) <= MAX_FRAMES:
                payloads.append(frame)
        if len(payloads) > MAX_FRAMES:
            payloads = [b"\xc1"]  # never valid msgpack: gets a protocol error
        return payloads, creds

    def _receive(self, peer: bytes, payload: bytes, now: float, creds: Creds | None) -> Outcome:
        """`Service.receive`, timed under its op with --metrics-port."""
        assert self.service is not None
        if self.metrics is None:
            return self.service.receive(peer, payload, now, creds)
        start = time.perf_counter()
        outcome = self.service.receive(peer, payload, now, creds)
        if self.service.last_op is not None:
            self.metrics.latency.observe(self.service.last_op, time.perf_counter() - start)
        return outcome

    def _deliver(self, outcome: Outcome, commit: bool = False) -> None:
        """Perform an outcome's effects, then send its replies (with a
        durable table: once what they acknowledge is written, see _flush)."""
        assert self.outbound is not None
        replies = outcome.replies
        if outcome.effects:
            replies = replies + self._perform(outcome.effects)
        if commit:
            self._commit()
        if self._durable:
            self._unsent += replies
            return
        for peer, frame in replies:
            self.outbound.send(peer, frame)

    def _flush(self) -> None:
        """Send the replies that waited for the commit just made."""
        assert self.outbound is not None
        unsent, self._unsent = self._unsent, []
        for peer, frame in unsent:
            self.outbound.send(peer, frame)

    def _perform(self, effects: list[Effect]) -> list[tuple[bytes, bytes]]:
        """Do what the service asked; the replies that come of it (a hello
        answered once its process is watched, or not)."""
        assert self.service is not None
        replies = []
        for effect in effects:
            if isinstance(effect, Log):
                self.log.emit(effect.event)
            elif isinstance(effect, Watch):
                watching = self._isolated(
                    "watching a client",
                    self.watcher.watch,
                    effect.session,
                    effect.pid,
                    effect.start_ticks,
                )
                answered = self.service.watched(effect.session, bool(watching))
                if answered is not None:
                    replies.append(answered)
            elif isinstance(effect, Unwatch):
                self._isolated("closing a pidfd", self.watcher.unwatch, effect.session)
            elif isinstance(effect, Stop):
                self._stopping = True
        return replies

    def _on_events(self, events: dict[Any, int]) -> bool:
        """Everything the poll reported besides requests, and the kept
        requests that what happened may have met. Whether it did anything
        that may have touched the router besides sending replies."""
        assert self.router is not None and self.service is not None
        service, isolated = self.service, self._isolated
        touched = len(events) > 1 or self.router not in events  # (else only requests came)
        if touched:
            self._on_descriptors(events)
        if service.admission.recovering and service.recovering_peers():
            isolated("probing recovered sessions", self._probe_recovering)
            touched = True
        # Kept requests met by what happened above, or whose time ran out
        if service.has_waiters():
            isolated("the kept requests", service.wake, self.clock.time())
            outbox = service.take_outbox()
            if outbox:
                self._commit()  # what met them is durable before they hear of it
            self._deliver(Outcome(outbox, service.take_effects()))
            self._flush()
        return touched

    def _on_descriptors(self, events: dict[Any, int]) -> None:
        """A pidfd, the monitor, the signal pipe or the metrics endpoint is readable."""
        assert self.router is not None and self.service is not None
        service, isolated = self.service, self._isolated
        for session_id in self.watcher.died(events):
            self._on_death(session_id)
        if self.monitor is not None and self.monitor in events:
            while self.monitor.poll(0):
                self.monitor.recv_multipart()
            isolated("counting file descriptors", self.listener.check_fds, self.router, self.log)
        if self._wake_r in events:
            self._drain_wake()
        if self.metrics is not None and self.metrics.fd in events:
            isolated("a metrics scrape", self.metrics.answer,
                     lambda: service.stats(self.clock.time()))  # fmt: skip

    def _on_death(self, session_id: int) -> None:
        """A watched client's pidfd is readable: its process is gone."""
        assert self.router is not None and self.service is not None
        service = self.service
        self._isolated("closing a pidfd", self.watcher.unwatch, session_id)
        # the service logs it
        now = self.clock.time()
        freed = self._isolated(f"reclaiming session {session_id}", service.reclaim,
                               session_id, "exited", now, session=session_id)  # fmt: skip
        if freed is None:  # its pidfd is closed: the lease timer ends it
            service.watched(session_id, False)
        if not self.listener.listening:
            self._isolated("counting file descriptors", self.listener.check_fds, self.router,
                           self.log)  # fmt: skip
        self._commit()
        self._perform(service.take_effects())

    def _on_tick(self) -> None:
        """The lease timer, descriptors and idle segments, every tick."""
        assert self.router is not None and self.service is not None
        if not self.listener.listening:  # descriptors may be free without any event
            self._isolated("counting file descriptors", self.listener.check_fds, self.router,
                           self.log)  # fmt: skip
        self._isolated("the lease timer", self.service.expire, self.clock.time())
        self._commit()
        if len(self.arenas.arenas) > 1:
            self._isolated("releasing idle segments", self.arenas.release_segments,
                           self.clock.time())  # fmt: skip
        self._perform(self.service.take_effects())

    def _isolated(
        self, where: str, call: Callable[..., Any], *args: Any, session: int | None = None
    ) -> Any:
        """`call(*args)`, or None when it raised: a bug of the daemon, which
        the service counts, logs with its traceback and checks for (ending
        `session` if the state does not pass; see Service.internal_error)."""
        try:
            return call(*args)
        except Exception as error:  # noqa: BLE001 - the daemon survives its own bugs
            assert self.service is not None
            self.service.internal_error(where, error, session, self.clock.time())
            self.service.quarantine()
            return None

    def _probe_recovering(self) -> None:
        """Is the client of a recovered session back? Its socket reconnects by
        itself with the same routing id; a send that the router accepts for
        that id (ROUTER_MANDATORY refuses ids with no connection) says so. The
        message tells the client which of its requests the daemon has, so it
        sends any lost ones again before its next one."""
        assert self.router is not None and self.service is not None
        router, service = self.router, self.service
        now = self.clock.time()
        for session_id, peer in service.recovering_peers():
            try:
                router.send_multipart([peer, service.resend_note(session_id)], zmq.NOBLOCK)
            except zmq.ZMQError:
                continue  # not connected (yet)
            service.connected(peer, now)
            self.log(f"recovered session {session_id} resumed: its client is back",
                     "client_resumed", session=session_id, how="reconnect")  # fmt: skip

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w)
        self.poller.register(self._wake_r, zmq.POLLIN)

        def on_signal(signum: int, _frame: object) -> None:
            self._stop_signal = signum

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass

    # -- stop --------------------------------------------------------------

    def close(self) -> None:
        """Remove everything the daemon made: socket, arena, lock. Idempotent."""
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.monitor is not None:
            self.monitor.close(linger=0)
            self.monitor = None
        if self.lock_fd is not None:  # the name is ours (not a running daemon's)
            self.listener.remove_notes()
        if self.router is not None:
            self.router.close(linger=0)
            self.router = None
        if self.context is not None:
            self.context.term()
            self.context = None
        self.watcher.close()
        self.poller.close()
        if self.store is not None:
            remove(self.socket_path)
            try:
                self.store.close(self.service if self.service and self._served else None)
            except OSError as exc:
                self.log(f"final snapshot of the allocation table failed: {exc}",
                         "snapshot_failed", "error", error=str(exc))  # fmt: skip
            self.store = None
        if self.arenas.arenas:
            remove(self.socket_path)
        self.arenas.close()
        if self.lock_fd is not None:
            remove(self.lock_path)
            os.close(self.lock_fd)
            self.lock_fd = None
        if self._wake_w >= 0:
            signal.set_wakeup_fd(-1)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        if self.writer is not None:
            self.writer.close()  # the last lines (the stop line) get out


def run_daemon(options: DaemonOptions, ready: Callable[[Server], None] | None = None) -> None:
    """Start, serve in this very process, stop cleanly."""
    server = Server(options)
    server.start()
    try:
        if ready is not None:
            ready(server)
        server.serve()
    finally:
        server.close()
