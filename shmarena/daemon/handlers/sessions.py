"""HELLO and BYE: a client's session begins (or resumes) and ends. Pure.

LISTEN, the other request of a socket without a session, makes that socket
the push socket of a session of the same process (daemon/pressure.py).

A new session is answered only once the server says whether it watches the
client's process (the `Watch` effect, then `Service.watched`): the hello
reply tells the client whether it must keep a lease alive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shmarena.config import format_size
from shmarena.daemon.admission import Creds, who_may
from shmarena.daemon.effects import Watch
from shmarena.daemon.handlers.base import Call, Result
from shmarena.daemon.ledger import Freed
from shmarena.daemon.pressure import Pushes, after_request, listen
from shmarena.errors import AccessDenied, InvalidRequest, ProtocolError, ShmArenaError
from shmarena.limits import MAX_PID, MAX_SESSIONS
from shmarena.protocol import PROTOCOL_VERSION, Op, Request

__all__ = ["Pushes", "after_request", "bye", "hello", "hello_reply", "joined", "log_end"]

if TYPE_CHECKING:
    from shmarena.daemon.service import Service


@dataclass(frozen=True, slots=True)
class PendingHello:
    """A new session's hello, answered once its Watch is done (the session
    is JOINING until then: lifecycle.py)."""

    peer: bytes
    request_id: int
    claimed_pid: int


def _identity(svc: Service, claimed_pid: int, creds: Creds | None) -> tuple[int, int, int]:
    """(uid, gid, pid) of a hello's process. Who the process is comes from
    the kernel; the pid in the message is only a hint (a process in another
    pid namespace names itself by another number). The kernel's pid 0: a
    process the daemon cannot see, which lives on a lease. No creds (the pure
    core's tests, an in-process caller): the daemon's own user."""
    if creds is None:
        return svc.info.uid, -1, claimed_pid
    if creds.uid < 0:
        raise AccessDenied(
            "hello: the daemon could not learn from the kernel which user this "
            "connection belongs to, so it refuses it; connect over the daemon's ipc "
            "socket",
            op="hello",
        )
    if not svc.admitted(creds):
        group = svc.info.group_gid
        who = who_may(svc.info)
        may = (
            f"{who} and members of group {group} (--group)"
            if group >= 0
            else f"{who}; start it with --group G to let the members of group G in"
        )
        raise AccessDenied(
            f"hello: uid {creds.uid} (pid {creds.pid}) may not use daemon "
            f"{svc.info.name!r}: only {may} may",
            op="hello",
            uid=creds.uid,
        )
    return creds.uid, creds.gid, creds.pid


def _check_hello(request: Request) -> None:
    version, claimed_pid = request.args[:2]
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"client speaks protocol {version}, this daemon speaks {PROTOCOL_VERSION}; "
            "use a client and daemon from the same shmarena release",
            client_version=version,
            daemon_version=PROTOCOL_VERSION,
        )
    if not 0 < claimed_pid <= MAX_PID:
        raise InvalidRequest(f"hello: pid must be in 1..{MAX_PID}, got {claimed_pid}")


def _resume(
    svc: Service,
    peer: bytes,
    resume: list[int],
    identity: tuple[int, int, int],
    ticks: int,
    now: float,
) -> int | None:
    """Bind a new socket of a client to its existing session, if the
    session is alive and the token, pid, start time and uid are the ones
    it said hello with; else None (the caller opens a new session)."""
    session_id, token = resume
    uid, _, pid = identity
    session = svc.ledger.sessions.get(session_id)
    if (
        session is None
        or not svc.admission.may_resume(session_id, token)
        or (session.pid, session.start_ticks, session.uid) != (pid, ticks, uid)
    ):
        return None
    svc.admission.move(peer, session_id, now)
    svc.ledger.changes.sessions.add(session_id)  # its new peer is kept
    svc.resumed(session_id)
    svc.log(
        "client_resumed",
        f"client session {session_id} (pid {pid}) resumed from a new socket",
        session=session_id,
        pid=pid,
        how="token",
    )
    return session_id


def hello(svc: Service, peer: bytes, request: Request, now: float, creds: Creds | None) -> Result:
    """HELLO: the session of this peer (resumed with a token, or new: then
    None, and a Watch effect; `Service.watched` answers it). LISTEN too."""
    if request.op is Op.LISTEN:
        return listen(svc, peer, request, creds)
    _check_hello(request)
    _, claimed_pid, start_ticks, label, resume = request.args
    identity = _identity(svc, claimed_pid, creds)
    if peer not in svc.admission.peers and svc.ledger._next_session > MAX_SESSIONS:
        raise ShmArenaError(
            f"daemon {svc.info.name!r} has opened {MAX_SESSIONS} sessions since it "
            "started, its limit; restart it"
        )
    session_id = svc.admission.peers.get(peer)
    resumed = False
    if session_id is None and len(resume) == 2:
        session_id = _resume(svc, peer, resume, identity, start_ticks, now)
        resumed = session_id is not None
    if session_id is not None:
        return (hello_reply(svc, session_id, resumed),)
    uid, gid, pid = identity
    session = svc.ledger.open_session(pid, start_ticks, label[:200], now, False)
    session.uid, session.gid, session.admin = uid, gid, svc.is_admin(uid)
    svc.admission.open(peer, session.id)
    svc.counters.sessions_opened += 1
    svc.pending_hellos[session.id] = PendingHello(peer, request.request_id, claimed_pid)
    svc.effects.append(Watch(session.id, pid, start_ticks))
    return None


def joined(svc: Service, session_id: int, claimed_pid: int) -> None:
    """Log a new session, once it is known how it is watched."""
    session = svc.ledger.sessions[session_id]
    pid, uid = session.pid, session.uid
    watch = "pidfd" if session.watched else "lease"
    claimed = f" (it said pid {claimed_pid})" if claimed_pid != pid else ""
    svc.log(
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


def hello_reply(svc: Service, session_id: int, resumed: bool) -> dict[str, Any]:
    """What a hello is answered with: the session and how to map the arena."""
    session = svc.ledger.sessions[session_id]
    info = svc.info
    return {
        "session": session_id,
        "name": info.name,
        "epoch": info.epoch,
        "size_bytes": svc.ledger.space.size_bytes,
        "min_block_bytes": info.min_block_bytes,
        "segments": list(svc.segments.values()),
        "pid": info.pid,
        "protocol": PROTOCOL_VERSION,
        "watched": session.watched,
        "lease_s": info.lease_s,
        "version": info.version,
        "token": svc.admission.tokens[session_id],
        "resumed": resumed,
        "numa": {
            "policy": info.numa_policy,
            "nodes": list(info.numa_nodes),
            "cpus": list(info.numa_cpus),
        },
    }


def bye(c: Call) -> Result:
    """BYE: the session ends; (blocks, bytes) reclaimed."""
    freed = c.svc.end_session(c.session, "ended", c.now)
    return ([freed.blocks, freed.bytes],)


def log_end(svc: Service, session: Any, reason: str, recovered: bool, freed: Freed) -> None:
    """Log a session's end: why, and what came back."""
    session_id, pid = session.id, session.pid
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
            "lease_expired": f"silent for longer than its {svc.info.lease_s:g} s lease",
            "not_resumed": f"not back within the {svc.info.grace_s:g} s grace",
            "quarantined": "ended after an internal error left the state failing its check",
        }.get(reason, reason)
        event = "client_died"
        message = f"client session {session_id} expired: {got} (pid {pid}, {why})"
    svc.log(
        event,
        message,
        session=session_id,
        pid=pid,
        label=session.label,
        reason=reason,
        blocks_reclaimed=freed.blocks,
        bytes_reclaimed=freed.bytes,
    )
