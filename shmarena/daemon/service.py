"""The daemon's behaviour: one request frame in, one reply frame out. Pure.

`Service.handle` decodes a frame, checks it against the protocol schema, runs
it against the ledger and encodes the reply. It is the ONE place where an
exception becomes an error reply: whatever bytes arrive, it returns a reply
(or nothing, for frames that are not worth one) and never raises, and a
refused request leaves the state as it was.

Everything the service needs from the outside world is handed in: the
current time on each call, who a new connection's process is (its `Creds`,
which the server has from the kernel), and a `watch` callable that the server provides to
start watching a client's pid (it answers whether it could). The server calls
`end_session` when a watched process dies and `expire` on a timer for the
sessions it cannot watch.

The daemon survives its own bugs. An exception that is not a refusal (a
`ShmArenaError`), raised while handling one request or one kept request's
answer, goes to `internal_error`: it is counted (`counters.internal_errors`),
queued as an `internal_error` log event with its traceback, and answered to
that request as `InternalError`; the server sends its own per-turn failures
(timers, reclaims, the metrics snapshot) there too. What the failed request
touched is then checked rather than undone: the ledger, exchange and peer
maps are run through `check`. Clean, the daemon simply goes on (the request
may have been partly applied, and its reply says so). Not clean, the session
whose request failed is quarantined: it is ended as if its process had died,
so everything it held in session scope is reclaimed and its waiters and
queue uses go, and `check` runs again. Whatever it still reports is logged
as an error and stays visible to `shmarena check` (exit 1); the daemon keeps
serving the others either way. Batch requests (FREE, RETAIN, RELEASE,
ALLOC_MANY, FILL, queue holds) are checked in full before anything is
applied, so a refusal of one of them changes nothing.
"""

from __future__ import annotations

import heapq
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from shmarena.config import format_size
from shmarena.daemon.exchange import Exchange, Waiter
from shmarena.daemon.layout import layout
from shmarena.daemon.ledger import (
    DETACHED,
    QUEUED,
    SESSION,
    Block,
    Freed,
    Growth,
    Ledger,
    check_size,
    implicit_owner,
)
from shmarena.daemon.logs import LogEvent
from shmarena.daemon.table import Link
from shmarena.errors import (
    AccessDenied,
    InternalError,
    InvalidRequest,
    LimitReached,
    OutOfMemory,
    ProtocolError,
    QuotaExceeded,
    Resend,
    SessionLost,
    ShmArenaError,
    StaleHandle,
)
from shmarena.protocol import (
    LATE_ERR,
    MAX_KEPT_PER_SESSION,
    MAX_LISTING_ROWS,
    MAX_PID,
    MAX_SESSIONS,
    MUTATING_OPS,
    OK,
    ONE_WAY_OPS,
    PROTOCOL_VERSION,
    REPLY_CACHE_ENTRIES,
    SEQUENCED_OPS,
    WAITING_OPS,
    Handle,
    Op,
    Request,
    decode,
    encoder,
    error_reply,
    ok_reply,
    parse_request,
)
from shmarena.shm.buddy import Buddy
from shmarena.shm.extents import Extents
from shmarena.shm.segments import SEGMENT_SHIFT, Segmented
from shmarena.shm.space import Space

ALLOCATORS = {"extents": Extents, "buddy": Buddy}

# watch(session_id, pid, start_ticks) -> True when the server can tell the
# moment that process dies (pidfd), False when the session must live on a lease.
Watch = Callable[[int, int, int], bool]


def _no_watch(session_id: int, pid: int, start_ticks: int) -> bool:
    return False


def _no_grow(index: int, size_bytes: int) -> bool:
    return True  # the pure core's tests: a segment is only numbers


@dataclass(frozen=True)
class Creds:
    """Who is at the other end of a connection, as the kernel says
    (SO_PEERCRED): never what a message claims. `groups` are the process's
    supplementary groups, when the server looked them up (only a `--group`
    needs them). uid -1: the server could not learn it."""

    uid: int
    gid: int
    pid: int
    groups: tuple[int, ...] = ()


# Peers whose session ended are remembered (bounded) so that their next
# request learns why, instead of a bare "say hello first".
ENDED_PEERS = 4096
# Log events waiting for the server to write them (it takes them each loop
# wake-up); past this many the oldest go, so a service nobody drains (tests)
# stays bounded.
LOG_EVENTS_KEPT = 4096
# Where the owner is among the arguments of the requests that allocate (for
# the OOM event).
OWNER_ARG = {Op.ALLOC: 1, Op.ALLOC_MANY: 1, Op.FILL: 3}


@dataclass(frozen=True)
class ArenaInfo:
    """What the daemon was started with; reported by hello and stats."""

    name: str
    epoch: int
    size_bytes: int
    min_block_bytes: int
    shm_name: str
    pid: int
    started_at: float
    socket_path: str = ""
    lease_s: float = 10.0
    version: str = ""
    allocator: str = "extents"
    # A file-backed arena: the file, where the arena starts in it, and how
    # changes are kept (none, batch or sync); "" for a shm arena.
    backing: str = ""
    data_offset: int = 0
    durability: str = ""
    grace_s: float = 0.0  # how long recovered sessions wait for their client
    # --max-size: the arena may grow by segments up to this (0: it cannot),
    # in whole granules; an empty added segment goes after idle_s seconds.
    max_size_bytes: int = 0
    granule_bytes: int = 4096
    idle_s: float = 30.0
    # --numa-node / --numa-interleave: the nodes the pages are bound to, and
    # the CPUs of those nodes (for clients that want to run next to them)
    numa_policy: str = ""
    numa_nodes: tuple[int, ...] = ()
    numa_cpus: tuple[int, ...] = ()
    # --quota-per-session: carved bytes a session may hold (0: no quota)
    quota_per_session: int = 0
    # Who may use the daemon (README "Access"): its own uid and root are
    # administrators; with --group, members of that gid may use it (-1: none).
    uid: int = 0
    group_gid: int = -1

    @property
    def first_segment(self) -> dict[str, Any]:
        """How a client maps segment 0 unless the server says otherwise."""
        if self.backing:
            return {"index": 0, "path": self.backing, "offset": self.data_offset,
                    "size": self.size_bytes}  # fmt: skip
        return {"index": 0, "shm": self.shm_name, "size": self.size_bytes}


@dataclass
class _Counters:
    requests: int = 0
    errors: int = 0
    allocs: int = 0
    frees: int = 0
    recycles: int = 0
    fills: int = 0
    filled_blocks: int = 0
    posts: int = 0
    events: int = 0
    late_errors: int = 0
    sessions_opened: int = 0
    sessions_reclaimed: int = 0
    sessions_resumed: int = 0
    reclaimed_bytes: int = 0
    alloc_waits: int = 0  # allocations that had to wait for room
    alloc_wait_timeouts: int = 0  # ... and ran out of time
    alloc_waited_s: float = 0.0  # how long they waited, all together
    # Bugs of the daemon caught while handling a request or a timer (each
    # answered as internal_error where there was a request, and logged).
    internal_errors: int = 0
    quarantined_sessions: int = 0  # sessions ended because check failed after one
    # Requests by op name (each parsed request once, refused or not; a repeat
    # answered from the reply cache is not run again and not counted), and
    # errors by their wire code: what `--metrics-port` exports.
    ops: dict[str, int] = field(default_factory=dict)
    errors_by_code: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class _AllocWaiter:
    """An ALLOC kept until frees make room for it or `deadline` passes."""

    session_id: int
    request_id: int
    args: tuple[Any, ...]
    since: float
    deadline: float
    seq: int = 0


# Where a listing request carries its page size (protocol.py, OWNERS)
PAGE_ARG = {Op.OWNERS: 1, Op.CLIENTS: 1, Op.NAMES: 2}
# Op -> the name counters and metrics use ("alloc", "alloc_many", ...)
OP_NAMES = {op: op.name.lower() for op in Op}


def _waits_until(request: Request, deadline: float, now: float) -> Request:
    """`request` (a retry of one kept when the daemon stopped) with its wait
    cut to what is left of it: its deadline stays the one it was given."""
    args = list(request.args)
    index = 3 if request.op is Op.ALLOC else len(args) - 1  # where wait_s is
    args[index] = max(0.0, min(float(args[index]), deadline - now))
    return request._replace(args=tuple(args))


