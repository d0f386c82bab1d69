"""Pushes on the pure core (daemon/pressure.py): LISTEN's checks, notices
pushed to the push socket and taken, and an allocation kept while another
session's cache is asked for its blocks, answered when they come back or with
its usual refusal when nobody gives in time."""

from __future__ import annotations

from typing import Any

from shmarena.daemon.admission import Creds
from shmarena.daemon.clock import ManualClock
from shmarena.daemon.effects import Watch
from shmarena.daemon.pressure import RECLAIM_WAIT_S
from shmarena.daemon.service import ArenaInfo, Service
from shmarena.protocol import (
    ASSIGN,
    DRAIN,
    ERR,
    FREE_ID_BIT,
    GEN_SHIFT,
    OK,
    PROTOCOL_VERSION,
    PUSH,
    PUSH_NOTICES,
    PUSH_RECLAIM,
    Op,
    decode,
    encode,
)
from tests.unit.receiving import Client

MIN = 4096
ARENA = 64 * MIN
CLASS = 4 * MIN


def new_service() -> tuple[Service, ManualClock]:
    info = ArenaInfo("unit", 77, ARENA, MIN, "", 1, 0.0, grace_s=30.0)
    return Service(info), ManualClock()


def join(service: Service, clock: ManualClock, ident: bytes) -> tuple[Client, int, int]:
    """A client's hello, answered: (client, session, token)."""
    client = Client(service, clock, ident)
    outcome = client.send(Op.HELLO, PROTOCOL_VERSION, 4242, 5)
    watch = next(e for e in outcome.effects if isinstance(e, Watch))
    answered = service.watched(watch.session, True)
    assert answered is not None
    info = decode(answered[1])[2]
    return client, info["session"], info["token"]


def listen(service: Service, clock: ManualClock, ident: bytes, session: int, token: int) -> Any:
    outcome = Client(service, clock, ident).send(Op.LISTEN, session, token)
    return decode(outcome.replies[0][1])


def frames(outcome: Any) -> dict[bytes, list[Any]]:
    return {peer: decode(frame) for peer, frame in outcome.replies}


def cached_session(service: Service, clock: ManualClock) -> tuple[Client, int]:
    """A listening session whose cache holds 8 free blocks of CLASS bytes."""
    client, session, token = join(service, clock, b"a")
    assert listen(service, clock, b"a-push", session, token)[0] == OK
    reply = frames(client.send(Op.FILL, [CLASS, 8, 1], session << GEN_SHIFT | 1))[b"a"]
    assert reply[0] == OK and len(reply[2][0]) == 8
    return client, session


def test_listen_takes_only_the_session_s_own_token_process_and_a_socket_of_its_own() -> None:
    service, clock = new_service()
    _, session, token = join(service, clock, b"a")
    wrong = listen(service, clock, b"x", session, token + 1)
    assert wrong[0] == ERR and wrong[2] == "access_denied" and "token" in wrong[3]
    own = listen(service, clock, b"a", session, token)
    assert own[0] == ERR and "socket of its own" in own[3]
    frame = encode([int(Op.LISTEN), FREE_ID_BIT, session, token])
    other = Creds(uid=0, gid=0, pid=1)  # another process, as the kernel says
    outcome = service.receive(b"y", frame, clock.time(), other)
    refused = decode(outcome.replies[0][1])
    assert refused[0] == ERR and "only the session's own process" in refused[3]
    assert listen(service, clock, b"a-push", session, token)[0] == OK
    assert service.pushes.peers == {session: b"a-push"}
    service.end_session(session)
    assert service.check() == []


def test_notices_are_pushed_after_the_request_that_made_them_and_taken() -> None:
    service, clock = new_service()
    owner, session = cached_session(service, clock)
    address = service.ledger.sessions[session].cached.copy().pop()
    generation = session << GEN_SHIFT | 2
    assert frames(owner.send(Op.POST, [ASSIGN, address, 100, generation, 0])) == {}
    reader, _, _ = join(service, clock, b"r")
    outcome = reader.send(Op.FREE, [[77, 0, address, 100, generation]])
    sent = frames(outcome)
    assert sent[b"r"][0] == OK
    assert sent[b"a-push"] == [PUSH, PUSH_NOTICES, [address, generation], 1]  # numbered
    # never twice; and SYNC says one NOTICES push went out (the client waits for it)
    assert frames(owner.send(Op.SYNC))[b"a"] == [OK, owner.rid, [], 1]
    assert service.check() == []


def test_an_allocation_waits_for_another_cache_to_give_its_blocks_back() -> None:
    service, clock = new_service()
    owner, session = cached_session(service, clock)
    asker, _, _ = join(service, clock, b"b")
    rest = ARENA - 8 * CLASS
    assert frames(asker.send(Op.ALLOC, rest))[b"b"][0] == OK
    outcome = asker.send(Op.ALLOC, 2 * CLASS)  # only the cache's blocks can make room
    sent = frames(outcome)
    assert b"b" not in sent  # kept
    assert service.pushes.asked.keys() == {session}
    cached = sorted(service.ledger.sessions[session].cached)
    drains = [x for address in cached for x in (DRAIN, address)]
    owner.send(Op.POST, drains)
    owner.send(Op.PING)
    service.wake(clock.time())
    answered = {peer: decode(frame) for peer, frame in service.take_outbox()}
    assert answered[b"b"][0] == OK and answered[b"b"][2][3] == 2 * CLASS
    assert service.check() == []


def test_nobody_answering_gets_the_usual_refusal_at_the_deadline() -> None:
    service, clock = new_service()
    _, session = cached_session(service, clock)
    asker, _, _ = join(service, clock, b"b")
    assert frames(asker.send(Op.ALLOC, ARENA - 8 * CLASS))[b"b"][0] == OK
    assert b"b" not in frames(asker.send(Op.ALLOC, 2 * CLASS))
    clock.jump(RECLAIM_WAIT_S + 0.01)
    service.wake(clock.time())
    answered = {peer: decode(frame) for peer, frame in service.take_outbox()}
    refused = answered[b"b"]
    assert refused[0] == ERR and refused[2] == "out_of_memory" and "waited" not in refused[3]
    # More than every cache holds: refused at once, nobody asked.
    assert frames(asker.send(Op.ALLOC, 16 * CLASS))[b"b"][2] == "out_of_memory"
    assert service.ledger.sessions[session].cached_bytes == 8 * CLASS
    assert service.check() == []


def test_a_quota_refusal_never_reclaims() -> None:
    service, clock = new_service()
    _, session = cached_session(service, clock)
    asker, _, _ = join(service, clock, b"b")
    service.ledger.session_quota = 2 * CLASS
    refused = frames(asker.send(Op.ALLOC, 3 * CLASS))[b"b"]
    assert refused[0] == ERR and refused[2] == "quota_exceeded"
    assert not service.pushes.asked
    assert service.ledger.sessions[session].cached_bytes == 8 * CLASS


def test_the_low_watermark_asks_every_cache_at_most_once_a_second() -> None:
    service, clock = new_service()
    _, session = cached_session(service, clock)
    asker, _, _ = join(service, clock, b"b")
    sent = frames(asker.send(Op.ALLOC, ARENA - 8 * CLASS - MIN))
    assert sent[b"a-push"] == [PUSH, PUSH_RECLAIM, 0]
    service.pushes.asked.clear()  # as if it answered
    assert b"a-push" not in frames(asker.send(Op.ALLOC, MIN))  # within the second
