"""The daemon's own bugs, and running out of memory: what is counted and
logged, and the sessions quarantined when the state fails its check. Pure.

See service.py's docstring for the policy: a bug while handling a request is
that request's `InternalError`; the state is checked rather than undone; a
session whose request left it failing the check is ended.
"""

from __future__ import annotations

import traceback
from typing import TYPE_CHECKING

from shmarena.config import format_size
from shmarena.daemon.ledger import SESSION, implicit_owner
from shmarena.errors import InternalError, OutOfMemory
from shmarena.protocol import Op, Request

if TYPE_CHECKING:
    from shmarena.daemon.service import Service

# Where the owner is among the arguments of the requests that allocate (for
# the OOM event).
OWNER_ARG = {Op.ALLOC: 1, Op.ALLOC_MANY: 1, Op.FILL: 3}


def internal_error(
    svc: Service, where: str, error: BaseException, session_id: int | None = None, now: float = 0.0
) -> InternalError:
    """Note a bug of the daemon met in `where` (an op name, or what the
    server was doing): count it, queue its log event with the traceback,
    run `check`, and return the error to answer that request with. When
    the check fails, `session_id` (the session whose request failed) is
    quarantined at the next `quarantine` call: at the end of the `handle`
    or `wake` under way, or right after the server's call. Never raises."""
    svc.counters.internal_errors += 1
    kind = f"{type(error).__name__}: {error}"
    problems = _state_problems(svc)
    # (also a session the ledger dropped already: its peer, tokens and
    # waiters may be what is left over)
    quarantined = bool(problems) and session_id is not None
    if quarantined:
        assert session_id is not None
        svc.quarantine_next[session_id] = now
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
    svc.log(
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


def quarantine(svc: Service) -> None:
    """End the sessions `internal_error` marked (outside any loop over
    the service's own collections), recycle session owners left without a
    session, and log what `check` says then. Never raises."""
    while svc.quarantine_next:
        session_id, now = svc.quarantine_next.popitem()
        try:
            svc.end_session(session_id, "quarantined", now)
            _recycle_orphans(svc)
        except Exception as error:  # noqa: BLE001 - the daemon must go on serving
            svc.log("quarantine_failed", f"ending session {session_id} after an internal "
                      f"error failed too: {error!r}", "error", session=session_id)  # fmt: skip
        svc.counters.quarantined_sessions += 1
        problems = _state_problems(svc)
        svc.log(
            "quarantined",
            f"session {session_id} was ended after an internal error; the daemon's state "
            + (f"still fails its check: {problems[0]}" if problems else "passes its check"),
            "error" if problems else "warning",
            session=session_id,
            problems=problems[:20],
        )


def _recycle_orphans(svc: Service) -> None:
    """Recycle session-scoped owners whose session is gone (what a session
    ending half-way through leaves behind)."""
    ledger = svc.ledger
    for owner in list(ledger.owners.values()):
        if owner.scope == SESSION and owner.session_id not in ledger.sessions:
            ledger.recycle(owner.name)


def _state_problems(svc: Service) -> list[str]:
    try:
        return svc.check()
    except Exception as error:  # noqa: BLE001 - the check itself trips on the damage
        return [f"check itself failed: {type(error).__name__}: {error}"]


def log_oom(svc: Service, session_id: int, error: OutOfMemory, request: Request | None) -> None:
    """Log an out_of_memory: who asked, for what, and how the arena stood."""
    session = svc.ledger.sessions.get(session_id)
    pid = session.pid if session is not None else 0
    owner = ""
    at = OWNER_ARG.get(request.op) if request is not None else None
    if request is not None and at is not None and len(request.args) > at:
        name = request.args[at]
        owner = implicit_owner(session_id) if name is None else str(name)
    details = error.details
    svc.log(
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