def _sites(blocks: Any) -> list[dict[str, Any]]:
    """An owner's labelled blocks by allocation site, most bytes first (at
    most 5): where a leak was allocated."""
    found: dict[str, list[int]] = {}
    for block in blocks:
        if block.site:
            entry = found.setdefault(block.site, [0, 0])
            entry[0] += 1
            entry[1] += block.carved
    rows = [{"site": k, "blocks": v[0], "bytes": v[1]} for k, v in found.items()]
    rows.sort(key=lambda r: (-r["bytes"], r["site"]))
    return rows[:5]


def _owner_key(owner: Any) -> tuple[bool, int, str]:
    """Where an owner comes in OWNERS: detached first, most bytes, name."""
    return (owner.scope != DETACHED, -owner.bytes, owner.name)


def _parse_owner_cursor(cursor: str) -> tuple[bool, int, str]:
    scope, _, rest = cursor.partition(" ")
    held, _, name = rest.partition(" ")
    if scope not in ("0", "1") or not (held.isascii() and held.isdigit()) or not name:
        raise _bad_cursor("owners", cursor)
    return (scope == "1", -int(held), name)


def _bad_cursor(op: str, cursor: str) -> InvalidRequest:
    return InvalidRequest(
        f"{op}: cursor {cursor!r:.80} is not one this daemon gives; pass the cursor of "
        'the page before, or "" for the first page',
        op=op,
    )


def _extfrag(index: float | None) -> float:
    """Linux's convention: -1 for an order that can be allocated now."""
    return -1.0 if index is None else round(index, 3)


