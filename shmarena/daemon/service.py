"""The daemon's behaviour: request frames in, replies and effects out. Pure.

`Service.receive` decodes a frame, admits it (admission.py: who the peer is,
the session's sequence numbers, the reply cache), runs it through the
handler of its op (handlers/: allocation, owners, exchange, sessions,
admin) and builds its reply: the ONE place where a handler's values or an
exception become a reply frame. Whatever bytes arrive, it answers (or stays
silent, for frames not worth an answer) and never raises, and a refused
request leaves the state as it was. It returns an `Outcome`: the replies to
send and the effects for the server to perform (effects.py: watch a pid,
stop watching one, write a log event, stop). The service never calls the
server back; the one capability it holds is the segment maker a growing
arena needs in the middle of an allocation (see effects.py).

Everything else the service needs from the outside world is handed in: the
time on each call (the server reads its clock), who a new connection's
process is (its `Creds`, which the server has from the kernel), and whether
a watch could start (`watched`). The server calls `reclaim` when a watched
process dies, `expire` and `wake` on its timers, and takes the effects those
produce with `take_effects`.

The daemon survives its own bugs. An exception that is not a refusal (a
`ShmArenaError`), raised while handling one request or one kept request's
answer, goes to `internal_error`: it is counted (`counters.internal_errors`),
queued as an `internal_error` log event with its traceback, and answered to
that request as `InternalError`; the server sends its own per-turn failures
(timers, reclaims, the metrics snapshot) there too, and so does a move a
session's lifecycle refuses (lifecycle.py: `IllegalMove`, an InternalError
that is a bug, not a refusal). What the failed request touched is then
checked rather than undone: the ledger, exchange, peer maps and session
states are run through `check`. Clean, the daemon simply goes on (the request
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

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shmarena.daemon import failures, lifecycle
from shmarena.daemon.admission import Admission, Creds, admitted, is_admin, who_may
from shmarena.daemon.effects import Effect, Log, Outcome, SegmentMaker, Stop, Unwatch, Watch
from shmarena.daemon.exchange import Exchange
from shmarena.daemon.handlers import HANDLERS, admin, alloc, sessions
from shmarena.daemon.handlers import exchange as exchange_ops
from shmarena.daemon.handlers.alloc import AllocQueue
from shmarena.daemon.handlers.base import Call, Result
from shmarena.daemon.handlers.sessions import PendingHello
from shmarena.daemon.ledger import QUEUED, Freed, Growth, Ledger
from shmarena.daemon.lifecycle import RECOVERING, IllegalMove
from shmarena.daemon.logs import LogEvent
from shmarena.daemon.model import ALLOCATORS, OP_NAMES, ArenaInfo, Counters
from shmarena.daemon.table import Link
from shmarena.daemon.usage import Usage
from shmarena.errors import AccessDenied, InternalError, LimitReached, OutOfMemory, ShmArenaError
from shmarena.limits import MAX_KEPT_PER_SESSION, MAX_LISTING_ROWS
from shmarena.protocol import (
    LATE_ERR,
    MUTATING_OPS,
    OK,
    ONE_WAY_OPS,
    SEQUENCED_OPS,
    Op,
    Request,
    decode,
    encoder,
    error_reply,
    ok_reply,
    parse_request,
)
from shmarena.shm.segments import Segmented
from shmarena.shm.space import Space

__all__ = ["ALLOCATORS", "OP_NAMES", "ArenaInfo", "Creds", "Service"]

# Log events waiting for the server to write them (it takes them each loop
# wake-up); past this many the oldest go, so a service nobody drains (tests)
# stays bounded.
LOG_EVENTS_KEPT = 4096

# watch(session_id, pid, start_ticks) -> whether that process is watched (a
# pidfd) or its session lives on a lease: what `handle`, the in-process entry
# (tests, tools), does with a Watch effect. The server performs them itself.
WatchFunction = Callable[[int, int, int], bool]


def _no_watch(*_: int) -> bool:
    return False


def _no_grow(*_: int) -> bool:
    return True  # the pure core's tests: a segment is only numbers


@dataclass(slots=True)
class _Head:
    """What is known of a frame before it is checked: so even a malformed
    one-way request gets its refusal as a late error, and a request with a
    bad argument its refusal under its own id."""

    op: Any = None
    request_id: Any = None
    one_way: bool = False
    sequenced: bool = False


def _peek(message: Any) -> _Head:
    head = _Head()
    if isinstance(message, list) and message:
        if type(message[0]) is int:
            head.op = message[0]
            head.one_way = message[0] in ONE_WAY_OPS
            head.sequenced = message[0] in SEQUENCED_OPS
        if len(message) >= 2 and type(message[1]) is int:
            head.request_id = message[1]
    return head


def _request_id_of(payload: bytes) -> int | None:
    try:
        message = decode(payload)
        return message[1] if type(message[1]) is int else None
    except Exception:  # noqa: BLE001 - any garbage: the reply has no id
        return None


def _waits_until(request: Request, deadline: float, now: float) -> Request:
    """`request` (a retry of one kept when the daemon stopped) with its wait
    cut to what is left of it: its deadline stays the one it was given."""
    args = list(request.args)
    index = 3 if request.op is Op.ALLOC else len(args) - 1  # where wait_s is
    args[index] = max(0.0, min(float(args[index]), deadline - now))
    return request._replace(args=tuple(args))


class Service:
    """The daemon's pure core: `receive` a frame, get replies and effects
    (see the module's docstring)."""

    def __init__(
        self,
        info: ArenaInfo,
        watch: WatchFunction = _no_watch,
        new_token: Callable[[], int] | None = None,
        grow: SegmentMaker = _no_grow,
    ) -> None:
        self.info = info
        self.ledger = Ledger(info.name, info.epoch, *self.new_space(info, grow))
        # index -> how clients map that segment (the server fills in what it
        # made; by default segment 0 as `info` says)
        self.segments: dict[int, dict[str, Any]] = {0: info.first_segment}
        self.watch = watch
        # The server hands in a random source; the default is for tests.
        token = new_token or (lambda: (info.epoch * 0x9E3779B97F4A7C15) % (1 << 63))
        self.admission = Admission(token)
        adm = self.admission  # its tables, by the names the table code and tests use
        self.peers, self.session_peer, self.tokens = adm.peers, adm.session_peer, adm.tokens
        self.seen, self.recovering, self.waiting = adm.seen, adm.recovering, adm.waiting
        self.extra_stats: Callable[[], dict[str, Any]] = dict
        self.extra_checks: Callable[[], list[str]] = list  # the server's (generation tables)
        self.exchange = Exchange(self.ledger, info.epoch)
        self.ledger.session_quota = info.quota_per_session
        self.alloc_queue = AllocQueue()  # ALLOCs waiting for room (`ALLOC ... wait_s`)
        self.alloc_waiters = self.alloc_queue.waiters
        # Replies to kept (waiting) requests, met by something another
        # session did or by their deadline: (peer, frame), for the server to send.
        self.outbox: list[tuple[bytes, bytes]] = []
        self.counters = Counters()
        self.usage = Usage(info)  # the peak of used bytes, --warn-used (usage.py)
        # The op of the request the last `receive` parsed (None: it did not
        # parse, or was a repeat): the server times requests by it.
        self.last_op: str | None = None
        self.log_events: deque[LogEvent] = deque(maxlen=LOG_EVENTS_KEPT)
        self.effects: list[Effect] = []  # for the server (see take_effects)
        self.pending_hellos: dict[int, PendingHello] = {}  # answered by `watched`
        self.stopping = False
        self.max_listing_rows = MAX_LISTING_ROWS  # an attribute for the pure tests
        # Test-only fault injection (`--debug-fail`): op names whose requests
        # raise before they run, and "wake" for kept requests as they are
        # answered (met or timed out). Empty in production.
        self.faults: frozenset[str] = frozenset()
        self.quarantine_next: dict[int, float] = {}  # session -> when (see quarantine)
        self._encode: Callable[[Any], bytes] = encoder()
        self.pushes = sessions.Pushes()  # push sockets, reclaim (daemon/pressure.py)

    @staticmethod
    def new_space(info: ArenaInfo, grow: SegmentMaker = _no_grow) -> tuple[Space, Growth | None]:
        """The allocator for `info`, and its growth when it may grow."""
        kind, unit = ALLOCATORS[info.allocator], info.min_block_bytes
        space = kind(info.size_bytes, unit)
        if info.max_size_bytes <= info.size_bytes:
            return space, None
        granule = max(info.granule_bytes, unit)
        growth = Growth(info.max_size_bytes, granule, grow, info.idle_s)
        return Segmented(space, lambda size: kind(size, unit)), growth

    # -- the entry points ----------------------------------------------------

    def receive(
        self, peer: bytes, payload: bytes, now: float, creds: Creds | None = None
    ) -> Outcome:
        """The replies and effects of one request frame. Never raises.

        `creds` is who the peer's process is, from the kernel: the server
        hands it in for every peer without a session, and a HELLO opens the
        session as that uid and pid. None (the pure core's tests, an
        in-process caller) counts as the daemon's own user and trusts the
        pid in the HELLO."""
        frame = self._receive(peer, payload, now, creds)
        sessions.after_request(self, peer, now)  # pushes: notices (daemon/pressure.py)
        replies = [(peer, frame)] if frame else []
        if not (self.outbox or self.effects or self.log_events):  # the common case
            return Outcome(replies, [])
        return Outcome(replies + self.take_outbox(), self.take_effects())

    def handle(self, peer: bytes, payload: bytes, now: float, creds: Creds | None = None) -> bytes:
        """The reply frame for one request frame (b"": send nothing), for an
        in-process caller such as the pure tests: `receive` with its Watch
        effects done by the `watch` given at construction, and log events and
        met replies left for `take_log` and `take_outbox`. Never raises."""
        frame = self._receive(peer, payload, now, creds)
        effects, self.effects = self.effects, []
        for effect in effects:
            if isinstance(effect, Watch):
                ok = bool(self.watch(effect.session, effect.pid, effect.start_ticks))
                answered = self.watched(effect.session, ok)
                if answered is not None:
                    frame = answered[1]
        return frame

    def watched(self, session_id: int, watching: bool) -> tuple[bytes, bytes] | None:
        """The server did a Watch: whether it watches the session's process
        (a pidfd), else the session lives on a lease. The answer to the
        session's hello, (peer, frame), when one waits for it."""
        session = self.ledger.sessions.get(session_id)
        pending = self.pending_hellos.pop(session_id, None)
        if session is None:
            return None
        lifecycle.move(session, "watched")
        session.watched = watching
        if pending is None:
            return None
        sessions.joined(self, session_id, pending.claimed_pid)
        values = (sessions.hello_reply(self, session_id, False),)
        return pending.peer, self._encode(self.reply(pending.request_id, values))

    def take_effects(self) -> list[Effect]:
        """The effects since the last call, log events last (the server
        performs them after every call into the service)."""
        effects, self.effects = self.effects, []
        if not self.log_events:
            return effects
        return effects + [Log(event) for event in self.take_log()]

    def take_outbox(self) -> list[tuple[bytes, bytes]]:
        """Replies to kept requests answered since the last call: (peer, frame)."""
        out, self.outbox = self.outbox, []
        return out

    def take_log(self) -> list[LogEvent]:
        """The log events since the last call, oldest first."""
        events = list(self.log_events)
        self.log_events.clear()
        return events

    # -- one request -----------------------------------------------------------

    def _receive(self, peer: bytes, payload: bytes, now: float, creds: Creds | None) -> bytes:
        try:
            return self._handle(peer, payload, now, creds)
        except Exception as error:  # noqa: BLE001 - past the one error->reply spot (encoding, say)
            failure = self.internal_error("a request", error, self.admission.peers.get(peer), now)
            return self._encode(self.reply(_request_id_of(payload), failure))
        finally:
            if self.quarantine_next:
                self.quarantine()
            ledger, usage = self.ledger, self.usage  # the one compare a request costs it
            if ledger.owned_bytes != usage.used or ledger.peak_bytes != usage.peak:
                usage.observe(self, now)

    def _handle(self, peer: bytes, payload: bytes, now: float, creds: Creds | None) -> bytes:
        self.counters.requests += 1
        self.last_op = None
        head = _Head()
        request: Request | None = None
        session_id = self.admission.peers.get(peer)
        answer: tuple[Any, ...] | ShmArenaError
        try:
            message = decode(payload)
            head = _peek(message)
            rerun: float | None = None
            if session_id is not None:
                early = self._admit(session_id, head, now)
                if isinstance(early, bytes):
                    return early
                rerun = early
            request = parse_request(message)
            if rerun is not None:
                request = _waits_until(request, rerun, now)
            result = self._run(peer, session_id, request, now, creds)
            if result is None:  # kept until it can be met
                exchange_ops.deliver_met(self, now)
                return b""
            answer = result
        except IllegalMove as error:  # a daemon bug, not a refusal: handled as one
            answer = self.internal_error(self.last_op or "a request", error, session_id, now)
        except ShmArenaError as error:
            answer = error
            if isinstance(error, OutOfMemory) and session_id is not None:
                self.log_oom(session_id, error, request)
        except Exception as error:  # noqa: BLE001 - a bug of ours: report it, keep serving
            answer = self.internal_error(self.last_op or "a request", error, session_id, now)
        return self._finish(head, request, session_id, answer, now)

    def _admit(self, session_id: int, head: _Head, now: float) -> bytes | float | None:
        """A request of a known session: its sequence number (admission.py)."""
        self.resumed(session_id)
        self.ledger.sessions[session_id].last_seen = now
        if not head.sequenced or type(head.request_id) is not int:
            return None
        early = self.admission.sequence(session_id, head.op, head.request_id)
        if not isinstance(early, bytes):
            self.ledger.changes.sessions.add(session_id)
        return early

    def _run(
        self, peer: bytes, session_id: int | None, request: Request, now: float, creds: Creds | None
    ) -> Result:
        self.last_op = name = OP_NAMES[request.op]
        self.counters.ops[name] = self.counters.ops.get(name, 0) + 1
        if request.op is Op.HELLO or request.op is Op.LISTEN:  # a peer without a session
            return sessions.hello(self, peer, request, now, creds)
        if session_id is None:
            raise self.admission.no_session(peer, name, now, self.info)
        if name in self.faults:
            raise RuntimeError(f"fault injected by --debug-fail {name}")
        return HANDLERS[request.op](Call(self, session_id, request, now))

    def _finish(
        self,
        head: _Head,
        request: Request | None,
        session_id: int | None,
        answer: tuple[Any, ...] | ShmArenaError,
        now: float,
    ) -> bytes:
        reply = self.reply(head.request_id, answer)
        if head.one_way:
            if reply[0] == OK:
                return b""  # a one-way request that succeeded gets no reply
            self.counters.late_errors += 1
            reply[0] = LATE_ERR
        frame = self._encode(reply)
        if request is not None and request.op in MUTATING_OPS and session_id is not None:
            self.admission.keep(session_id, head.request_id, frame)
        if self.exchange.met:
            exchange_ops.deliver_met(self, now)
        return frame

    def reply(self, request_id: Any, answer: tuple[Any, ...] | ShmArenaError) -> list[Any]:
        """The ONE place a reply is built: ok with a handler's values, or the
        refusal (counted by its code)."""
        if isinstance(answer, ShmArenaError):
            self._count_error(answer.code)
            return error_reply(request_id, answer)
        return ok_reply(request_id, *answer)

    def answer_kept(
        self, session_id: int, request_id: int, op: Op, answer: tuple[Any, ...] | ShmArenaError
    ) -> None:
        """Answer a kept request (met, timed out or refused now): its reply
        goes to the outbox, and is cached for a repeat when its op changes
        state."""
        if self.admission.wait_over(session_id, request_id):
            self.ledger.changes.sessions.add(session_id)  # the table forgets it, with its reply
        frame = self._encode(self.reply(request_id, answer))
        if op in MUTATING_OPS:
            self.admission.keep(session_id, request_id, frame)
        peer = self.admission.session_peer.get(session_id)
        if peer is not None:
            self.outbox.append((peer, frame))

    # -- the daemon's own bugs ------------------------------------------------

    def internal_error(
        self, where: str, error: BaseException, session_id: int | None = None, now: float = 0.0
    ) -> InternalError:
        """Note a bug of the daemon met in `where` (an op name, or what the
        server was doing): count it, log it, check the state, and return the
        error to answer that request with (see failures.py). Never raises."""
        return failures.internal_error(self, where, error, session_id, now)

    def quarantine(self) -> None:
        """End the sessions `internal_error` marked (see failures.py). Never raises."""
        failures.quarantine(self)

    def _count_error(self, code: str) -> None:
        self.counters.errors += 1
        by_code = self.counters.errors_by_code
        by_code[code] = by_code.get(code, 0) + 1

    # -- kept requests (waiting ALLOCs, names, events, queues) ----------------

    def wake(self, now: float) -> None:
        """Answer kept requests that can be met now or whose time ran out
        (the server calls this after each turn of its loop while any are
        kept, and at `next_wake` at the latest). Its cost does not grow with
        the number kept: the due ones come off deadline heaps, and of the
        waiting ALLOCs only the first is tried."""
        try:
            self.exchange.expire(now)
        except Exception as error:  # noqa: BLE001 - each waiter is isolated inside; this is the rest
            self.internal_error("the kept requests' deadlines", error, None, now)
        exchange_ops.deliver_met(self, now)
        if self.alloc_queue.waiters:
            alloc.serve_alloc_waiters(self, now)
        if self.quarantine_next:
            self.quarantine()
        self.usage.observe(self, now)

    def next_wake(self) -> float | None:
        """The earliest deadline of a kept request (None: none kept)."""
        found = self.exchange.next_deadline()
        first_alloc = self.alloc_queue.next_deadline()
        if first_alloc is not None and (found is None or first_alloc < found):
            return first_alloc
        return found

    def has_waiters(self) -> bool:
        """Whether `wake` has anything to do."""
        return bool(self.exchange.kept_total or self.outbox or self.alloc_queue.waiters)

    def kept_requests(self, session_id: int) -> int:
        """How many of the session's requests are kept (waiting)."""
        return self.exchange.kept(session_id) + self.alloc_queue.kept.get(session_id, 0)

    def may_keep(self, session_id: int, request: Request) -> None:
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

    # -- the log: events for the server to write --------------------------------

    def log(self, event: str, message: str, level: str = "info", **fields: Any) -> None:
        """Queue a log event (the server writes it; see take_effects)."""
        self.log_events.append(LogEvent(event, message, level, fields))

    def log_oom(self, session_id: int, error: OutOfMemory, request: Request | None) -> None:
        """Log an out_of_memory: who asked, for what, and how the arena stood."""
        failures.log_oom(self, session_id, error, request)

    def stop(self) -> None:
        """An administrator asked the daemon to stop."""
        self.stopping = True
        self.effects.append(Stop())

    # -- access (docs/reliability.md, "Access") ------------------------------------------

    def is_admin(self, uid: int) -> bool:
        """Whether a process of `uid` may administer the daemon: the
        daemon's own user and root."""
        return is_admin(self.info, uid)

    def admitted(self, creds: Creds) -> bool:
        """Whether a process may use the daemon at all: an administrator, or
        a member of the --group (its primary or a supplementary group)."""
        return admitted(self.info, creds)

    def require_admin(self, session_id: int, op: str, what: str) -> None:
        """AccessDenied unless the session is an administrator's."""
        session = self.ledger.sessions[session_id]
        if not session.admin:
            raise AccessDenied(
                f"{op}: uid {session.uid} (session {session_id}, pid {session.pid}) may not "
                f"{what} on daemon {self.info.name!r}: only {who_may(self.info)} may; "
                "nothing was changed",
                op=op,
                uid=session.uid,
            )

    def require_owner_access(self, session_id: int, owner: Any, op: str) -> None:
        """AccessDenied unless the session's user made `owner` (or administers)."""
        session = self.ledger.sessions[session_id]
        if not session.admin and owner.uid != session.uid:
            raise AccessDenied(
                f"{op} of owner {owner.name!r}: it was created by uid {owner.uid}; uid "
                f"{session.uid} (session {session_id}, pid {session.pid}) may {op} only its "
                f"own user's owners; only {who_may(self.info)} may act on every owner. "
                "Nothing was changed",
                op=op,
                owner=owner.name,
                owner_uid=owner.uid,
                uid=session.uid,
            )

    # -- introspection -------------------------------------------------------

    def stats(self, now: float) -> dict[str, Any]:
        """Everything about the arena in one snapshot (the keys are documented
        in docs/stats.md)."""
        return admin.stats(self, now)

    def limits(self) -> dict[str, int]:
        """The bounds the daemon keeps on what clients make it hold, by the
        name a `LimitReached` error gives (docs/reliability.md)."""
        return admin.limits(self)

    def segment_rows(self) -> list[dict[str, Any]]:
        """Per segment: its index, size, use and where it lives."""
        return admin.segment_rows(self)

    def check(self) -> list[str]:
        """Every invariant the daemon keeps, as a list of problems (none: [])."""
        problems = self.ledger.check() + self.exchange.check() + self.extra_checks()
        problems += self.admission.check(self.ledger.sessions)
        problems += lifecycle.check(self.ledger.sessions.values(), self.admission.recovering)
        return problems + self.alloc_queue.check()

    # -- sessions --------------------------------------------------------------

    def session_of(self, peer: bytes) -> int | None:
        """The session a peer speaks for (None: none)."""
        return self.admission.peers.get(peer)

    def resumed(self, session_id: int) -> None:
        """A session's client spoke: a recovered one is back."""
        session = self.ledger.sessions.get(session_id)
        if session is not None and session.state is RECOVERING:
            lifecycle.move(session, "resumed")
            self.admission.recovering.pop(session_id, None)
            self.counters.sessions_resumed += 1

    def end_session(self, session_id: int, reason: str = "ended", now: float = 0.0) -> Freed:
        """The session is over (bye, process died, lease expired): reclaim it."""
        session = self.ledger.sessions.get(session_id)
        recovered = session is not None and session.state is RECOVERING
        if session is not None:  # (one ended already: what is left of it goes below)
            lifecycle.move(session, reason)  # the reason is the event
        freed = self.ledger.end_session(session_id, reason)
        if session is not None:
            sessions.log_end(self, session, reason, recovered, freed)
        waiting = self.admission.waiting
        for waiter in self.exchange.by_session.get(session_id, {}).values():
            waiting.discard((session_id, waiter.request_id))
        self.exchange.end_session(session_id)
        for request_id in self.alloc_queue.end_session(session_id):
            waiting.discard((session_id, request_id))
        self.admission.forget(session_id, reason, now)
        self.pending_hellos.pop(session_id, None)
        self.effects.append(Unwatch(session_id))
        return freed

    def expire(self, now: float) -> list[int]:
        """End the unwatched sessions silent for longer than the lease, and
        the recovered ones whose client did not come back in time."""
        limit = now - self.info.lease_s
        recovering = self.admission.recovering
        ended = [
            s.id
            for s in self.ledger.sessions.values()
            if not s.watched and s.last_seen < limit and s.state is not RECOVERING
        ]
        for session_id in ended:
            self.reclaim(session_id, "lease_expired", now)
        late = [sid for sid, deadline in recovering.items() if deadline <= now]
        for session_id in late:
            self.reclaim(session_id, "not_resumed", now)
        return ended + late

    def reclaim(self, session_id: int, reason: str = "exited", now: float = 0.0) -> Freed:
        """End a session whose process is gone, counting what came back."""
        freed = self.end_session(session_id, reason, now)
        self.counters.sessions_reclaimed += 1
        self.counters.reclaimed_bytes += freed.bytes
        self.usage.observe(self, now)
        return freed

    # -- sessions recovered after a restart ------------------------------------

    def link(self, session_id: int) -> Link:
        """What a persistent table keeps of a session beyond the ledger."""
        return self.admission.link(session_id)

    def links(self) -> dict[int, Link]:
        """`link` of every session."""
        return {sid: self.admission.link(sid) for sid in self.ledger.sessions}

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
            restored = ledger.sessions.get(session_id)
            if restored is not None:
                lifecycle.move(restored, "restored")
            self.admission.adopt(session_id, link, now + self.info.grace_s)
        self.usage.restart(self, now)  # the peak and the alarm are not kept (usage.py)

    def recovering_peers(self) -> list[tuple[int, bytes]]:
        """Recovered sessions still waiting for their client, with the peer
        (routing id) their client's socket comes back as."""
        return self.admission.recovering_peers()

    def connected(self, peer: bytes, now: float) -> None:
        """A client socket (re)connected: a recovered session is back."""
        session_id = self.admission.peers.get(peer)
        session = None if session_id is None else self.ledger.sessions.get(session_id)
        if session is not None and session.state is RECOVERING:
            self.resumed(session.id)
            session.last_seen = now

    def resend_note(self, session_id: int) -> bytes:
        """A message for a recovered session's client: the last of its
        requests this daemon has applied (it sends the later ones again)."""
        return self._encode(self.admission.resend_note(session_id, self.info.name))
