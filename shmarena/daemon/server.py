"""The daemon's I/O loop: ZeroMQ ROUTER, pidfds, signals, timers. Decides nothing.

Every request frame goes to `Service.handle` and its reply goes back to the
peer that sent it. Around that the server does what the pure service cannot:
it owns the runtime dir, the lock file, the arena and the socket; it watches
each client's pid with a pidfd so a dead client's blocks come back at once;
it runs the lease timer for clients it cannot watch; and it stops cleanly on
SIGTERM, SIGINT or a shutdown request, removing socket, lock and arena.

Each call into the service and each piece of the loop's own per-turn work
(timers, reclaims, the metrics snapshot, commits) runs through `_isolated`:
a bug there is handed to `Service.internal_error` (counted, logged with its
traceback, state checked) and the loop goes on. The one failure that stops
the daemon on purpose is a persistent table that cannot be written.
"""

from __future__ import annotations

import fcntl
import grp
import heapq
import os
import random
import resource
import secrets
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from shmarena._version import __version__
from shmarena.config import (
    DEFAULT_LEASE_S,
    DEFAULT_MIN_BLOCK_BYTES,
    DEFAULT_SIZE_BYTES,
    format_size,
    lock_path,
    shm_name,
    socket_path,
)
from shmarena.daemon.logs import EventLog, LogEvent
from shmarena.daemon.logwriter import QueuedWriter
from shmarena.daemon.metrics import METRICS_MAX_CONNECTIONS, Exporter
from shmarena.daemon.service import ArenaInfo, Creds, Service
from shmarena.daemon.store import DEFAULT_COMPACT_BYTES, Store, new_epoch
from shmarena.daemon.table import State
from shmarena.errors import DaemonStartError, ShmArenaError
from shmarena.protocol import (
    LATE_ERR,
    MAX_BUFFERED_REPLIES,
    MAX_FRAME_BYTES,
    MAX_FRAMES,
    MAX_QUEUED_REPLY_BYTES,
    PROTOCOL_VERSION,
)
from shmarena.rundir import (
    clear_socket_path,
    open_in_run_dir,
    prepare_runtime_dir,
    write_note,
)
from shmarena.shm import gens, hugepages, numa
from shmarena.shm.arena import Arena, GenTable, Pages, remove_stale_segments
from shmarena.shm.journal import CrashPoints
from shmarena.shm.segments import OFFSET_MASK, SEGMENT_SHIFT

DEFAULT_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
# `stats` reads the pages' placement from /proc again after this long.
PLACEMENT_TTL_S = 5.0
# Messages handled per wake-up of the loop before pidfds and timers get a turn.
MESSAGES_PER_WAKE = 32
# Unix socket paths are limited to 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; the limit now in force.
    Each client costs the daemon two descriptors (its connection, a pidfd)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return int(min(soft, hard))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return int(hard)
    except (OSError, ValueError):
        return int(soft)


