"""Pushes to a client that did not ask: notices, and reclaim under pressure. Pure.

A client process opens a second socket per session and sends LISTEN on it
with the session's token; the daemon checks that the socket belongs to the
session's own process (its kernel credentials, as for HELLO) and keeps it as
the session's *push peer*, one per session, forgotten with the session.
Pushes are ordinary frames to that peer, sent with the replies of the turn
(`Service.outbox`), so the server needs no code of its own for them:

- PUSH_NOTICES: after any request that gave a session notices (a block of its
  cache freed or released through somebody else), the notices go to its push
  peer at once and are taken: no FILL or SYNC reply repeats them. Each such
  push carries its number (1, 2, ... per session); SYNC returns the last one,
  so the client's sync() waits for its listener to have handled it. A session
  without a push peer gets them in those replies, as before.
- PUSH_RECLAIM: an allocation (ALLOC, ALLOC_MANY, FILL) that does not fit
  while other sessions' caches hold at least the bytes it needs asks those
  sessions to give their free cached blocks back, and is kept (handlers/alloc.py)
  until the returned memory makes room, every asked session answered (its
  client drains its cache and then sends PING), or RECLAIM_WAIT_S passed: then
  it gets the OutOfMemory it would have had. A quota refusal never reclaims.
  Also, when an allocation leaves less than 1/WATERMARK_FRACTION of the arena
  free (an arena that may still grow: never), every session holding cached
  blocks is asked, at most once every WATERMARK_EVERY_S (Go's runtime
  flushes its per-P caches under pressure the same way).

A session asked and not answered within RECLAIM_WAIT_S (a stopped process)
is asked again by the next reclaim; what it holds stays its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shmarena.errors import AccessDenied, InvalidRequest
from shmarena.protocol import PUSH, PUSH_NOTICES, PUSH_RECLAIM, Request, encoder

if TYPE_CHECKING:
    from shmarena.daemon.admission import Creds
    from shmarena.daemon.service import Service

RECLAIM_WAIT_S = 0.2  # the longest an allocation waits for other caches' blocks
WATERMARK_FRACTION = 16  # free under size/16: every cache is asked for its free blocks
WATERMARK_EVERY_S = 1.0  # ... at most this often


class Pushes:
    """The push peers of the sessions and the reclaim under way."""

    def __init__(self) -> None:
        self.peers: dict[int, bytes] = {}  # session -> its push socket's routing id
        self.asked: dict[int, float] = {}  # session -> when it was asked, until it answers
        self.watermark_at = float("-inf")  # when the watermark last asked
        self.pushed = 0  # frames pushed (notices and reclaims)
        # session -> NOTICES pushes sent to it: SYNC returns it, so a client's
        # sync() can wait until its listener has handled them all
        self.noticed: dict[int, int] = {}
        self.reclaims = 0  # RECLAIM pushes
        self.encode = encoder()


def listen(svc: Service, peer: bytes, request: Request, creds: Creds | None) -> tuple[Any, ...]:
    """LISTEN: `peer` becomes the push socket of the session it names."""
    session_id, token = request.args
    session = svc.ledger.sessions.get(session_id)
    if session is None or not svc.admission.may_resume(session_id, token):
        raise AccessDenied(
            f"listen: there is no live session {session_id} with the token given; say "
            "hello first and listen with the session and token its reply holds",
            op="listen",
        )
    if peer in svc.admission.peers:
        raise InvalidRequest(
            f"listen: this socket carries the requests of session {svc.admission.peers[peer]}; "
            "listen from a socket of its own",
            op="listen",
        )
    if creds is not None and (creds.uid, creds.pid) != (session.uid, session.pid):
        raise AccessDenied(
            f"listen: session {session_id} belongs to pid {session.pid} (uid "
            f"{session.uid}), this socket to pid {creds.pid} (uid {creds.uid}); only the "
            "session's own process may listen to it",
            op="listen",
        )
    pushes: Pushes = svc.pushes
    pushes.peers[session_id] = peer
    if len(pushes.peers) > 2 * len(svc.ledger.sessions) + 32:  # ended sessions' peers
        live = svc.ledger.sessions
        pushes.peers = {sid: p for sid, p in pushes.peers.items() if sid in live}
        pushes.noticed = {sid: n for sid, n in pushes.noticed.items() if sid in live}
    return ()


def _push(svc: Service, session_id: int, kind: int, payload: Any) -> bool:
    pushes: Pushes = svc.pushes
    peer = pushes.peers.get(session_id)
    if peer is None:
        return False
    if session_id not in svc.ledger.sessions:
        del pushes.peers[session_id]  # the session ended: forget its socket
        return False
    if kind == PUSH_NOTICES:  # numbered: see `pushed_notices`
        count = pushes.noticed[session_id] = pushes.noticed.get(session_id, 0) + 1
        svc.outbox.append((peer, pushes.encode([PUSH, kind, payload, count])))
    else:
        svc.outbox.append((peer, pushes.encode([PUSH, kind, payload])))
    pushes.pushed += 1
    return True


def pushed_notices(svc: Service, session_id: int) -> int:
    """How many NOTICES pushes went to the session (each carries its number):
    the SYNC reply says it, and the client's sync() waits until its listener
    has handled that many, so the cache is as exact after sync() as the books."""
    pushes: Pushes = svc.pushes
    return pushes.noticed.get(session_id, 0)


def after_request(svc: Service, peer: bytes, now: float) -> None:
    """After every request: push the notices it made, and note an asked
    session's answer (a PING, which follows its cache's drains). Never raises."""
    try:
        _after_request(svc, peer)
    except Exception as error:  # noqa: BLE001 - a bug of ours: logged, the request stands
        svc.internal_error("pushing to clients", error, None, now)


def _after_request(svc: Service, peer: bytes) -> None:
    ledger = svc.ledger
    if ledger.noticed:
        peers = svc.pushes.peers
        for session_id in ledger.noticed:
            session = ledger.sessions.get(session_id)
            if session is not None and session.notices and session_id in peers:
                _push(svc, session_id, PUSH_NOTICES, ledger.take_notices(session_id))
        ledger.noticed.clear()
    asked = svc.pushes.asked
    if asked and svc.last_op == "ping":
        asked.pop(svc.admission.peers.get(peer, 0), None)


def _prune(svc: Service, now: float) -> dict[int, float]:
    """The asked sessions that may still answer (alive, asked recently)."""
    pushes: Pushes = svc.pushes
    live = svc.ledger.sessions
    late = now - RECLAIM_WAIT_S
    pushes.asked = {s: at for s, at in pushes.asked.items() if s in live and at > late}
    return pushes.asked


def _ask(svc: Service, holders: list[int], wanted: int, now: float) -> None:
    asked = _prune(svc, now)
    for session_id in holders:
        if session_id not in asked and _push(svc, session_id, PUSH_RECLAIM, wanted):
            asked[session_id] = now
            svc.pushes.reclaims += 1


def _holders(svc: Service, but: int) -> tuple[list[int], int]:
    """Sessions with a push peer and cached bytes (but `but`), and their total."""
    sessions = svc.ledger.sessions
    found, total = [], 0
    for session_id in svc.pushes.peers:
        session = sessions.get(session_id)
        if session is not None and session.cached_bytes > 0 and session_id != but:
            found.append(session_id)
            total += session.cached_bytes
    return found, total


def reclaim(svc: Service, asker: int, wanted: int, now: float) -> bool:
    """An allocation of `wanted` bytes by session `asker` does not fit: ask
    the other sessions whose caches hold blocks to give them back. Whether
    they hold at least `wanted` bytes (then the allocation is worth keeping)."""
    holders, total = _holders(svc, asker)
    if total < wanted:
        return False
    _ask(svc, holders, wanted, now)
    return True


def all_answered(svc: Service, now: float) -> bool:
    """Whether no asked session may still give something back."""
    return not _prune(svc, now)


def watermark(svc: Service, now: float) -> None:
    """After an allocation: below the watermark, ask every cache (rate-limited)."""
    space = svc.ledger.space
    if svc.ledger.growth is not None or space.free_bytes * WATERMARK_FRACTION >= space.size_bytes:
        return
    pushes: Pushes = svc.pushes
    if now < pushes.watermark_at + WATERMARK_EVERY_S:
        return
    pushes.watermark_at = now
    holders, _ = _holders(svc, 0)
    if holders:
        _ask(svc, holders, 0, now)