class Service:
    def __init__(
        self,
        info: ArenaInfo,
        watch: Watch = _no_watch,
        new_token: Callable[[], int] | None = None,
        grow: Callable[[int, int], bool] = _no_grow,
    ) -> None:
        self.info = info
        self.ledger = Ledger(info.name, info.epoch, *self.new_space(info, grow))
        # index -> how clients map that segment (the server fills in what it
        # made; by default segment 0 as `info` says)
        self.segments: dict[int, dict[str, Any]] = {0: info.first_segment}
        self.watch = watch
        self.peers: dict[bytes, int] = {}  # zmq routing id -> session id
        self.session_peer: dict[int, bytes] = {}
        self.replies: dict[int, OrderedDict[int, bytes]] = {}  # session -> rid -> reply
        # session -> secret a client shows to resume it from a new socket; the
        # server hands in a random source, the default is for tests.
        self.tokens: dict[int, int] = {}
        self._new_token = new_token or (lambda: (info.epoch * 0x9E3779B97F4A7C15) % (1 << 63))
        self.ended: OrderedDict[bytes, tuple[int, str, float]] = OrderedDict()
        self.seen: dict[int, int] = {}  # session -> last sequenced request id applied
        # Sessions recovered from a persistent table, until their client is
        # back: session -> deadline (see adopt).
        self.recovering: dict[int, float] = {}
        self.extra_stats: Callable[[], dict[str, Any]] = dict
        self.extra_checks: Callable[[], list[str]] = list  # the server's (generation tables)
        self.exchange = Exchange(self.ledger, info.epoch)
        self.ledger.session_quota = info.quota_per_session
        # ALLOCs waiting for room, first come first served (`ALLOC ... wait_s`):
        # seq -> waiter in arrival order (OrderedDict: the first is found in
        # O(1)); how many each session has; their deadlines as a heap of
        # (deadline, seq), entries of ones answered since skipped when they
        # come up (as the exchange's waiters).
        self.alloc_waiters: OrderedDict[int, _AllocWaiter] = OrderedDict()
        self.alloc_kept: dict[int, int] = {}
        self.alloc_deadlines: list[tuple[float, int]] = []
        self._next_alloc_wait = 1
        # Replies to kept (waiting) requests, met by something another
        # session did or by their deadline: (peer, frame), for the server to
        # send. `waiting` holds (session, request id) of the kept ones, so a
        # client's retry of one is dropped instead of run again.
        self.outbox: list[tuple[bytes, bytes]] = []
        self.waiting: set[tuple[int, int]] = set()
        # The sequenced ones among them, per session, with their deadlines:
        # a persistent table keeps these (see `link`), since a kept request
        # has changed nothing yet and must be waited on again after a crash.
        self.kept: dict[int, dict[int, float]] = {}
        # Requests a table recovered as kept (see `adopt`), until the client
        # sends them again: session -> request id -> deadline.
        self.rerun: dict[int, dict[int, float]] = {}
        self.counters = _Counters()
        # The op of the request the last `handle` call parsed (None: it did
        # not parse, or was a repeat): the server times requests by it.
        self.last_op: str | None = None
        self.log_events: deque[LogEvent] = deque(maxlen=LOG_EVENTS_KEPT)
        self.stopping = False
        self.max_listing_rows = MAX_LISTING_ROWS  # an attribute for the pure tests
        # Test-only fault injection (`--debug-fail`): op names whose requests
        # raise before they run, and "wake" for kept requests as they are
        # answered (met or timed out). Empty in production.
        self.faults: frozenset[str] = frozenset()
        self._quarantine_next: dict[int, float] = {}  # session -> when (see quarantine)
        self._encode = encoder()
        self._dispatch: dict[Op, Callable[[int, Request, float], list[Any] | None]] = {
            Op.BYE: self._bye,
            Op.PING: self._ping,
            Op.ALLOC: self._alloc,
            Op.ALLOC_MANY: self._alloc_many,
            Op.FREE: self._free,
            Op.OWNER: self._owner,
            Op.RECYCLE: self._recycle,
            Op.RETAIN: self._retain,
            Op.RELEASE: self._release,
            Op.FILL: self._fill,
            Op.POST: self._post,
            Op.SYNC: self._sync,
            Op.STATS: self._stats,
            Op.OWNERS: self._owners,
            Op.CLIENTS: self._clients,
            Op.CHECK: self._check,
            Op.SHUTDOWN: self._shutdown,
            Op.SEGMENTS: self._segments,
            Op.PUBLISH: self._publish,
            Op.UNPUBLISH: self._unpublish,
            Op.LOOKUP: self._waitable,
            Op.NAMES: self._names,
            Op.EVENTS: self._waitable,
            Op.QOPEN: self._qopen,
            Op.QPUT: self._waitable,
            Op.QGET: self._waitable,
            Op.QSTAT: self._qstat,
            Op.QCLOSE: self._qclose,
            Op.QUOTA: self._quota,
            Op.BLOCKS: self._blocks,
        }

    @staticmethod
    def new_space(
        info: ArenaInfo, grow: Callable[[int, int], bool] = _no_grow
    ) -> tuple[Space, Growth | None]:
        """The allocator for `info`, and its growth when it may grow."""
        kind, unit = ALLOCATORS[info.allocator], info.min_block_bytes
        space = kind(info.size_bytes, unit)
        if info.max_size_bytes <= info.size_bytes:
            return space, None
        granule = max(info.granule_bytes, unit)
        growth = Growth(info.max_size_bytes, granule, grow, info.idle_s)
        return Segmented(space, lambda size: kind(size, unit)), growth

    # -- the one entry point -----------------------------------------------

    def handle(self, peer: bytes, payload: bytes, now: float, creds: Creds | None = None) -> bytes:
        """The reply frame for one request frame (empty: send nothing, for a
        one-way request that succeeded). Never raises.

        `creds` is who the peer's process is, from the kernel: the server
        hands it in for every peer without a session, and a HELLO opens the
        session as that uid and pid. None (the pure core's tests, an
        in-process caller) counts as the daemon's own user and trusts the
        pid in the HELLO."""
        try:
            return self._handle(peer, payload, now, creds)
        except Exception as error:  # past the one error->reply spot (encoding, say)
            failure = self.internal_error("a request", error, self.peers.get(peer), now)
            self._count_error(failure.code)
            try:
                message = decode(payload)
                request_id: Any = message[1] if type(message[1]) is int else None  # type: ignore[index]
            except Exception:
                request_id = None
            return self._encode(error_reply(request_id, failure))
        finally:
            if self._quarantine_next:
                self.quarantine()

    def _handle(self, peer: bytes, payload: bytes, now: float, creds: Creds | None) -> bytes:
        self.counters.requests += 1
        self.last_op = None
        request_id: Any = None
        request: Request | None = None
        keep = one_way = False
        session_id = self.peers.get(peer)
        rerun_deadline: float | None = None
        try:
            message = decode(payload)
            # Known before the checks, so even a malformed one-way request
            # gets its refusal as a late error, and a request with a bad
            # argument its refusal under its own id.
            sequenced = False
            if isinstance(message, list) and message:
                one_way = type(message[0]) is int and message[0] in ONE_WAY_OPS
                sequenced = type(message[0]) is int and message[0] in SEQUENCED_OPS
                if len(message) >= 2 and type(message[1]) is int:
                    request_id = message[1]
            if session_id is not None:
                if session_id in self.recovering:
                    self._resumed(session_id)
                self.ledger.sessions[session_id].last_seen = now
                if sequenced and type(request_id) is int:
                    # Each number once, in order: a repeat gets the reply it
                    # got before, a skipped number is asked for again.
                    seen = self.seen[session_id]
                    if request_id <= seen:
                        if one_way:  # a repeated post: applied already, never answered
                            return b""
                        if (session_id, request_id) in self.waiting:
                            return b""  # kept: its reply comes when it is met
                        cached = self.replies[session_id].get(request_id)
                        if cached is not None:
                            return cached
                        rerun_deadline = self._rerun(session_id, request_id, message[0])
                    elif request_id != seen + 1:
                        raise Resend(
                            f"requests {seen + 1}..{request_id - 1} of this session never "
                            "reached the daemon (was it restarted?); send them again",
                            seen=seen,
                        )
                    else:
                        self.seen[session_id] = request_id
                    self.ledger.changes.sessions.add(session_id)
            request = parse_request(message)
            if rerun_deadline is not None:
                request = _waits_until(request, rerun_deadline, now)
            request_id = request.request_id
            self.last_op = name = OP_NAMES[request.op]
            ops = self.counters.ops
            ops[name] = ops.get(name, 0) + 1
            keep = request.op in MUTATING_OPS
            if request.op is Op.HELLO:
                reply: list[Any] | None = self._hello(peer, request, now, creds)
                session_id = self.peers[peer]
            elif session_id is None:
                raise self._no_session(peer, request, now)
            else:
                if name in self.faults:
                    raise RuntimeError(f"fault injected by --debug-fail {name}")
                reply = self._dispatch[request.op](session_id, request, now)
                if reply is None:  # kept until it can be met
                    self._deliver_met(now)
                    return b""
        except ShmArenaError as error:
            self._count_error(error.code)
            reply = error_reply(request_id, error)
            if isinstance(error, OutOfMemory) and session_id is not None:
                self._log_oom(session_id, error, request)
        except Exception as error:  # a bug of ours: report it, keep serving
            what = self.last_op or "a request"
            failure = self.internal_error(what, error, session_id, now)
            self._count_error(failure.code)
            reply = error_reply(request_id, failure)
        if one_way:
            if not reply:
                return b""
            self.counters.late_errors += 1
            reply[0] = LATE_ERR
        frame = self._encode(reply)
        if keep and session_id is not None:
            self._keep(session_id, request_id, frame)
        if self.exchange.met:
            self._deliver_met(now)
        return frame

    def internal_error(
        self, where: str, error: BaseException, session_id: int | None = None, now: float = 0.0
    ) -> InternalError:
        """Note a bug of the daemon met in `where` (an op name, or what the
        server was doing): count it, queue its log event with the traceback,
        run `check`, and return the error to answer that request with. When
        the check fails, `session_id` (the session whose request failed) is
        quarantined at the next `quarantine` call: at the end of the `handle`
        or `wake` under way, or right after the server's call. Never raises."""
        self.counters.internal_errors += 1
        kind = f"{type(error).__name__}: {error}"
        problems = self._problems()
        # (also a session the ledger dropped already: its peer, tokens and
        # waiters may be what is left over)
        quarantined = bool(problems) and session_id is not None
        if quarantined:
            assert session_id is not None
            self._quarantine_next[session_id] = now
            outcome = (
                f"the daemon's state failed its check afterwards ({problems[0]}), so session "
                f"{session_id} is ended and what it held in session scope reclaimed; the "
                "client opens a new session on its next call"
            )
        elif problems:
            outcome = (
                f"the daemon's state failed its check afterwards: {problems[0]} (and "
                f"{len(problems) - 1} more); restart the daemon when you can"
            )
        else:
            outcome = (
                "the daemon's state passed its check afterwards; the request may have been "
                "partly applied, so look (stats, owners) before you retry"
            )
        trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        self._log(
            "internal_error",
            f"internal error in the daemon while handling {where}: {kind}; {outcome}\n{trace}",
            "error",
            where=where,
            error=kind,
            session=session_id,
            quarantined=quarantined,
            problems=problems[:20],
            traceback=trace,
        )
        return InternalError(
            f"internal error in the daemon while handling {where} ({kind}); it was logged "
            f"with its traceback and counted; {outcome}. Please report the daemon's log lines",
            where=where,
            error=kind,
            quarantined=quarantined,
        )

    def quarantine(self) -> None:
        """End the sessions `internal_error` marked (outside any loop over
        the service's own collections), recycle session owners left without a
        session, and log what `check` says then. Never raises."""
        while self._quarantine_next:
            session_id, now = self._quarantine_next.popitem()
            try:
                self.end_session(session_id, "quarantined", now)
                self._recycle_orphans()
            except Exception as error:
                self._log("quarantine_failed", f"ending session {session_id} after an internal "
                          f"error failed too: {error!r}", "error", session=session_id)  # fmt: skip
            self.counters.quarantined_sessions += 1
            problems = self._problems()
            self._log(
                "quarantined",
                f"session {session_id} was ended after an internal error; the daemon's state "
                + (f"still fails its check: {problems[0]}" if problems else "passes its check"),
                "error" if problems else "warning",
                session=session_id,
                problems=problems[:20],
            )

    def _recycle_orphans(self) -> None:
        """Recycle session-scoped owners whose session is gone (what a session
        ending half-way through leaves behind)."""
        ledger = self.ledger
        for owner in list(ledger.owners.values()):
            if owner.scope == SESSION and owner.session_id not in ledger.sessions:
                ledger.recycle(owner.name)

    def _problems(self) -> list[str]:
        try:
            return self.check()
        except Exception as error:  # the check itself trips on the damage
            return [f"check itself failed: {type(error).__name__}: {error}"]

    def _count_error(self, code: str) -> None:
        self.counters.errors += 1
        by_code = self.counters.errors_by_code
        by_code[code] = by_code.get(code, 0) + 1

    def _rerun(self, session_id: int, request_id: int, op: int) -> float:
        """The deadline of a request that was kept when the daemon stopped
        (it changed nothing then, so it runs again, waiting at most until
        then); ProtocolError for any other repeat whose reply is gone."""
        rerun = self.rerun.get(session_id, {})
        deadline = rerun.pop(request_id, None) if op in WAITING_OPS else None
        if deadline is None:
            raise ProtocolError(
                f"request {request_id} was applied already and its reply is "
                "no longer kept; nothing was done",
                request_id=request_id,
            )
        return deadline

    def _wait_kept(self, session_id: int, op: Op, request_id: int, deadline: float) -> None:
        self.waiting.add((session_id, request_id))
        if op in SEQUENCED_OPS:
            self.kept.setdefault(session_id, {})[request_id] = deadline

    def _wait_over(self, session_id: int, request_id: int) -> None:
        """A kept request is answered: its reply (cached by the caller) and
        what met it go out in the same commit."""
        self.waiting.discard((session_id, request_id))
        kept = self.kept.get(session_id)
        if kept is not None and kept.pop(request_id, None) is not None:
            self.ledger.changes.sessions.add(session_id)

    def _keep(self, session_id: int, request_id: int, frame: bytes) -> None:
        cache = self.replies.get(session_id)
        if cache is not None:
            cache[request_id] = frame
            if len(cache) > REPLY_CACHE_ENTRIES:
                cache.popitem(last=False)

    # -- kept requests (named buffers, events, queues) ----------------------

    def _waitable(self, session_id: int, request: Request, now: float) -> list[Any] | None:
        """Meet a request that may wait now, or keep it until `wait_s` runs out."""
        if (session_id, request.request_id) in self.waiting:
            return None  # a retry of an EVENTS request that is kept already
        wait_s = request.args[-1]
        waiter = Waiter(request.op, session_id, request.request_id, now + wait_s, request.args)
        result = self.exchange.try_now(waiter)
        if result is None:
            if wait_s <= 0:
                result = self.exchange.timed_out(waiter, now)
            else:
                self._may_keep(session_id, request)
                self.exchange.wait(waiter)
                self._wait_kept(session_id, request.op, request.request_id, waiter.deadline)
                return None
        if isinstance(result, Exception):
            raise result
        return ok_reply(request.request_id, *self._shape(request.op, result))

    @staticmethod
    def _shape(op: Op, result: list[Any]) -> list[Any]:
        # LOOKUP and QGET answer one item (a pair); EVENTS three; QPUT one
        return [result] if op in (Op.LOOKUP, Op.QGET) else result

    def wake(self, now: float) -> None:
        """Answer kept requests that can be met now or whose time ran out
        (the server calls this after each turn of its loop while any are
        kept, and at `next_wake` at the latest). Its cost does not grow with
        the number kept: the due ones come off deadline heaps, and of the
        waiting ALLOCs only the first is tried."""
        try:
            self.exchange.expire(now)
        except Exception as error:  # each waiter is isolated inside; this is the rest
            self.internal_error("the kept requests' deadlines", error, None, now)
        self._deliver_met(now)
        if self.alloc_waiters:
            self._serve_alloc_waiters(now)
        if self._quarantine_next:
            self.quarantine()

    def next_wake(self) -> float | None:
        """The earliest deadline of a kept request (None: none kept)."""
        found = self.exchange.next_deadline()
        heap = self.alloc_deadlines
        while heap and heap[0][1] not in self.alloc_waiters:
            heapq.heappop(heap)  # answered already
        if heap and (found is None or heap[0][0] < found):
            return heap[0][0]
        return found

    def has_waiters(self) -> bool:
        """Whether `wake` has anything to do."""
        return bool(self.exchange.kept_total or self.outbox or self.alloc_waiters)

    def kept_requests(self, session_id: int) -> int:
        """How many of the session's requests are kept (waiting)."""
        return self.exchange.kept(session_id) + self.alloc_kept.get(session_id, 0)

    def _may_keep(self, session_id: int, request: Request) -> None:
        """Refuse to keep one more request of a session at its bound."""
        if self.kept_requests(session_id) >= MAX_KEPT_PER_SESSION:
            raise LimitReached(
                f"{OP_NAMES[request.op]} refused: session {session_id} has "
                f"{MAX_KEPT_PER_SESSION} requests waiting already (lookups, queue gets and "
                "puts, event waits, allocations), the most one session may "
                "(kept_requests_per_session); let some be met or time out first, or wait "
                "in fewer threads at once",
                limit="kept_requests_per_session",
                value=MAX_KEPT_PER_SESSION,
            )

    def _serve_alloc_waiters(self, now: float) -> None:
        """Meet waiting ALLOCs in arrival order: the first that does not fit
        yet holds the others back (a large request is not starved by a stream
        of small ones); any whose time ran out gets its out_of_memory, and
        one that meets a quota gets that at once (waiting for room would not
        help it). Only the first is tried while it does not fit."""
        heap = self.alloc_deadlines
        while heap and heap[0][0] <= now:
            waiter = self.alloc_waiters.get(heapq.heappop(heap)[1])
            if waiter is None:
                continue  # answered already
            try:
                block = self._try_alloc(waiter, now)  # room may have come this very turn
            except OutOfMemory as error:
                if not isinstance(error, QuotaExceeded):
                    self.counters.alloc_wait_timeouts += 1
                    error.message = f"{error.message}; waited {now - waiter.since:.3g} s for room"
                    error.args = (error.message,)
                    error.details["waited_s"] = round(now - waiter.since, 3)
                self._answer_waiter(waiter, error_reply(waiter.request_id, error), now)
                continue
            except ShmArenaError as error:
                self._answer_waiter(waiter, error_reply(waiter.request_id, error), now)
                continue
            self.counters.allocs += 1
            self._answer_waiter(waiter, ok_reply(waiter.request_id, self._wire(block)), now)
        while self.alloc_waiters:
            waiter = next(iter(self.alloc_waiters.values()))
            try:
                block = self._try_alloc(waiter, now)
            except QuotaExceeded as error:  # a policy: answered at once, not kept
                self._answer_waiter(waiter, error_reply(waiter.request_id, error), now)
                continue
            except OutOfMemory:
                break  # no room yet: it holds the others back
            except ShmArenaError as error:  # the owner went meanwhile, say
                self._answer_waiter(waiter, error_reply(waiter.request_id, error), now)
                continue
            self.counters.allocs += 1
            self._answer_waiter(waiter, ok_reply(waiter.request_id, self._wire(block)), now)
        if len(heap) > 2 * len(self.alloc_waiters) + 32:
            self.alloc_deadlines = [e for e in heap if e[1] in self.alloc_waiters]
            heapq.heapify(self.alloc_deadlines)

    def _forget_alloc_waiter(self, waiter: _AllocWaiter) -> None:
        del self.alloc_waiters[waiter.seq]
        left = self.alloc_kept[waiter.session_id] - 1
        if left:
            self.alloc_kept[waiter.session_id] = left
        else:
            del self.alloc_kept[waiter.session_id]

    def _try_alloc(self, waiter: _AllocWaiter, now: float) -> Block:
        """The block for a waiting ALLOC; a bug on the way is this waiter's
        InternalError (a ShmArenaError: answered like any refusal)."""
        size, owner, detached, _, site = waiter.args
        try:
            if "wake" in self.faults:
                raise RuntimeError("fault injected by --debug-fail wake")
            return self.ledger.alloc(waiter.session_id, size, owner, detached, now, site)
        except ShmArenaError:
            raise
        except Exception as error:
            raise self.internal_error("a waiting alloc", error, waiter.session_id, now) from None

    def _answer_waiter(self, waiter: _AllocWaiter, reply: list[Any], now: float) -> None:
        self._forget_alloc_waiter(waiter)
        if reply[0] != OK:
            self._count_error(reply[2])
        self.counters.alloc_waited_s += now - waiter.since
        self._wait_over(waiter.session_id, waiter.request_id)
        frame = self._encode(reply)
        self._keep(waiter.session_id, waiter.request_id, frame)
        peer = self.session_peer.get(waiter.session_id)
        if peer is not None:
            self.outbox.append((peer, frame))

    def _deliver_met(self, now: float = 0.0) -> None:
        for waiter, result in self.exchange.take_met():
            self._wait_over(waiter.session_id, waiter.request_id)
            if "wake" in self.faults:
                result = RuntimeError("fault injected by --debug-fail wake")
            if isinstance(result, ShmArenaError):
                self._count_error(result.code)
                reply = error_reply(waiter.request_id, result)
                if isinstance(result, OutOfMemory):
                    self._log_oom(waiter.session_id, result, None)
            elif isinstance(result, Exception):  # a bug, met while answering this one
                where = f"a waiting {OP_NAMES[waiter.op]}"
                failure = self.internal_error(where, result, waiter.session_id, now)
                self._count_error(failure.code)
                reply = error_reply(waiter.request_id, failure)
            else:
                try:
                    reply = ok_reply(waiter.request_id, *self._shape(waiter.op, result))
                except Exception as error:
                    where = f"a waiting {OP_NAMES[waiter.op]}"
                    failure = self.internal_error(where, error, waiter.session_id, now)
                    self._count_error(failure.code)
                    reply = error_reply(waiter.request_id, failure)
            peer = self.session_peer.get(waiter.session_id)
            frame = self._encode(reply)
            if waiter.op in MUTATING_OPS:
                self._keep(waiter.session_id, waiter.request_id, frame)
            if peer is not None:
                self.outbox.append((peer, frame))

    def take_outbox(self) -> list[tuple[bytes, bytes]]:
        out, self.outbox = self.outbox, []
        return out

    # -- the log: events for the server to write -----------------------------

    def take_log(self) -> list[LogEvent]:
        """The log events since the last call, oldest first (the server writes
        them; the service itself does no I/O)."""
        events = list(self.log_events)
        self.log_events.clear()
        return events

    def _log(self, event: str, message: str, level: str = "info", **fields: Any) -> None:
        self.log_events.append(LogEvent(event, message, level, fields))

    def _log_oom(self, session_id: int, error: OutOfMemory, request: Request | None) -> None:
        session = self.ledger.sessions.get(session_id)
        pid = session.pid if session is not None else 0
        owner = ""
        at = OWNER_ARG.get(request.op) if request is not None else None
        if request is not None and at is not None and len(request.args) > at:
            name = request.args[at]
            owner = implicit_owner(session_id) if name is None else str(name)
        details = error.details
        self._log(
            "oom",
            f"out of memory: session {session_id} (pid {pid}) owner {owner!r} asked for "
            f"{format_size(error.requested_bytes)}; largest free block "
            f"{format_size(error.largest_free_bytes)}, {format_size(error.free_bytes)} free "
            f"({details.get('state', '')})",
            "warning",
            session=session_id,
            pid=pid,
            owner=owner,
            op=request.op.name.lower() if request is not None else "",
            requested_bytes=error.requested_bytes,
            largest_free_bytes=error.largest_free_bytes,
            free_bytes=error.free_bytes,
            state=details.get("state", ""),
            top_owners=details.get("top_owners", []),
        )

    def _publish(self, session_id: int, request: Request, now: float) -> list[Any]:
        name, handle, sealed = request.args
        self.exchange.publish(session_id, name, handle, sealed, now)
        return ok_reply(request.request_id, None)

    def _unpublish(self, session_id: int, request: Request, now: float) -> list[Any]:
        entry = self.exchange.names.get(request.args[0])
        holder = entry.block.owner if entry is not None else None
        owner = self.ledger.owners.get(holder) if holder is not None else None
        if owner is not None:
            self._require_owner_access(session_id, owner, "unpublish")
        self.exchange.unpublish(request.args[0])
        return ok_reply(request.request_id, None)

    def _names(self, session_id: int, request: Request, now: float) -> list[Any]:
        prefix, cursor, _ = request.args
        keyed = ((e.name, e) for e in self.exchange.names.values() if e.name.startswith(prefix))
        entries, more = self._page(request, keyed, cursor or None)
        return self._paged_reply(request, self.exchange.name_rows(entries, now), more)

    def _qopen(self, session_id: int, request: Request, now: float) -> list[Any]:
        name, maxsize = request.args
        return ok_reply(
            request.request_id, self.exchange.open_queue(session_id, name, maxsize, now)
        )

    def _qstat(self, session_id: int, request: Request, now: float) -> list[Any]:
        return ok_reply(request.request_id, self.exchange.queue_stat(session_id, request.args[0]))

    def _qclose(self, session_id: int, request: Request, now: float) -> list[Any]:
        self.exchange.close_queue(session_id, request.args[0])
        return ok_reply(request.request_id, None)

    # -- access (README "Access") ------------------------------------------

    def is_admin(self, uid: int) -> bool:
        """Whether a process of `uid` may administer the daemon: the
        daemon's own user and root."""
        return uid == 0 or uid == self.info.uid

    def admitted(self, creds: Creds) -> bool:
        """Whether a process may use the daemon at all: an administrator, or
        a member of the --group (its primary or a supplementary group)."""
        gid = self.info.group_gid
        return self.is_admin(creds.uid) or (gid >= 0 and (creds.gid == gid or gid in creds.groups))

    def _who_may(self) -> str:
        return "root and the daemon's user" + (f" (uid {self.info.uid})" if self.info.uid else "")

    def _require_admin(self, session_id: int, op: str, what: str) -> None:
        session = self.ledger.sessions[session_id]
        if not session.admin:
            raise AccessDenied(
                f"{op}: uid {session.uid} (session {session_id}, pid {session.pid}) may not "
                f"{what} on daemon {self.info.name!r}: only {self._who_may()} may; nothing "
                "was changed",
                op=op,
                uid=session.uid,
            )

    def _require_owner_access(self, session_id: int, owner: Any, op: str) -> None:
        session = self.ledger.sessions[session_id]
        if not session.admin and owner.uid != session.uid:
            raise AccessDenied(
                f"{op} of owner {owner.name!r}: it was created by uid {owner.uid}; uid "
                f"{session.uid} (session {session_id}, pid {session.pid}) may {op} only its "
                f"own user's owners; only {self._who_may()} may act on every owner. Nothing "
                "was changed",
                op=op,
                owner=owner.name,
                owner_uid=owner.uid,
                uid=session.uid,
            )

    # -- sessions ----------------------------------------------------------

    def _hello(
        self, peer: bytes, request: Request, now: float, creds: Creds | None = None
    ) -> list[Any]:
        version, claimed_pid, start_ticks, label, resume = request.args
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"client speaks protocol {version}, this daemon speaks {PROTOCOL_VERSION}; "
                "use a client and daemon from the same shmarena release",
                client_version=version,
                daemon_version=PROTOCOL_VERSION,
            )
        if not 0 < claimed_pid <= MAX_PID:
            raise InvalidRequest(f"hello: pid must be in 1..{MAX_PID}, got {claimed_pid}")
        # Who the process is comes from the kernel; the pid in the message is
        # only a hint (a process in another pid namespace names itself by
        # another number). The kernel's pid 0: a process the daemon cannot
        # see, which lives on a lease.
        if creds is None:
            uid, gid, pid = self.info.uid, -1, claimed_pid
        else:
            if creds.uid < 0:
                raise AccessDenied(
                    "hello: the daemon could not learn from the kernel which user this "
                    "connection belongs to, so it refuses it; connect over the daemon's ipc "
                    "socket",
                    op="hello",
                )
            if not self.admitted(creds):
                group = self.info.group_gid
                may = (
                    f"{self._who_may()} and members of group {group} (--group)"
                    if group >= 0
                    else f"{self._who_may()}; start it with --group G to let the members of "
                    "group G in"
                )
                raise AccessDenied(
                    f"hello: uid {creds.uid} (pid {creds.pid}) may not use daemon "
                    f"{self.info.name!r}: only {may} may",
                    op="hello",
                    uid=creds.uid,
                )
            uid, gid, pid = creds.uid, creds.gid, creds.pid
        if peer not in self.peers and self.ledger._next_session > MAX_SESSIONS:
            raise ShmArenaError(
                f"daemon {self.info.name!r} has opened {MAX_SESSIONS} sessions since it "
                "started, its limit; restart it"
            )
        session_id = self.peers.get(peer)
        resumed = False
        if session_id is None and len(resume) == 2:
            session_id = self._resume(peer, resume, pid, start_ticks, uid, now)
            resumed = session_id is not None
        if session_id is None:
            session = self.ledger.open_session(pid, start_ticks, label[:200], now, False)
            session.uid, session.gid, session.admin = uid, gid, self.is_admin(uid)
            session_id = session.id
            self.peers[peer] = session_id
            self.session_peer[session_id] = peer
            self.replies[session_id] = OrderedDict()
            self.tokens[session_id] = self._new_token()
            self.seen[session_id] = 0
            self.counters.sessions_opened += 1
            session.watched = bool(self.watch(session_id, pid, start_ticks))
            watch = "pidfd" if session.watched else "lease"
            claimed = f" (it said pid {claimed_pid})" if claimed_pid != pid else ""
            self._log(
                "client_joined",
                f"client session {session_id} joined: pid {pid}{claimed}, uid {uid}, label "
                f"{session.label!r}, watched by {watch}",
                session=session_id,
                pid=pid,
                claimed_pid=claimed_pid,
                uid=uid,
                label=session.label,
                watch=watch,
            )
        elif resumed:
            self._log(
                "client_resumed",
                f"client session {session_id} (pid {pid}) resumed from a new socket",
                session=session_id,
                pid=pid,
                how="token",
            )
        session = self.ledger.sessions[session_id]
        info = self.info
        return ok_reply(
            request.request_id,
            {
                "session": session_id,
                "name": info.name,
                "epoch": info.epoch,
                "size_bytes": self.ledger.space.size_bytes,
                "min_block_bytes": info.min_block_bytes,
                "segments": list(self.segments.values()),
                "pid": info.pid,
                "protocol": PROTOCOL_VERSION,
                "watched": session.watched,
                "lease_s": info.lease_s,
                "version": info.version,
                "token": self.tokens[session_id],
                "resumed": resumed,
                "numa": {
                    "policy": info.numa_policy,
                    "nodes": list(info.numa_nodes),
                    "cpus": list(info.numa_cpus),
                },
            },
        )

    def _resume(
        self, peer: bytes, resume: list[int], pid: int, start_ticks: int, uid: int, now: float
    ) -> int | None:
        """Bind a new socket of a client to its existing session, if the
        session is alive and the token, pid, start time and uid are the ones
        it said hello with; else None (the caller opens a new session)."""
        session_id, token = resume
        session = self.ledger.sessions.get(session_id)
        if (
            session is None
            or self.tokens.get(session_id) != token
            or (session.pid, session.start_ticks, session.uid) != (pid, start_ticks, uid)
        ):
            return None
        old = self.session_peer.get(session_id)
        if old is not None:
            self.peers.pop(old, None)
            self.ended[old] = (session_id, "moved", now)
        self.peers[peer] = session_id
        self.session_peer[session_id] = peer
        self.ended.pop(peer, None)
        self.ledger.changes.sessions.add(session_id)  # its new peer is kept
        if session_id in self.recovering:
            self._resumed(session_id)
        return session_id

    # -- sessions recovered after a restart --------------------------------

    def link(self, session_id: int) -> Link:
        """What a persistent table keeps of a session beyond the ledger."""
        replies = self.replies.get(session_id)
        last = next(reversed(replies.items())) if replies else None
        kept = {**self.rerun.get(session_id, {}), **self.kept.get(session_id, {})}
        return Link(
            self.tokens.get(session_id, 0),
            self.session_peer.get(session_id, b""),
            self.seen.get(session_id, 0),
            last,
            sorted(kept.items()),
        )

    def links(self) -> dict[int, Link]:
        return {sid: self.link(sid) for sid in self.ledger.sessions}

    def adopt(self, ledger: Ledger, links: dict[int, Link], now: float) -> None:
        """Take over a ledger recovered from a persistent table. Its sessions
        wait `info.grace_s` for their clients: a client whose socket comes
        back (same routing id), or that says hello with the session's token,
        resumes it; `expire` reclaims the others."""
        self.ledger = ledger
        self.exchange.attach(ledger)
        # Queues and names are not kept across a restart: references of
        # queued messages recovered from the table go.
        for block in list(ledger.blocks.values()):
            if block.retainers and QUEUED in block.retainers:
                block.retainers[QUEUED] = 1
                ledger.drop_holds([block])
        for session in ledger.sessions.values():
            session.admin = self.is_admin(session.uid)
        for session_id, link in links.items():
            if link.peer:
                self.peers[link.peer] = session_id
                self.session_peer[session_id] = link.peer
            self.tokens[session_id] = link.token
            self.seen[session_id] = link.seen
            self.replies[session_id] = OrderedDict([link.reply] if link.reply else [])
            if link.kept:  # waited on again when the client sends them again
                self.rerun[session_id] = dict(link.kept)
            self.recovering[session_id] = now + self.info.grace_s

    def connected(self, peer: bytes, now: float) -> None:
        """A client socket (re)connected: a recovered session is back."""
        session_id = self.peers.get(peer)
        if session_id is not None and session_id in self.recovering:
            self._resumed(session_id)
            self.ledger.sessions[session_id].last_seen = now

    def resend_note(self, session_id: int) -> bytes:
        """A message for a recovered session's client: the last of its
        requests this daemon has applied (it sends the later ones again)."""
        seen = self.seen.get(session_id, 0)
        error = Resend(
            f"daemon {self.info.name!r} was restarted; it has this session's requests up to {seen}",
            seen=seen,
        )
        reply = error_reply(0, error)
        reply[0] = LATE_ERR
        return self._encode(reply)

    def _resumed(self, session_id: int) -> None:
        del self.recovering[session_id]
        self.counters.sessions_resumed += 1

    def _no_session(self, peer: bytes, request: Request, now: float) -> SessionLost:
        """The error for a request from a socket without a session."""
        op = request.op.name.lower()
        info = self.info
        gone = self.ended.get(peer)
        if gone is not None:
            session_id, reason, when = gone
            why = {
                "lease_expired": f"its lease of {info.lease_s:g} s ran out (no request or "
                "heartbeat came; was the process stopped?)",
                "ended": "it ended (bye)",
                "moved": "its process reconnected it from another socket",
                "not_resumed": "the daemon was restarted and the client did not come back "
                f"within the grace period of {info.grace_s:g} s",
                "quarantined": "an internal error of the daemon while handling one of its "
                "requests left the state failing its check, so the session was ended (see the "
                "daemon's log)",
            }.get(reason, reason)
            return SessionLost(
                f"{op}: session {session_id} of daemon {info.name!r} is gone: {why}, "
                f"{now - when:.1f} s ago, and its blocks were reclaimed; every buffer of it "
                "may belong to someone else now. The client opens a new session on its "
                "next call",
                reason=reason,
                session=session_id,
                epoch=info.epoch,
            )
        return SessionLost(
            f"{op}: daemon {info.name!r} (pid {info.pid}, epoch {info.epoch}) has no session "
            "for this client: it was restarted since the client said hello, so the client's "
            "buffers are gone (they no longer share memory with anyone), or it dropped this "
            "client's connection (a frame over the size limit). The client opens a new "
            "session on its next call",
            reason="restarted",
            epoch=info.epoch,
        )

    def end_session(self, session_id: int, reason: str = "ended", now: float = 0.0) -> Freed:
        """The session is over (bye, process died, lease expired): reclaim it."""
        session = self.ledger.sessions.get(session_id)
        recovered = session_id in self.recovering
        freed = self.ledger.end_session(session_id, reason)
        if session is not None:
            self._log_end(session_id, session.pid, session.label, reason, recovered, freed)
        for waiter in self.exchange.by_session.get(session_id, {}).values():
            self.waiting.discard((session_id, waiter.request_id))
        self.exchange.end_session(session_id)
        if self.alloc_kept.pop(session_id, 0):
            for seq, alloc_waiter in list(self.alloc_waiters.items()):
                if alloc_waiter.session_id == session_id:
                    del self.alloc_waiters[seq]
                    self.waiting.discard((session_id, alloc_waiter.request_id))
        self.kept.pop(session_id, None)
        self.rerun.pop(session_id, None)
        peer = self.session_peer.pop(session_id, None)
        if peer is not None:
            self.peers.pop(peer, None)
            self.ended[peer] = (session_id, reason, now)
            if len(self.ended) > ENDED_PEERS:
                self.ended.popitem(last=False)
        self.replies.pop(session_id, None)
        self.tokens.pop(session_id, None)
        self.seen.pop(session_id, None)
        self.recovering.pop(session_id, None)
        return freed

    def _log_end(
        self, session_id: int, pid: int, label: str, reason: str, recovered: bool, freed: Freed
    ) -> None:
        got = f"reclaimed {freed.blocks} blocks, {format_size(freed.bytes)}"
        if reason == "ended":
            event, message = "client_left", f"client session {session_id} (pid {pid}) left: {got}"
        elif reason == "exited" and recovered:
            event = "client_died"
            message = f"recovered session {session_id} (pid {pid}) has exited: {got}"
        elif reason == "exited":
            event, message = "client_died", f"client session {session_id} exited: {got}"
        else:
            why = {
                "lease_expired": f"silent for longer than its {self.info.lease_s:g} s lease",
                "not_resumed": f"not back within the {self.info.grace_s:g} s grace",
                "quarantined": "ended after an internal error left the state failing its check",
            }.get(reason, reason)
            event = "client_died"
            message = f"client session {session_id} expired: {got} (pid {pid}, {why})"
        self._log(
            event,
            message,
            session=session_id,
            pid=pid,
            label=label,
            reason=reason,
            blocks_reclaimed=freed.blocks,
            bytes_reclaimed=freed.bytes,
        )

    def expire(self, now: float) -> list[int]:
        """End the unwatched sessions silent for longer than the lease."""
        limit = now - self.info.lease_s
        ended = [
            s.id
            for s in self.ledger.sessions.values()
            if not s.watched and s.last_seen < limit and s.id not in self.recovering
        ]
        for session_id in ended:
            self.reclaim(session_id, "lease_expired", now)
        late = [sid for sid, deadline in self.recovering.items() if deadline <= now]
        for session_id in late:
            self.reclaim(session_id, "not_resumed", now)
        return ended + late

    def reclaim(self, session_id: int, reason: str = "exited", now: float = 0.0) -> Freed:
        """End a session whose process is gone, counting what came back."""
        freed = self.end_session(session_id, reason, now)
        self.counters.sessions_reclaimed += 1
        self.counters.reclaimed_bytes += freed.bytes
        return freed

    def _bye(self, session_id: int, request: Request, now: float) -> list[Any]:
        freed = self.end_session(session_id, "ended", now)
        return ok_reply(request.request_id, [freed.blocks, freed.bytes])

    def _ping(self, session_id: int, request: Request, now: float) -> list[Any]:
        return ok_reply(request.request_id, now)

    # -- blocks and owners -------------------------------------------------

    def _wire(self, block: Block) -> list[int]:
        address = block.offset
        return [
            self.info.epoch,
            address >> SEGMENT_SHIFT,
            address & ((1 << SEGMENT_SHIFT) - 1),
            block.size,
            block.generation,
        ]

    def _segments(self, session_id: int, request: Request, now: float) -> list[Any]:
        return ok_reply(request.request_id, list(self.segments.values()))

    def _alloc(self, session_id: int, request: Request, now: float) -> list[Any] | None:
        size, owner, detached, wait_s, site = request.args
        key = (session_id, request.request_id)
        if key in self.waiting:
            return None  # a retry of one that waits already
        if wait_s > 0 and self.alloc_waiters:
            # Others wait already: behind them, unless waiting cannot help
            # (a bad size, a quota, a size the arena can never hold).
            check_size(size)
            self.ledger.check_quotas(session_id, [size], owner, detached)
            never = self.ledger.never_fits(size)
            if never is not None:
                raise never
            block = None
        else:
            try:
                block = self.ledger.alloc(session_id, size, owner, detached, now, site)
            except QuotaExceeded:
                raise  # a policy, not a lack of room: waiting would not help
            except OutOfMemory as error:
                if wait_s <= 0 or error.details.get("state") == "too_large":
                    raise
                block = None
        if block is None:
            self._may_keep(session_id, request)
            waiter = _AllocWaiter(session_id, request.request_id, request.args, now, now + wait_s)
            waiter.seq = self._next_alloc_wait
            self._next_alloc_wait += 1
            self.alloc_waiters[waiter.seq] = waiter
            self.alloc_kept[session_id] = self.alloc_kept.get(session_id, 0) + 1
            heapq.heappush(self.alloc_deadlines, (waiter.deadline, waiter.seq))
            self._wait_kept(session_id, Op.ALLOC, request.request_id, waiter.deadline)
            self.counters.alloc_waits += 1
            return None
        self.counters.allocs += 1
        return ok_reply(request.request_id, self._wire(block))

    def _alloc_many(self, session_id: int, request: Request, now: float) -> list[Any]:
        sizes, owner, detached, site = request.args
        blocks = self.ledger.alloc_many(session_id, sizes, owner, detached, now, site)
        self.counters.allocs += len(blocks)
        return ok_reply(request.request_id, [self._wire(b) for b in blocks])

    def _free(self, session_id: int, request: Request, now: float) -> list[Any]:
        handles: list[Handle] = request.args[0]
        freed = self.ledger.free(handles, now, session_id)
        self.counters.frees += freed.blocks
        return ok_reply(request.request_id, [freed.blocks, freed.bytes])

    def _owner(self, session_id: int, request: Request, now: float) -> list[Any]:
        name, detached, quota = request.args
        if quota < -1:
            raise InvalidRequest(
                f"owner {name!r}: quota must be -1 (unchanged), 0 (none) or bytes, got {quota}"
            )
        existing = self.ledger.owners.get(name)
        if quota >= 0 and quota != (existing.quota if existing is not None else 0):
            self._require_admin(session_id, "owner", f"set the quota of owner {name!r}")
        owner = self.ledger.open_owner(name, session_id, detached, now)
        if quota >= 0:
            self.ledger.set_quota(name, quota)
        row = self._owner_row(owner, now)
        row["id"] = self.ledger.owner_id(session_id, name)
        return ok_reply(request.request_id, row)

    def _recycle(self, session_id: int, request: Request, now: float) -> list[Any]:
        owner = self.ledger.owners.get(request.args[0])
        if owner is not None:
            self._require_owner_access(session_id, owner, "recycle")
        freed = self.ledger.recycle(request.args[0])
        self.counters.recycles += 1
        notices = self.ledger.take_notices(session_id)
        return ok_reply(request.request_id, [freed.blocks, freed.bytes], notices)

    def _fill(self, session_id: int, request: Request, now: float) -> list[Any]:
        fills, mark, sizes, owner, detached = request.args
        taken, direct = self.ledger.fill(session_id, fills, mark, sizes, owner, detached, now)
        self.counters.fills += 1
        self.counters.filled_blocks += sum(map(len, taken))
        self.counters.allocs += len(direct)
        return ok_reply(
            request.request_id,
            taken,
            [self._wire(b) for b in direct],
            self.ledger.take_notices(session_id),
        )

    def _post(self, session_id: int, request: Request, now: float) -> list[Any]:
        events = request.args[0]
        self.counters.posts += 1
        self.counters.events += len(events)
        refused = self.ledger.apply_events(session_id, events, now)
        if not refused:
            return []
        problems = [str(error) for error in refused]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        # Refused by the access model: said as such, not as a stale handle.
        kind = AccessDenied if isinstance(refused[0], AccessDenied) else StaleHandle
        raise kind(
            f"{len(problems)} of {len(events)} frees or hand-outs this client sent without "
            f"waiting were refused: {problems[0]}{more}",
            **{**refused[0].details, "problems": problems[:20]},
        )

    def _sync(self, session_id: int, request: Request, now: float) -> list[Any]:
        return ok_reply(request.request_id, self.ledger.take_notices(session_id))

    def _retain(self, session_id: int, request: Request, now: float) -> list[Any]:
        return ok_reply(request.request_id, self.ledger.retain(session_id, request.args[0], now))

    def _release(self, session_id: int, request: Request, now: float) -> list[Any]:
        return ok_reply(request.request_id, self.ledger.release(session_id, request.args[0]))

    def _shutdown(self, session_id: int, request: Request, now: float) -> list[Any]:
        self._require_admin(session_id, "shutdown", "stop the daemon")
        self.stopping = True
        return ok_reply(request.request_id, None)

    # -- introspection -----------------------------------------------------

    def stats(self, now: float) -> dict[str, Any]:
        """Everything about the arena in one snapshot (the keys are documented
        in README.md, "stats keys")."""
        ledger, buddy, info = self.ledger, self.ledger.space, self.info
        retained_only = ledger.retained_only()
        pinned = ledger.pinned()
        cached_blocks = sum(len(s.cached) for s in ledger.sessions.values())
        largest = buddy.largest_free_bytes()
        free = buddy.free_bytes
        return {
            "name": info.name,
            "pid": info.pid,
            "epoch": info.epoch,
            "version": info.version,
            "protocol": PROTOCOL_VERSION,
            "shm_name": info.shm_name,
            "socket": info.socket_path,
            "started_at": info.started_at,
            "uptime_s": round(now - info.started_at, 3),
            "size_bytes": buddy.size_bytes,
            "initial_size_bytes": info.size_bytes,
            "max_size_bytes": max(info.max_size_bytes, info.size_bytes),
            "segments": self.segment_rows(),
            "allocator": info.allocator,
            "used_bytes": ledger.owned_bytes,
            "requested_bytes": ledger.requested_bytes,
            "cached_bytes": ledger.cached_bytes,
            "cached_blocks": cached_blocks,
            "retained_only_bytes": sum(b.carved for b in retained_only),
            "retained_only_blocks": len(retained_only),
            "pinned_bytes": sum(b.carved for b in pinned),
            "pinned_blocks": len(pinned),
            "free_bytes": free,
            "largest_free_bytes": largest,
            "min_block_bytes": info.min_block_bytes,
            "live_blocks": len(ledger.blocks) - len(retained_only) - len(pinned) - cached_blocks,
            "owners": len(ledger.owners),
            "sessions": len(ledger.sessions),
            "fragmentation": round(1 - largest / free, 4) if free else 0.0,
            "free_blocks_by_order": {
                str(order): count for order, count in buddy.free_blocks_by_order().items()
            },
            "extfrag_index_by_order": {
                str(order): _extfrag(buddy.fragmentation_index(info.min_block_bytes << order))
                for order in range(buddy.max_order + 1)
            },
            "generation": ledger.generation,
            "lease_s": info.lease_s,
            "recovering_sessions": len(self.recovering),
            "names": len(self.exchange.names),
            "detached_owners": ledger.detached_owners,
            "queued_payload_bytes": self.exchange.payload_bytes,
            "queues": self.exchange.queue_rows(now),
            "queued_bytes": sum(
                b.carved for b in ledger.blocks.values() if b.retainers and QUEUED in b.retainers
            ),
            "waiting_requests": self.exchange.kept_total + len(self.alloc_waiters),
            "quota_per_session_bytes": ledger.session_quota,
            "access": {"admin_uids": sorted({0, info.uid}), "group_gid": info.group_gid},
            "limits": self.limits(),
            "alloc_waiters": [
                {
                    "session": w.session_id,
                    "size": w.args[0],
                    "owner": w.args[1],
                    "waited_s": round(now - w.since, 3),
                    "left_s": round(w.deadline - now, 3),
                }
                for w in self.alloc_waiters.values()
            ],
            "counters": {
                **vars(self.counters),
                "ops": dict(self.counters.ops),
                "errors_by_code": dict(self.counters.errors_by_code),
            },
            **self.extra_stats(),
        }

    def limits(self) -> dict[str, int]:
        """The bounds the daemon keeps on what clients make it hold, by the
        name a `LimitReached` error gives (README "Reliability")."""
        return {
            **self.ledger.limits(),
            **self.exchange.limits(),
            "kept_requests_per_session": MAX_KEPT_PER_SESSION,
            "listing_rows": self.max_listing_rows,
        }

    def segment_rows(self) -> list[dict[str, Any]]:
        """Per segment: its index, size, use and where it lives."""
        space = self.ledger.space
        parts = space.spaces if isinstance(space, Segmented) else {0: space}
        rows = []
        for index, part in parts.items():
            where = self.segments.get(index, {})
            rows.append(
                {
                    "index": index,
                    "size_bytes": part.size_bytes,
                    "used_bytes": part.used_bytes,
                    "blocks": len(part.live),
                    "largest_free_bytes": part.largest_free_bytes(),
                    "where": where.get("shm") or where.get("path", ""),
                    "empty_since": self.ledger.empty_since.get(index),
                }
            )
        return rows

    def _blocks(self, session_id: int, request: Request, now: float) -> list[Any]:
        return ok_reply(request.request_id, layout(self.ledger, request.args[0]))

    def _stats(self, session_id: int, request: Request, now: float) -> list[Any]:
        return ok_reply(request.request_id, self.stats(now))

    def _owner_row(self, owner: Any, now: float) -> dict[str, Any]:
        return {
            "name": owner.name,
            "scope": owner.scope,
            "session": owner.session_id,
            "pid": owner.pid,
            "uid": owner.uid,
            "alive": owner.session_id in self.ledger.sessions,
            "blocks": len(owner.blocks),
            "bytes": owner.bytes,
            "quota": owner.quota,
            "age_s": round(now - owner.created_at, 3),
            "sites": _sites(owner.blocks.values()),
        }

    def _quota(self, session_id: int, request: Request, now: float) -> list[Any]:
        target, quota = request.args
        what = "the per-session quota" if target == "" else f"the quota of owner {target!r}"
        self._require_admin(session_id, "quota", f"set {what}")
        self.ledger.set_quota(target, quota)
        return ok_reply(request.request_id, [target, quota])

    # -- listings, in pages (protocol.py: OWNERS) -------------------------

    def _page(
        self, request: Request, keyed: Iterable[tuple[Any, Any]], after: Any
    ) -> tuple[list[Any], Any]:
        """The items of the next page of a listing: the smallest keys after
        `after` (None: from the start), at most the page size of `request`
        (its last argument); and the key to continue after, None when no
        more. One page costs a pass over the keys, not a sort of them all."""
        page = request.args[PAGE_ARG[request.op]]
        if page < 0:
            raise InvalidRequest(
                f"{request.op.name.lower()}: page must be a number of rows (0: the "
                f"default), got {page}",
                op=request.op.name.lower(),
            )
        size = min(page, self.max_listing_rows) if page else self.max_listing_rows
        if after is not None:
            keyed = (pair for pair in keyed if pair[0] > after)
        chosen = heapq.nsmallest(size + 1, keyed, key=lambda pair: pair[0])
        more = chosen[size - 1][0] if len(chosen) > size else None
        return [item for _, item in chosen[:size]], more

    def _paged_reply(self, request: Request, rows: list[Any], cursor: str | None) -> list[Any]:
        if not request.args[PAGE_ARG[request.op]]:  # a client from before paging: the rows alone
            return ok_reply(request.request_id, rows)
        return ok_reply(request.request_id, rows, cursor)

    def _owners(self, session_id: int, request: Request, now: float) -> list[Any]:
        cursor, _, order = request.args
        if order == "bytes":  # the biggest holders, one page in one pass: what `top` shows
            if cursor:
                raise InvalidRequest(
                    "owners: order 'bytes' answers one page, the owners holding most bytes, "
                    f"and takes no cursor (got {cursor!r:.40}); page through the listing "
                    "order ('') for every owner",
                    op="owners",
                )
            biggest = (((-o.bytes, o.name), o) for o in self.ledger.owners.values())
            owners, _ = self._page(request, biggest, None)
            return self._paged_reply(request, [self._owner_row(o, now) for o in owners], None)
        if order:
            raise InvalidRequest(
                f"owners: order must be '' (the listing order) or 'bytes', got {order!r:.40}",
                op="owners",
            )
        keyed = ((_owner_key(o), o) for o in self.ledger.owners.values())
        owners, more = self._page(request, keyed, _parse_owner_cursor(cursor) if cursor else None)
        rows = [self._owner_row(o, now) for o in owners]
        next_cursor = None if more is None else f"{int(more[0])} {-more[1]} {more[2]}"
        return self._paged_reply(request, rows, next_cursor)

    def _clients(self, session_id: int, request: Request, now: float) -> list[Any]:
        ledger = self.ledger
        cursor = request.args[0]
        if cursor and not (cursor.isascii() and cursor.isdigit()):
            raise _bad_cursor("clients", cursor)
        keyed = ((s.id, s) for s in ledger.sessions.values())
        sessions, more = self._page(request, keyed, int(cursor) if cursor else None)
        rows = []
        for session in sessions:
            owners = [ledger.owners[n] for n in session.owners if n in ledger.owners]
            pinned = [ledger.blocks[o] for o in session.pinned if o in ledger.blocks]
            pinned = [b for b in pinned if b.owner is None]  # let go by their owners
            rows.append(
                {
                    "session": session.id,
                    "pid": session.pid,
                    "uid": session.uid,
                    "label": session.label,
                    "since": session.since,
                    "age_s": round(now - session.since, 3),
                    "watch": "pidfd" if session.watched else "lease",
                    "owners": len(owners),
                    "blocks": sum(len(o.blocks) for o in owners),
                    "bytes": sum(o.bytes for o in owners),
                    "retained": len(session.retained),
                    "owner_ids": len(session.owner_ids),
                    "cached_blocks": len(session.cached),
                    "cached_bytes": session.cached_bytes,
                    "pinned_blocks": len(pinned),
                    "pinned_bytes": sum(b.carved for b in pinned),
                    "waiting_requests": self.kept_requests(session.id),
                }
            )
        return self._paged_reply(request, rows, None if more is None else str(more))

    def check(self) -> list[str]:
        problems = self.ledger.check() + self.exchange.check() + self.extra_checks()
        for peer, session_id in self.peers.items():
            if self.session_peer.get(session_id) != peer:
                problems.append(f"peer map disagrees for session {session_id}")
        for session_id in self.peers.values():
            if session_id not in self.ledger.sessions:
                problems.append(f"peer of ended session {session_id} still mapped")
        counts: dict[int, int] = {}
        for waiter in self.alloc_waiters.values():
            counts[waiter.session_id] = counts.get(waiter.session_id, 0) + 1
        if counts != self.alloc_kept or list(self.alloc_waiters) != sorted(self.alloc_waiters):
            problems.append("waiting allocations are miscounted or out of arrival order")
        if not self.alloc_waiters.keys() <= {seq for _, seq in self.alloc_deadlines}:
            problems.append("a waiting allocation has no deadline in the heap")
        return problems

    def _check(self, session_id: int, request: Request, now: float) -> list[Any]:
        return ok_reply(request.request_id, self.check())