def remove(path: str) -> None:
    """Unlink `path` if it is there (never a directory: unlink refuses one)."""
    try:
        os.unlink(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        pass


def open_fds() -> int:
    """Descriptors this process has open (the limit when it cannot tell)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir used
    except OSError:
        return 1 << 30


@dataclass
class DaemonOptions:
    name: str
    run_dir: str
    size_bytes: int | None = DEFAULT_SIZE_BYTES  # None: a backing file's own size
    min_block_bytes: int | None = DEFAULT_MIN_BLOCK_BYTES  # None: a backing file's own
    lease_s: float = DEFAULT_LEASE_S
    quota_per_session: int = 0  # --quota-per-session (0: none)
    allocator: str | None = "extents"  # None: a backing file's own
    # --group: the group whose members may use the daemon (name or gid), or None
    group: str | None = None
    # --backing: the arena lives in this file and survives restarts; with
    # --durability none|batch|sync and --grace seconds for recovered sessions.
    backing: str | None = None
    durability: str = "batch"
    grace_s: float = 15.0
    compact_bytes: int = DEFAULT_COMPACT_BYTES
    # --numa-node N binds the arena to node N (and the daemon to its CPUs);
    # --numa-interleave spreads it over every node with memory.
    numa_node: int | None = None
    numa_interleave: bool = False
    # --hugepages: hugetlbfs or transparent huge pages, or refuse to start.
    hugepages: bool = False
    # --max-size: grow by segments up to this; --shrink-after: release an
    # added segment empty for this long (0: never).
    max_size_bytes: int | None = None
    shrink_after_s: float = 30.0
    # Tests: SIGKILL the daemon at a named point of the persistence path.
    debug_crash_at: str | None = None
    # Fault injection for tests: drop this fraction of replies (never late
    # errors), and hold each reply back by up to this many milliseconds.
    debug_drop_replies: float = 0.0
    debug_delay_ms: float = 0.0
    debug_seed: int | None = None
    # --debug-fail: make these ops' requests raise inside the daemon ("wake":
    # kept requests as they are answered; "commit": writing the table, after
    # it took the changes), to test that it survives its bugs.
    debug_fail: tuple[str, ...] = ()
    # --metrics-port: serve Prometheus text there (0: any free port), on
    # --metrics-bind (loopback by default); None: no endpoint.
    metrics_port: int | None = None
    metrics_bind: str = "127.0.0.1"
    # --log-format: "text" (the lines as always) or "json" (one object a line)
    log_format: str = "text"


def resolve_group(group: str) -> int:
    """The gid of a group given by name or number, or DaemonStartError."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        pass
    if group.isdigit():
        return int(group)
    raise DaemonStartError(
        f"--group {group!r}: no such group (see /etc/group, or give a numeric gid)"
    )


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks
    since boot. With the pid it names one process for the life of the host."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_groups(pid: int) -> tuple[int, ...]:
    """The supplementary groups of a process (empty when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return ()


class Server:
    def __init__(self, options: DaemonOptions, log: EventLog | None = None) -> None:
        self.options = options
        self.writer: QueuedWriter | None = None
        if log is None:
            # Lines leave through a thread: a stderr nobody reads never stalls serving.
            self.writer = QueuedWriter(
                lambda line: print(line, file=sys.stderr, flush=True), self._dropped_note
            )
            log = EventLog(options.log_format, self.writer, time.time)
        self.log = log
        self.socket_path = socket_path(options.run_dir, options.name)
        self.lock_path = lock_path(options.run_dir, options.name)
        self.shm_name = shm_name(options.name)
        self.lock_fd: int | None = None
        self.arenas: dict[int, Arena] = {}  # segment index -> its memory
        self.tables: dict[int, GenTable] = {}  # segment index -> its generation table
        self.pages = Pages()
        self._placement_cache: tuple[float, set[int], dict[int, dict[str, Any]]] | None = None
        self.pages_kind = "shm"  # or hugetlbfs, thp-shm, thp-memfd
        self.node_cpus: list[int] = []  # --numa-node: the CPUs the daemon was pinned to
        self.store: Store | None = None
        self.crash = CrashPoints(options.debug_crash_at)
        self.context: zmq.Context[Any] | None = None
        self.router: zmq.Socket[Any] | None = None
        self.service: Service | None = None
        self.pidfds: dict[int, int] = {}  # fd -> session id
        self.session_fds: dict[int, int] = {}  # session id -> fd
        self.poller = zmq.Poller()
        self._stop_signal: int | None = None
        self._wake_r = self._wake_w = -1
        self.gid = resolve_group(options.group) if options.group is not None else None
        self._debug = random.Random(options.debug_seed)
        # libzmq 4.3 aborts the process when accept() on an ipc listener fails
        # with EMFILE (ipc_listener.cpp's errno_assert). So while fewer than
        # `fd_reserve` descriptors are left the daemon takes no new
        # connections: it renames its socket file to `paused_path`, so that
        # no client can reach the listener by path, while the listener and
        # every connection it accepted live on (an unbind would close those
        # too). The file gets its name back once `fd_resume` are free: the
        # reserve, room for a full backlog, and a margin so that it does not
        # flap (not twice the reserve: under a low limit, the daemon's own
        # descriptors may never leave that many free).
        # Only the listen backlog (kept well under the reserve) can still be
        # accepted after the rename. New clients meanwhile read why in
        # `refusing_path`. The metrics endpoint's connections come out of
        # the same descriptors: the reserve holds its cap too.
        self.fd_limit = raise_fd_limit()
        self.fd_reserve = max(8, self.fd_limit // 4)
        if options.metrics_port is not None:
            self.fd_reserve += METRICS_MAX_CONNECTIONS
        self.accept_backlog = max(1, min(128, self.fd_reserve // 4))
        self.fd_resume = self.fd_reserve + max(self.accept_backlog + 1, self.fd_reserve // 2)
        self.listening = False
        self.refusing_path = self.socket_path + ".refusing"
        self.paused_path = self.socket_path + ".paused"
        self.monitor: zmq.Socket[Any] | None = None
        self._held: list[tuple[float, int, bytes, bytes]] = []  # delayed replies (debug)
        self._served = False  # the table was written at start: a clean stop may write it
        self.metrics: Exporter | None = None
        # Replies whose client's pipe was full (MAX_BUFFERED_REPLIES), in
        # order, per routing id, with their bytes (MAX_QUEUED_REPLY_BYTES).
        self.backlog: dict[bytes, deque[bytes]] = {}
        self.backlog_bytes: dict[bytes, int] = {}
        # Clients whose replies are being dropped because they do not read
        # them: routing id -> replies dropped since it stopped reading.
        self.not_reading: dict[bytes, int] = {}
        self.replies_dropped_unread = 0  # their pipe and queue were full
        self.replies_undeliverable = 0  # their client was gone

    def _dropped_note(self, count: int) -> str:
        return self.log.render(
            LogEvent(
                "log_dropped",
                f"{count} log lines dropped: stderr was not read fast enough",
                "warning",
                {"lines": count},
            )
        )

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
        self._take_lock()
        if clear_socket_path(self.socket_path):
            self.log(f"removed stale socket {self.socket_path}", "stale_socket_removed",
                     path=self.socket_path)  # fmt: skip
        clear_socket_path(self.paused_path)  # a dead daemon's, renamed while it was paused
        started_at = time.time()
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
            assert opts.size_bytes is not None
            self.pages = self._plan_pages(opts.size_bytes)
            size_bytes = self.pages.round(opts.size_bytes)
            if size_bytes != opts.size_bytes:
                self.log(
                    f"--size {format_size(opts.size_bytes)} rounded up to "
                    f"{format_size(size_bytes)}, a whole number of "
                    f"{format_size(self.pages.page_bytes)} pages",
                    "size_rounded",
                    requested_bytes=opts.size_bytes,
                    size_bytes=size_bytes,
                    page_bytes=self.pages.page_bytes,
                )
            # Segments a daemon of this name left when it died (after the lock:
            # no live daemon of this runtime dir holds them).
            for directory in {"/dev/shm", self.pages.directory}:
                for path in remove_stale_segments(self.shm_name, directory):
                    self.log(f"removed stale segment {path}", "stale_segment_removed", path=path)
            self.arenas[0] = Arena.create(self.shm_name, size_bytes, self.gid, self.pages)
            epoch = new_epoch()
            min_block = opts.min_block_bytes or DEFAULT_MIN_BLOCK_BYTES
            allocator = opts.allocator or "extents"
        store = self.store
        info = ArenaInfo(
            name=opts.name,
            epoch=epoch,
            size_bytes=size_bytes,
            min_block_bytes=min_block,
            shm_name=self.shm_name if store is None else "",
            pid=os.getpid(),
            started_at=started_at,
            socket_path=self.socket_path,
            lease_s=opts.lease_s,
            quota_per_session=opts.quota_per_session,
            uid=os.getuid(),
            group_gid=self.gid if self.gid is not None else -1,
            allocator=allocator,
            version=__version__,
            backing=os.path.abspath(opts.backing) if opts.backing else "",
            data_offset=store.backing.header.data_offset if store else 0,
            durability=opts.durability if store else "",
            grace_s=opts.grace_s,
            max_size_bytes=opts.max_size_bytes or 0,
            granule_bytes=self.pages.page_bytes,
            idle_s=opts.shrink_after_s,
            numa_policy=numa.POLICY_NAMES.get(self.pages.numa_policy, ""),
            numa_nodes=self.pages.numa_nodes,
            numa_cpus=tuple(self.node_cpus),
        )
        self.service = Service(
            info,
            watch=self._watch,
            new_token=lambda: secrets.randbits(63),
            grow=self._add_segment,
        )
        if 0 in self.arenas:
            self.service.segments[0] = {"index": 0, **self.arenas[0].locator}
            self.tables[0] = GenTable.create(
                self.shm_name, size_bytes, min_block, self.gid, self.arenas[0].kind
            )
        else:
            assert opts.backing is not None
            self.tables[0] = GenTable.beside(
                os.path.abspath(opts.backing) + gens.TABLE_SUFFIX, size_bytes, min_block, self.gid
            )
        self.service.segments[0]["gens"] = self.tables[0].locator
        self.service.ledger.gens = self._mark
        self.service.extra_checks = self._check_tables
        self.service.extra_stats = self._extra_stats
        self.service.faults = frozenset(opts.debug_fail)
        if store is not None and state is not None:
            self._recover(store, state, started_at)
        self.context = zmq.Context()
        router = self.context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        # A client that does not read its replies fills its pipe: the send
        # then fails at once (ROUTER_MANDATORY, NOBLOCK) instead of queueing
        # without end, and the reply waits in `backlog` or is dropped (see
        # `_send_reply`).
        router.setsockopt(zmq.SNDHWM, MAX_BUFFERED_REPLIES)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.RCVHWM, 100_000)
        router.setsockopt(zmq.BACKLOG, self.accept_backlog)
        self.router = router
        self._listen()
        self.poller.register(router, zmq.POLLIN)
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
        self._rebuild_table()
        ledger.gens = self._mark
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
            session.watched = self._watch(session_id, session.pid, session.start_ticks)
        store.begin(service, self.options.backing or "")
        self._served = True
        ledger.take_changes()
        self._write_log()
        self.log(
            store.describe(), "table_opened", backing=store.backing.path, durability=store.mode
        )

    def _rebuild_table(self) -> None:
        """Make the kept generation table of a recovered arena agree with the
        recovered ledger (see gens.rebuilt)."""
        assert self.service is not None
        ledger, table = self.service.ledger, self.tables[0]
        blocks = {
            b.offset: (b.generation, b.owner is not None, b.cache_session)
            for b in ledger.blocks.values()
        }
        words = table.words
        for index, word in gens.rebuilt(
            words.tolist(), table.shift, blocks, set(ledger.sessions)
        ).items():
            words[index] = word

    def _check_tables(self) -> list[str]:
        """The generation tables against the ledger (part of `check`)."""
        assert self.service is not None
        problems = []
        per_segment: dict[int, dict[int, tuple[int, bool, bool]]] = {i: {} for i in self.tables}
        for block in self.service.ledger.blocks.values():
            blocks = per_segment.get(block.offset >> SEGMENT_SHIFT)
            if blocks is not None:
                blocks[block.offset & OFFSET_MASK] = (
                    block.generation,
                    block.owner is not None,
                    block.cached,
                )
        for index, table in self.tables.items():
            words = table.words.tolist()
            problems += gens.check_words(words, table.shift, per_segment[index], index)
        return problems

    def _mark(self, address: int, generation: int, reason: int) -> None:
        """The ledger's writes to the generation tables (Ledger.gens)."""
        table = self.tables.get(address >> SEGMENT_SHIFT)
        if table is not None:
            table.mark(address & OFFSET_MASK, generation, reason)

    # -- pages: NUMA, huge pages, segments ------------------------------------

    def _plan_pages(self, size_bytes: int) -> Pages:
        """How the arena's pages are made, from --numa-* and --hugepages;
        DaemonStartError when the machine cannot do what was asked."""
        opts = self.options
        policy = 0
        nodes: tuple[int, ...] = ()
        if opts.numa_node is not None or opts.numa_interleave:
            topology = numa.read_topology()
            if opts.numa_node is not None:
                node = topology.nodes.get(opts.numa_node)
                if node is None or node.memory_bytes == 0:
                    why = "does not exist" if node is None else "has no memory"
                    raise DaemonStartError(
                        f"--numa-node {opts.numa_node}: that node {why} on this machine; "
                        f"it has {topology.describe()}; pick one of "
                        f"{', '.join(map(str, topology.with_memory))}",
                        nodes=topology.with_memory,
                    )
                policy, nodes = numa.MPOL_BIND, (opts.numa_node,)
                if node.cpus:
                    numa.pin_to_cpus(node.cpus)
                    self.node_cpus = list(node.cpus)
            else:
                policy, nodes = numa.MPOL_INTERLEAVE, tuple(topology.with_memory)
                self.node_cpus = sorted(c for n in nodes for c in topology.nodes[n].cpus)
        kind, directory, page_bytes, thp = "shm", "/dev/shm", DEFAULT_PAGE_BYTES, False
        if opts.hugepages:
            plan = hugepages.plan(hugepages.survey(), size_bytes, self.gid is not None)
            if isinstance(plan, str):
                raise DaemonStartError(plan)
            self.pages_kind = plan.kind
            page_bytes = plan.page_bytes
            if plan.kind == "hugetlbfs":
                kind, directory = "hugetlbfs", plan.directory
            else:
                kind, thp = ("shm" if plan.kind == "thp-shm" else "memfd"), True
            self.log(f"--hugepages: the arena is on {plan.describe()}", "hugepages",
                     kind=plan.kind, page_bytes=plan.page_bytes)  # fmt: skip
        prefault = bool(policy) or opts.hugepages
        return Pages(kind, directory, page_bytes, thp, policy, nodes, prefault)

    def _add_segment(self, index: int, size_bytes: int) -> bool:
        """Make segment `index` (the service's growth asks); False, with the
        reason kept for the next OutOfMemory message, when it cannot."""
        assert self.service is not None
        growth = self.service.ledger.growth
        try:
            arena = Arena.create(shm_name(self.options.name, index), size_bytes, self.gid,
                                 self.pages)  # fmt: skip
        except Exception as exc:  # any failure to make it: refuse the request, keep serving
            if growth is not None:
                growth.last_failure = str(exc)
            self.log(f"could not add segment {index} of {format_size(size_bytes)}: {exc}",
                     "segment_add_failed", "warning", index=index, size_bytes=size_bytes,
                     error=str(exc))  # fmt: skip
            return False
        try:
            table = GenTable.create(shm_name(self.options.name, index), size_bytes,
                                    self.service.info.min_block_bytes, self.gid,
                                    arena.kind)  # fmt: skip
        except Exception as exc:
            arena.close(unlink=True)
            if growth is not None:
                growth.last_failure = f"its generation table: {exc}"
            self.log(f"could not add segment {index}: its generation table: {exc}",
                     "segment_add_failed", "warning", index=index, size_bytes=size_bytes,
                     error=str(exc))  # fmt: skip
            return False
        self.arenas[index] = arena
        self.tables[index] = table
        self.service.segments[index] = {"index": index, **arena.locator, "gens": table.locator}
        total = sum(a.size_bytes for a in self.arenas.values())
        self.log(
            f"added segment {index}: {format_size(size_bytes)} at {arena.where}; "
            f"the arena is {format_size(total)} now",
            "segment_added",
            index=index,
            size_bytes=size_bytes,
            where=arena.where,
            total_bytes=total,
        )
        return True

    def _release_segments(self, now: float) -> None:
        assert self.service is not None
        for index in self.service.ledger.trim(now):
            arena = self.arenas.pop(index)
            self.service.segments.pop(index, None)
            arena.close(unlink=True)
            table = self.tables.pop(index, None)
            if table is not None:
                table.close(unlink=True)
            self.log(
                f"released segment {index} ({format_size(arena.size_bytes)}): empty for "
                f"{self.options.shrink_after_s:g} s",
                "segment_released",
                index=index,
                size_bytes=arena.size_bytes,
                idle_s=self.options.shrink_after_s,
            )

    def _placements(self) -> dict[int, dict[str, Any]]:
        """Each segment's pages as the kernel reports them, read again when a
        segment came or went or PLACEMENT_TTL_S passed (reading /proc/self/smaps
        costs milliseconds; placement changes only by migration)."""
        now = time.monotonic()
        cached = self._placement_cache
        if (
            cached is not None
            and cached[1] == set(self.arenas)
            and now - cached[0] < PLACEMENT_TTL_S
        ):
            return cached[2]
        arenas = list(self.arenas.items())
        try:
            records = numa.read_placements([(a.mapping, a.size_bytes) for _, a in arenas])
        except (OSError, ValueError) as exc:
            records = [{"error": str(exc)} for _ in arenas]
        result = {index: record for (index, _), record in zip(arenas, records, strict=True)}
        self._placement_cache = (now, set(self.arenas), result)
        return result

    def _extra_stats(self) -> dict[str, Any]:
        """What only the server knows: the pages as the kernel reports them,
        NUMA placement, and the persistent table's figures."""
        extra: dict[str, Any] = self.store.stats() if self.store is not None else {}
        # what the generation tables that `attach` checks take (8 bytes per min block)
        extra["generation_table_bytes"] = sum(t.mapping.size() for t in self.tables.values())
        extra["replies"] = {
            "queued_bytes": sum(self.backlog_bytes.values()),
            "clients_behind": len(self.backlog),
            "clients_not_reading": len(self.not_reading),
            "dropped_unread": self.replies_dropped_unread,
            "undeliverable": self.replies_undeliverable,
        }
        # The server's own bounds, beside the service's (README "Reliability")
        limits = self.service.limits() if self.service is not None else {}
        limits["buffered_replies"] = MAX_BUFFERED_REPLIES
        limits["queued_reply_bytes"] = MAX_QUEUED_REPLY_BYTES
        if self.metrics is not None:
            limits["metrics_connections"] = METRICS_MAX_CONNECTIONS
        extra["limits"] = limits
        if self.metrics is not None:
            extra["metrics"] = self.metrics.where
        pages: list[dict[str, Any]] = []
        by_node: dict[str, int] = {}
        policy = ""
        for index, record in self._placements().items():
            record = {**record, "index": index}
            pages.append(record)
            policy = policy or str(record.get("policy", ""))
            for node, count in record.get("bytes_by_node", {}).items():
                by_node[node] = by_node.get(node, 0) + count
        if pages:
            extra["pages"] = {
                "kind": self.pages_kind,
                "page_bytes": min(int(p.get("page_bytes", 0)) for p in pages),
                "huge_bytes": sum(int(p.get("huge_bytes", 0)) for p in pages),
                "mapped_bytes": sum(int(p.get("mapped_bytes", 0)) for p in pages),
                "segments": pages,
            }
            bound = self.arenas[0].numa if 0 in self.arenas else None
            extra["numa"] = {
                "requested": dict(bound) if bound else None,
                "policy": policy or "default",
                "bytes_by_node": by_node,
                "daemon_cpus": sorted(os.sched_getaffinity(0)),
                "resident_pages_at_bind": sum(
                    int(a.numa["resident_pages_at_bind"]) for a in self.arenas.values() if a.numa
                ),
            }
        return extra

    def _commit(self) -> None:
        """Make this wake-up's changes durable (a file-backed arena), or
        forget them (a shm arena keeps no table)."""
        assert self.service is not None
        if self.store is None:
            self.service.ledger.take_changes()
            return
        try:
            try:
                if "commit" in self.service.faults:  # --debug-fail commit: a bug that took them
                    self.service.ledger.take_changes()
                    raise RuntimeError("fault injected by --debug-fail commit")
                self.store.commit(self.service)
            except OSError:
                raise
            except Exception as error:  # a bug: the changes it took are written whole instead
                self.service.internal_error(
                    "writing the allocation table", error, None, time.time()
                )
                self.store.rewrite(self.service)
        except OSError:
            raise ShmArenaError(
                f"{self.store.failed}; the daemon stops without answering the requests that "
                "depend on it. Free space or fix the file system and start it again: the "
                "table recovers to the last acknowledged change"
            ) from None

    def _take_lock(self) -> None:
        fd = open_in_run_dir(self.lock_path, os.O_RDWR | os.O_CREAT, "lock file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DaemonStartError(
                f"a shmarena daemon named {self.options.name!r} is already running "
                f"(pid {holder}, lock {self.lock_path}); stop it with "
                f"`shmarena --name {self.options.name} shutdown` or pick another --name",
                pid=holder,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.lock_fd = fd

    # -- liveness ----------------------------------------------------------

    def _listen(self) -> None:
        assert self.router is not None
        old_umask = os.umask(0o177 if self.gid is None else 0o117)
        try:
            self.router.bind(f"ipc://{self.socket_path}")
        finally:
            os.umask(old_umask)
        if self.gid is not None:
            os.chown(self.socket_path, -1, self.gid)
        self.listening = True
        remove(self.refusing_path)

    def _check_fds(self) -> None:
        """Stop or resume accepting by the descriptors left (see __init__)."""
        assert self.router is not None
        free = self.fd_limit - open_fds()
        if self.listening and free < self.fd_reserve:
            reason = (
                f"daemon {self.options.name!r} (pid {os.getpid()}) is not accepting new "
                f"clients: {self.fd_limit - free} of its {self.fd_limit} file descriptors are "
                "in use (two per client); it accepts again when clients leave. Raise its limit "
                "(`ulimit -n` / LimitNOFILE=) to serve more clients at once"
            )
            write_note(self.refusing_path, reason + "\n")
            # Out of reach by path, so clients read why instead of timing out;
            # the connections made through it stay.
            try:
                os.rename(self.socket_path, self.paused_path)
            except FileNotFoundError:
                pass  # removed by someone: no client can reach it anyway
            self.listening = False
            self.log(reason, "accept_paused", "warning", fds_used=self.fd_limit - free,
                     fd_limit=self.fd_limit)  # fmt: skip
        elif not self.listening and free >= self.fd_resume:
            try:
                os.rename(self.paused_path, self.socket_path)
                self.listening = True
                remove(self.refusing_path)
            except FileNotFoundError:  # someone removed it: listen on a new file
                try:
                    self.router.unbind(f"ipc://{self.socket_path}")
                except zmq.ZMQError:
                    pass
                self._listen()
            self.log(f"accepting new clients again ({free} file descriptors free)",
                     "accept_resumed", fds_free=free)  # fmt: skip

    def _watch(self, session_id: int, pid: int, start_ticks: int) -> bool:
        """Watch a client pid with a pidfd, if it is the process that said hello.

        The pidfd is opened first and the start time checked after, so the
        pidfd cannot refer to a newer process that reused the pid.
        """
        if self.fd_limit - open_fds() < self.fd_reserve:
            return False  # keep the last descriptors for connections: lease instead
        try:
            fd = os.pidfd_open(pid)
        except (OSError, AttributeError, OverflowError, ValueError):
            return False  # gone already, another pid namespace, or no pidfd support
        if process_start_ticks(pid) != start_ticks:
            os.close(fd)
            return False
        self.pidfds[fd] = session_id
        self.session_fds[session_id] = fd
        self.poller.register(fd, zmq.POLLIN)
        return True

    def _unwatch(self, session_id: int) -> None:
        fd = self.session_fds.pop(session_id, None)
        if fd is not None:
            self.pidfds.pop(fd, None)
            self.poller.unregister(fd)
            os.close(fd)

    def _peer_creds(self, frame: zmq.Frame) -> Creds:
        """Who sent `frame`: libzmq attaches the SO_PEERCRED of an ipc
        connection to each message as "Peer-Address" = "host:UID:GID:PID".
        The supplementary groups are read only when a --group could let a
        process in by one of them. uid -1: not known (refused at hello)."""
        try:
            _, *ids = str(frame.get("Peer-Address")).rsplit(":", 3)
            uid, gid, pid = map(int, ids)
        except (zmq.ZMQError, ValueError, AttributeError):
            return Creds(-1, -1, 0)
        groups: tuple[int, ...] = ()
        if self.gid is not None and gid != self.gid and uid not in (0, os.getuid()):
            groups = process_groups(pid)
        return Creds(uid, gid, pid, groups)

    # -- loop --------------------------------------------------------------

    def serve(self) -> None:
        """Serve until SIGTERM/SIGINT or a shutdown request."""
        assert self.router is not None and self.service is not None
        self._install_signals()
        router, service = self.router, self.service
        recv = router.recv
        # With --metrics-port each request is timed; without, nothing is added.
        handle = service.handle if self.metrics is None else self.metrics.timed(service)
        NOBLOCK, RCVMORE = zmq.NOBLOCK, zmq.RCVMORE
        send_multipart = router.send_multipart
        backlog = self.backlog
        getsockopt = router.getsockopt
        peers = service.peers
        tick_ms = int(max(0.1, min(1.0, self.options.lease_s / 4)) * 1000)
        next_expire = time.monotonic()
        opts = self.options
        debugging = opts.debug_drop_replies > 0 or opts.debug_delay_ms > 0
        # With a durable table, replies wait until what they acknowledge is
        # written: per wake-up (batch) or per request (sync).
        durable = self.store is not None and opts.durability != "none"
        each = self.store is not None and opts.durability == "sync"
        outbox: list[tuple[bytes, bytes]] = []

        def deliver(peer: bytes, reply: bytes) -> None:
            if debugging:
                self._debug_send(peer, reply)
                return
            if backlog and peer in backlog:  # after the replies waiting for it
                self._queue_reply(peer, reply)
                return
            try:
                send_multipart((peer, reply), NOBLOCK)
            except zmq.Again:  # its pipe is full
                self._queue_reply(peer, reply)
            except zmq.ZMQError:  # never fatal: the peer is gone
                self.replies_undeliverable += 1

        if debugging:
            self.log(
                f"DEBUG: dropping {opts.debug_drop_replies:.0%} of replies, delaying each "
                f"by up to {opts.debug_delay_ms:g} ms (fault injection; never in production)",
                "fault_injection",
                "warning",
                drop_replies=opts.debug_drop_replies,
                delay_ms=opts.debug_delay_ms,
            )
        if opts.debug_fail:
            self.log(
                f"DEBUG: requests of {', '.join(opts.debug_fail)} raise inside the daemon "
                "(fault injection; never in production)",
                "fault_injection",
                "warning",
                fail=list(opts.debug_fail),
            )
        isolated = self._isolated
        info = service.info
        where = info.backing or self.arenas[0].where
        self.log(
            f"shmarena daemon {opts.name!r} (pid {os.getpid()}) serving "
            f"{format_size(info.size_bytes)} at {where}, socket {self.socket_path}"
            + (f"; grows up to {format_size(info.max_size_bytes)}" if info.max_size_bytes else "")
            + (
                f"; pages bound ({info.numa_policy}) to NUMA node(s) {list(info.numa_nodes)}"
                if info.numa_nodes
                else ""
            ),
            "start",
            name=opts.name,
            pid=os.getpid(),
            size_bytes=info.size_bytes,
            max_size_bytes=info.max_size_bytes,
            shm=info.shm_name,
            backing=info.backing,
            socket=self.socket_path,
            version=info.version,
            protocol=PROTOCOL_VERSION,
            allocator=info.allocator,
            min_block_bytes=info.min_block_bytes,
            lease_s=info.lease_s,
            group=opts.group or "",
            pages=self.pages_kind,
            numa_nodes=list(info.numa_nodes),
        )
        while self._stop_signal is None and not service.stopping:
            self._write_log()  # what the service noted in the last round
            wait_ms = tick_ms if not service.recovering else min(tick_ms, 50)
            if self._held:
                self._send_held()
                if self._held:
                    wait_ms = min(
                        wait_ms, max(0, int((self._held[0][0] - time.monotonic()) * 1000))
                    )
            if backlog:  # soon again while it moves, else now and then
                wait_ms = min(wait_ms, 1 if self._send_backlog() else 20)
            wake_at = service.next_wake()
            if wake_at is not None:
                wait_ms = min(wait_ms, max(0, int((wake_at - time.time()) * 1000) + 1))
            events = dict(self.poller.poll(wait_ms))
            if events.get(router):
                # Drain what is pending, up to a bound: a steady stream of
                # requests must not starve the pidfds, signals and timers.
                for _ in range(MESSAGES_PER_WAKE):
                    try:
                        peer = recv(NOBLOCK)
                    except zmq.Again:
                        break
                    # A message may carry several requests (a client's queued
                    # one-way posts, then its request): handled in order. For
                    # a peer without a session (its hello), who it is comes
                    # from the kernel, attached to the frame by ZeroMQ.
                    creds = None
                    if peer in peers:
                        payloads = [recv()]
                    else:
                        first = recv(copy=False)
                        creds = self._peer_creds(first)
                        payloads = [first.bytes]
                    while getsockopt(RCVMORE):
                        frame = recv()
                        if len(payloads) <= MAX_FRAMES:
                            payloads.append(frame)
                    if len(payloads) > MAX_FRAMES:
                        payloads = [b"\xc1"]  # never valid msgpack: gets a protocol error
                    now = time.time()
                    for payload in payloads:
                        reply = handle(peer, payload, now, creds)
                        if each:
                            self._commit()
                        if not reply:  # a one-way request that succeeded gets none
                            continue
                        if durable:
                            outbox.append((peer, reply))
                        else:
                            deliver(peer, reply)
                    if len(self.session_fds) != len(service.ledger.sessions):
                        isolated("closing pidfds of ended sessions", self._sync_watches)
                    if service.stopping:
                        break
                self._commit()
                for peer, reply in outbox:
                    deliver(peer, reply)
                outbox.clear()
            for fd in [fd for fd in events if isinstance(fd, int) and fd in self.pidfds]:
                session_id = self.pidfds[fd]
                isolated("closing a pidfd", self._unwatch, session_id)
                # the service logs it
                freed = isolated(f"reclaiming session {session_id}", service.reclaim, session_id,
                                 "exited", time.time(), session=session_id)  # fmt: skip
                session = service.ledger.sessions.get(session_id)
                if freed is None and session is not None:
                    session.watched = False  # its pidfd is closed: the lease timer ends it
                if not self.listening:
                    isolated("counting file descriptors", self._check_fds)
                self._commit()
            if self.monitor is not None and self.monitor in events:
                while self.monitor.poll(0):
                    self.monitor.recv_multipart()
                isolated("counting file descriptors", self._check_fds)
            if self._wake_r in events:
                self._drain_wake()
            if self.metrics is not None and self.metrics.fd in events:
                isolated("a metrics scrape", self.metrics.answer,
                         lambda: service.stats(time.time()))  # fmt: skip
            if service.recovering:
                isolated("probing recovered sessions", self._probe_recovering)
            # Kept requests met by what happened above, or whose time ran out
            if service.has_waiters():
                isolated("the kept requests", service.wake, time.time())
                outbox_now = service.take_outbox()
                if outbox_now:
                    self._commit()  # what met them is durable before they hear of it
                for peer, reply in outbox_now:
                    deliver(peer, reply)
            if time.monotonic() >= next_expire:
                next_expire = time.monotonic() + tick_ms / 1000
                if not self.listening:  # descriptors may be free without any event
                    isolated("counting file descriptors", self._check_fds)
                # the service logs them
                for session_id in isolated("the lease timer", service.expire, time.time()) or ():
                    isolated("closing a pidfd", self._unwatch, session_id)
                self._commit()
                if len(self.arenas) > 1:
                    isolated("releasing idle segments", self._release_segments, time.time())
        self._write_log()
        why = signal.Signals(self._stop_signal).name if self._stop_signal else "shutdown request"
        self.log(
            f"shmarena daemon {opts.name!r} stopping ({why})",
            "stop",
            name=opts.name,
            pid=os.getpid(),
            reason=why,
            uptime_s=round(time.time() - info.started_at, 3),
            used_bytes=service.ledger.owned_bytes,
            sessions=len(service.ledger.sessions),
        )

    def _isolated(
        self, where: str, call: Callable[..., Any], *args: Any, session: int | None = None
    ) -> Any:
        """`call(*args)`, or None when it raised: a bug of the daemon, which
        the service counts, logs with its traceback and checks for (ending
        `session` if the state does not pass; see Service.internal_error)."""
        try:
            return call(*args)
        except Exception as error:
            assert self.service is not None
            self.service.internal_error(where, error, session, time.time())
            self.service.quarantine()
            return None

    def _write_log(self) -> None:
        """Write the events the service queued (it does no I/O itself)."""
        if self.service is not None and self.service.log_events:
            for event in self.service.take_log():
                self.log.emit(event)

    def _probe_recovering(self) -> None:
        """Is the client of a recovered session back? Its socket reconnects by
        itself with the same routing id; a send that the router accepts for
        that id (ROUTER_MANDATORY refuses ids with no connection) says so. The
        message tells the client which of its requests the daemon has, so it
        sends any lost ones again before its next one."""
        assert self.router is not None and self.service is not None
        router, service = self.router, self.service
        now = time.time()
        for session_id in list(service.recovering):
            peer = service.session_peer.get(session_id)
            if not peer:
                continue
            try:
                router.send_multipart([peer, service.resend_note(session_id)], zmq.NOBLOCK)
            except zmq.ZMQError:
                continue  # not connected (yet)
            service.connected(peer, now)
            self.log(f"recovered session {session_id} resumed: its client is back",
                     "client_resumed", session=session_id, how="reconnect")  # fmt: skip

    def _debug_send(self, peer: bytes, reply: bytes) -> None:
        """Send a reply the way --debug-drop-replies/--debug-delay-ms say:
        maybe not at all (late errors always go), maybe later."""
        opts, rng = self.options, self._debug
        late_error = len(reply) > 1 and reply[1] == LATE_ERR
        if not late_error and rng.random() < opts.debug_drop_replies:
            return
        due = time.monotonic() + rng.random() * opts.debug_delay_ms / 1000
        heapq.heappush(self._held, (due, rng.getrandbits(32), peer, reply))
        self._send_held()

    def _send_held(self) -> None:
        assert self.router is not None
        now = time.monotonic()
        while self._held and self._held[0][0] <= now:
            _, _, peer, reply = heapq.heappop(self._held)
            try:
                self.router.send_multipart([peer, reply], zmq.NOBLOCK)
            except zmq.ZMQError:  # debug only: a full pipe or a gone client drops it
                self.replies_undeliverable += 1

    def _queue_reply(self, peer: bytes, reply: bytes) -> None:
        """Keep a reply whose client's pipe is full, in order behind the others;
        drop it (counted, and logged once) when the queue holds its bytes' worth."""
        queue = self.backlog.get(peer)
        if queue is None:
            queue = self.backlog[peer] = deque()
            self.backlog_bytes[peer] = 0
        queued = self.backlog_bytes[peer]
        if queue and queued + len(reply) > MAX_QUEUED_REPLY_BYTES:
            self.replies_dropped_unread += 1
            dropped = self.not_reading.get(peer)
            self.not_reading[peer] = (dropped or 0) + 1
            if dropped is None:
                session = self.service.peers.get(peer, 0) if self.service is not None else 0
                self.log(
                    f"client session {session} does not read its replies: "
                    f"{MAX_BUFFERED_REPLIES} and {queued} bytes more wait for it; further "
                    "replies to it are dropped until it reads",
                    "replies_dropped",
                    "warning",
                    session=session,
                    buffered=MAX_BUFFERED_REPLIES,
                    queued_bytes=queued,
                )
            return
        queue.append(reply)
        self.backlog_bytes[peer] = queued + len(reply)

    def _send_backlog(self) -> bool:
        """Send what waits for each client while its pipe takes it; whether
        anything was sent. A client gone meanwhile takes its queue with it."""
        assert self.router is not None
        send_multipart, NOBLOCK = self.router.send_multipart, zmq.NOBLOCK
        moved = False
        for peer, queue in list(self.backlog.items()):
            try:
                while queue:
                    send_multipart((peer, queue[0]), NOBLOCK)
                    self.backlog_bytes[peer] -= len(queue.popleft())
                    moved = True
            except zmq.Again:
                continue  # still full
            except zmq.ZMQError:  # gone
                self.replies_undeliverable += len(queue)
                del self.backlog[peer], self.backlog_bytes[peer]
                self.not_reading.pop(peer, None)
                continue
            del self.backlog[peer], self.backlog_bytes[peer]
            dropped = self.not_reading.pop(peer, None)
            if dropped is not None:
                session = self.service.peers.get(peer, 0) if self.service is not None else 0
                self.log(
                    f"client session {session} reads its replies again; {dropped} were dropped",
                    "replies_read_again",
                    session=session,
                    dropped=dropped,
                )
        return moved

    def _sync_watches(self) -> None:
        """Close the pidfds of sessions the service ended (bye)."""
        assert self.service is not None
        sessions = self.service.ledger.sessions
        for session_id in [s for s in self.session_fds if s not in sessions]:
            self._unwatch(session_id)

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w)
        self.poller.register(self._wake_r, zmq.POLLIN)

        def on_signal(signum: int, frame: object) -> None:
            self._stop_signal = signum

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
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
            remove(self.refusing_path)
            remove(self.paused_path)
        if self.router is not None:
            self.router.close(linger=0)
            self.router = None
        if self.context is not None:
            self.context.term()
            self.context = None
        for session_id in list(self.session_fds):
            self._unwatch(session_id)
        if self.store is not None:
            remove(self.socket_path)
            try:
                self.store.close(self.service if self.service and self._served else None)
            except OSError as exc:
                self.log(f"final snapshot of the allocation table failed: {exc}",
                         "snapshot_failed", "error", error=str(exc))  # fmt: skip
            self.store = None
        if self.arenas:
            remove(self.socket_path)
            for arena in self.arenas.values():
                arena.close(unlink=True)
            self.arenas.clear()
        for table in self.tables.values():
            table.close(unlink=True)  # a backing file's table stays: it is a kept file
        self.tables.clear()
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
