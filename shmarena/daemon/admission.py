"""Who may talk to the daemon, and in what order. Pure.

Admission owns what the daemon knows about connections rather than about
memory: which socket (ZeroMQ routing id, "peer") speaks for which session,
the secret a client shows to resume its session from a new socket, the
peers whose session ended (so their next request learns why), and the
sequence of each session's state-changing requests: each number is applied
once and in order, a repeat is answered from a small reply cache, a gap is
asked for again (`Resend`). It also keeps the set of requests that wait
(kept) so a client's retry of one is dropped instead of run twice, and which
of them a persistent table must remember (`link`).

Who a process is comes from the kernel (`Creds`), never from a message;
`admitted` and `is_admin` are the access model (docs/reliability.md, "Access").
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Container
from dataclasses import dataclass

from shmarena.daemon.model import ArenaInfo
from shmarena.daemon.table import Link
from shmarena.errors import ProtocolError, Resend, SessionLost
from shmarena.limits import REPLY_CACHE_ENTRIES
from shmarena.protocol import LATE_ERR, ONE_WAY_OPS, SEQUENCED_OPS, WAITING_OPS, error_reply

# Peers whose session ended are remembered (bounded) so that their next
# request learns why, instead of a bare "say hello first".
ENDED_PEERS = 4096

# Why a session ended, said to its client's next request.
_GONE_BECAUSE = {
    "ended": "it ended (bye)",
    "moved": "its process reconnected it from another socket",
    "quarantined": "an internal error of the daemon while handling one of its requests left "
    "the state failing its check, so the session was ended (see the daemon's log)",
}


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


def is_admin(info: ArenaInfo, uid: int) -> bool:
    """Whether a process of `uid` may administer the daemon: the daemon's
    own user and root."""
    return uid == 0 or uid == info.uid


def admitted(info: ArenaInfo, creds: Creds) -> bool:
    """Whether a process may use the daemon at all: an administrator, or a
    member of the --group (its primary or a supplementary group)."""
    gid = info.group_gid
    return is_admin(info, creds.uid) or (gid >= 0 and (creds.gid == gid or gid in creds.groups))


def who_may(info: ArenaInfo) -> str:
    """The administrators, in words."""
    return "root and the daemon's user" + (f" (uid {info.uid})" if info.uid else "")


class Admission:
    """Peers, sessions' sequence numbers, the reply cache and the kept
    requests' bookkeeping (see the module's docstring)."""

    def __init__(self, new_token: Callable[[], int]) -> None:
        self.new_token = new_token
        self.peers: dict[bytes, int] = {}  # zmq routing id -> session id
        self.session_peer: dict[int, bytes] = {}
        self.replies: dict[int, OrderedDict[int, bytes]] = {}  # session -> rid -> reply
        # session -> secret a client shows to resume it from a new socket
        self.tokens: dict[int, int] = {}
        self.ended: OrderedDict[bytes, tuple[int, str, float]] = OrderedDict()
        self.seen: dict[int, int] = {}  # session -> last sequenced request id applied
        # Sessions recovered from a persistent table, until their client is
        # back: session -> deadline (see Service.adopt). Exactly the sessions
        # whose state is RECOVERING (lifecycle.py; Service.check says so).
        self.recovering: dict[int, float] = {}
        # (session, request id) of the kept (waiting) requests, so a client's
        # retry of one is dropped instead of run again.
        self.waiting: set[tuple[int, int]] = set()
        # The sequenced ones among them, per session, with their deadlines:
        # a persistent table keeps these (see `link`), since a kept request
        # has changed nothing yet and must be waited on again after a crash.
        self.kept: dict[int, dict[int, float]] = {}
        # Requests a table recovered as kept, until the client sends them
        # again: session -> request id -> deadline.
        self.rerun: dict[int, dict[int, float]] = {}

    # -- sequencing ----------------------------------------------------------

    def sequence(self, session_id: int, op: int, request_id: int) -> bytes | float | None:
        """Check a sequenced request's number against the session's: None to
        run it; bytes to answer with instead (b"": nothing, for a repeat that
        is kept or one-way); a float, the deadline of a repeat that was kept
        when the daemon stopped and runs again. Each number once, in order: a
        repeat gets the reply it got before, a skipped number is asked for
        again (Resend)."""
        seen = self.seen[session_id]
        if request_id == seen + 1:
            self.seen[session_id] = request_id
            return None
        if request_id > seen:
            raise Resend(
                f"requests {seen + 1}..{request_id - 1} of this session never "
                "reached the daemon (was it restarted?); send them again",
                seen=seen,
            )
        if op in ONE_WAY_OPS:
            return b""  # a repeated post: applied already, never answered
        if (session_id, request_id) in self.waiting:
            return b""  # kept: its reply comes when it is met
        cached = self.replies[session_id].get(request_id)
        if cached is not None:
            return cached
        return self._rerun(session_id, request_id, op)

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

    def keep(self, session_id: int, request_id: int, frame: bytes) -> None:
        """Cache the reply to a state-changing request, for a repeat of it."""
        cache = self.replies.get(session_id)
        if cache is not None:
            cache[request_id] = frame
            if len(cache) > REPLY_CACHE_ENTRIES:
                cache.popitem(last=False)

    def wait_kept(self, session_id: int, op: int, request_id: int, deadline: float) -> None:
        """A request is kept until it can be met or `deadline`."""
        self.waiting.add((session_id, request_id))
        if op in SEQUENCED_OPS:
            self.kept.setdefault(session_id, {})[request_id] = deadline

    def wait_over(self, session_id: int, request_id: int) -> bool:
        """A kept request is answered; whether a table must note it (its
        reply, cached by the caller, and what met it go out in one commit)."""
        self.waiting.discard((session_id, request_id))
        kept = self.kept.get(session_id)
        return kept is not None and kept.pop(request_id, None) is not None

    # -- sessions ------------------------------------------------------------

    def open(self, peer: bytes, session_id: int) -> int:
        """A new session spoke from `peer`; its resumption token."""
        self.peers[peer] = session_id
        self.session_peer[session_id] = peer
        self.replies[session_id] = OrderedDict()
        token = self.tokens[session_id] = self.new_token()
        self.seen[session_id] = 0
        return token

    def may_resume(self, session_id: int, token: int) -> bool:
        """Whether `token` is the secret of live session `session_id`."""
        return self.tokens.get(session_id) == token

    def move(self, peer: bytes, session_id: int, now: float) -> None:
        """Bind a session to the new socket `peer` of its client."""
        old = self.session_peer.get(session_id)
        if old is not None:
            self.peers.pop(old, None)
            self.ended[old] = (session_id, "moved", now)
        self.peers[peer] = session_id
        self.session_peer[session_id] = peer
        self.ended.pop(peer, None)

    def forget(self, session_id: int, reason: str, now: float) -> None:
        """The session is over: drop what was kept for it, and remember its
        peer (bounded) to tell that peer why."""
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

    def check(self, sessions: Container[int]) -> list[str]:
        """The peer maps against each other and against the live sessions."""
        problems = []
        for peer, session_id in self.peers.items():
            if self.session_peer.get(session_id) != peer:
                problems.append(f"peer map disagrees for session {session_id}")
        problems.extend(
            f"peer of ended session {session_id} still mapped"
            for session_id in self.peers.values()
            if session_id not in sessions
        )
        return problems

    # -- what a persistent table keeps ---------------------------------------

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

    def adopt(self, session_id: int, link: Link, deadline: float) -> None:
        """A session recovered from a table: it waits until `deadline` for
        its client (same routing id, or a hello with its token)."""
        if link.peer:
            self.peers[link.peer] = session_id
            self.session_peer[session_id] = link.peer
        self.tokens[session_id] = link.token
        self.seen[session_id] = link.seen
        self.replies[session_id] = OrderedDict([link.reply] if link.reply else [])
        if link.kept:  # waited on again when the client sends them again
            self.rerun[session_id] = dict(link.kept)
        self.recovering[session_id] = deadline

    def recovering_peers(self) -> list[tuple[int, bytes]]:
        """Recovered sessions still waiting for their client, with the peer
        their client's socket will come back as."""
        return [(sid, peer) for sid in self.recovering if (peer := self.session_peer.get(sid))]

    def resend_note(self, session_id: int, daemon: str) -> list[object]:
        """A late error for a recovered session's client: the last of its
        requests this daemon has applied (it sends the later ones again)."""
        seen = self.seen.get(session_id, 0)
        error = Resend(
            f"daemon {daemon!r} was restarted; it has this session's requests up to {seen}",
            seen=seen,
        )
        reply: list[object] = error_reply(0, error)
        reply[0] = LATE_ERR
        return reply

    def no_session(self, peer: bytes, op: str, now: float, info: ArenaInfo) -> SessionLost:
        """The error for a request from a socket without a session."""
        gone = self.ended.get(peer)
        if gone is None:
            return SessionLost(
                f"{op}: daemon {info.name!r} (pid {info.pid}, epoch {info.epoch}) has no "
                "session for this client: it was restarted since the client said hello, so "
                "the client's buffers are gone (they no longer share memory with anyone), or "
                "it dropped this client's connection (a frame over the size limit). The "
                "client opens a new session on its next call",
                reason="restarted",
                epoch=info.epoch,
            )
        session_id, reason, when = gone
        why = {
            **_GONE_BECAUSE,
            "lease_expired": f"its lease of {info.lease_s:g} s ran out (no request or "
            "heartbeat came; was the process stopped?)",
            "not_resumed": "the daemon was restarted and the client did not come back within "
            f"the grace period of {info.grace_s:g} s",
        }.get(reason, reason)
        return SessionLost(
            f"{op}: session {session_id} of daemon {info.name!r} is gone: {why}, "
            f"{now - when:.1f} s ago, and its blocks were reclaimed; every buffer of it may "
            "belong to someone else now. The client opens a new session on its next call",
            reason=reason,
            session=session_id,
            epoch=info.epoch,
        )
