"""A daemon session's lifecycle (shmarena.daemon.lifecycle): the table of
legal moves on its own, then the pure `Service` driven through it on a
ManualClock (join -> live -> bye, join -> lease expiry, restore ->
recovering -> resume or grace over)."""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import pytest

from shmarena.daemon import table
from shmarena.daemon.clock import ManualClock
from shmarena.daemon.effects import Log, Watch
from shmarena.daemon.lifecycle import (
    END_EVENTS,
    ENDED,
    JOINING,
    LIVE,
    RECOVERING,
    TRANSITIONS,
    IllegalMove,
    SessionState,
    check,
    move,
)
from shmarena.daemon.records import Session
from shmarena.daemon.service import ArenaInfo, Service
from shmarena.errors import InternalError
from shmarena.protocol import ERR, OK, PROTOCOL_VERSION, Op, decode
from tests.unit.receiving import Client

KiB = 1024
LEASE_S = 10.0
GRACE_S = 30.0
EVENTS = sorted({event for _, event in TRANSITIONS} | set(END_EVENTS))


@dataclass
class Record:
    """The least `move` needs of a session."""

    id: int
    state: SessionState


# -- the table ----------------------------------------------------------------


@pytest.mark.parametrize(("before", "event"), sorted(TRANSITIONS))
def test_every_legal_move_lands_where_the_table_says(before: SessionState, event: str) -> None:
    record = Record(7, before)
    assert move(record, event) is TRANSITIONS[before, event]
    assert record.state is TRANSITIONS[before, event]


def test_a_session_record_starts_joining_and_its_end_reasons_are_events() -> None:
    session = Session(1, 100, 5, "t", 0.0, 0.0, False)
    assert session.state is JOINING
    for event in END_EVENTS:  # each reason ends a session from some state
        assert any(after is ENDED for (_, e), after in TRANSITIONS.items() if e == event)


@pytest.mark.parametrize(
    ("before", "event"),
    [
        (LIVE, "not_resumed"),  # only a recovered session has a grace to miss
        (RECOVERING, "lease_expired"),  # the grace, not the lease, is its clock
        (JOINING, "resumed"),
        (LIVE, "restored"),
        (RECOVERING, "restored"),
        (LIVE, "no such event"),
    ],
)
def test_an_illegal_move_raises_naming_the_session_its_state_and_the_event(
    before: SessionState, event: str
) -> None:
    record = Record(42, before)
    with pytest.raises(IllegalMove) as caught:
        move(record, event)
    assert isinstance(caught.value, InternalError)  # a daemon bug, not a refusal
    message = str(caught.value)
    assert "session 42" in message and before.value in message and repr(event) in message
    assert caught.value.details == {"session": 42, "state": before.value, "event": event}
    assert record.state is before  # refused: nothing moved


@pytest.mark.parametrize("event", EVENTS)
def test_ended_is_final(event: str) -> None:
    record = Record(3, ENDED)
    with pytest.raises(IllegalMove):
        move(record, event)
    assert record.state is ENDED


def test_every_state_but_ended_can_end() -> None:
    for state in SessionState:
        ends = {e for (s, e), after in TRANSITIONS.items() if s is state and after is ENDED}
        assert bool(ends) is (state is not ENDED), state


def test_check_holds_the_states_against_the_grace_deadlines() -> None:
    sessions = [Record(1, LIVE), Record(2, RECOVERING), Record(3, JOINING)]
    assert check(sessions, {2: 5.0}) == []
    assert check(sessions, {}) == ["session 2 is recovering but its grace deadline is missing"]
    assert check(sessions, {1: 5.0, 2: 5.0}) == ["session 1 is live but its grace deadline is set"]
    assert check([Record(4, ENDED)], {}) == ["session 4 is ended but still kept"]


# -- the service, driven through it ---------------------------------------------


def make(clock: ManualClock | None = None) -> tuple[Service, ManualClock]:
    clock = clock or ManualClock()
    info = ArenaInfo(
        "unit", 7, 256 * KiB, 4 * KiB, "", 1, clock.time(), lease_s=LEASE_S, grace_s=GRACE_S
    )
    return Service(info), clock


def join(service: Service, clock: ManualClock, ident: bytes, watched: bool) -> tuple[Client, int]:
    """Hello, then the server's answer to its Watch; the session id."""
    client = Client(service, clock, ident)
    outcome = client.send(Op.HELLO, PROTOCOL_VERSION, 4321, 5, "t", [])
    assert outcome.replies == []
    (watch,) = [e for e in outcome.effects if isinstance(e, Watch)]
    assert service.ledger.sessions[watch.session].state is JOINING
    assert watch.session in service.pending_hellos  # joining: its hello waits
    answered = service.watched(watch.session, watched)
    assert answered is not None and decode(answered[1])[0] == OK
    assert service.ledger.sessions[watch.session].state is LIVE
    assert watch.session not in service.pending_hellos
    return client, watch.session


def log_events(service: Service) -> list[str]:
    return [e.event.event for e in service.take_effects() if isinstance(e, Log)]


def test_join_live_bye() -> None:
    service, clock = make()
    client, sid = join(service, clock, b"a", watched=True)
    assert log_events(service) == ["client_joined"]
    session = service.ledger.sessions[sid]
    outcome = client.send(Op.BYE)
    assert decode(outcome.replies[0][1])[0] == OK
    assert session.state is ENDED and sid not in service.ledger.sessions
    assert [e.event.event for e in outcome.effects if isinstance(e, Log)] == ["client_left"]
    assert service.check() == []


def test_join_then_lease_expiry() -> None:
    service, clock = make()
    _, sid = join(service, clock, b"a", watched=False)
    session = service.ledger.sessions[sid]
    clock.jump(LEASE_S / 2)
    assert service.expire(clock.time()) == []
    assert session.state is LIVE
    clock.jump(LEASE_S)
    assert service.expire(clock.time()) == [sid]
    assert session.state is ENDED
    assert "client_died" in log_events(service)


def restart(service: Service, clock: ManualClock) -> Service:
    """The service a daemon restarted on `service`'s table makes."""
    record = table.snapshot(service.ledger, service.links(), {"clean": False, "mode": "sync"})
    packed = msgpack.packb(record, use_bin_type=True)
    record = msgpack.unpackb(packed, raw=False, strict_map_key=False)
    state = table.State()
    state.apply(record)
    ledger, links = table.build(state, "unit", Service.new_space(service.info)[0], clock.time())
    assert all(s.state is JOINING for s in ledger.sessions.values())  # not kept: derived
    again, _ = make(clock)
    again.adopt(ledger, links, clock.time())
    return again


def test_restore_recovering_then_resumed_by_a_request() -> None:
    service, clock = make()
    client, sid = join(service, clock, b"a", watched=False)
    again = restart(service, clock)
    session = again.ledger.sessions[sid]
    assert session.state is RECOVERING and sid in again.recovering
    assert again.check() == []
    assert again.watched(sid, False) is None  # the server watches it: still recovering
    assert session.state is RECOVERING
    client.service = again
    reply = decode(client.send(Op.STATS).replies[0][1])
    assert reply[0] == OK
    assert session.state is LIVE and sid not in again.recovering
    assert again.counters.sessions_resumed == 1
    assert again.check() == []


def test_restore_recovering_then_resumed_by_its_socket() -> None:
    service, clock = make()
    _, sid = join(service, clock, b"a", watched=True)
    again = restart(service, clock)
    assert again.recovering_peers() == [(sid, b"a")]
    again.connected(b"a", clock.time())
    assert again.ledger.sessions[sid].state is LIVE
    assert again.recovering_peers() == []


def test_restore_recovering_then_grace_over() -> None:
    service, clock = make()
    _, sid = join(service, clock, b"a", watched=False)
    again = restart(service, clock)
    session = again.ledger.sessions[sid]
    clock.jump(LEASE_S * 2)  # past its lease: the grace, not the lease, counts now
    assert again.expire(clock.time()) == []
    assert session.state is RECOVERING
    clock.jump(GRACE_S)
    assert again.expire(clock.time()) == [sid]
    assert session.state is ENDED and sid not in again.recovering
    assert again.check() == []


def test_adopting_a_ledger_of_live_sessions_is_refused() -> None:
    service, clock = make()
    _, sid = join(service, clock, b"a", watched=True)
    with pytest.raises(IllegalMove, match=f"session {sid} is live"):
        service.adopt(service.ledger, service.links(), clock.time())


def test_an_illegal_move_in_a_request_is_an_internal_error_not_a_crash() -> None:
    service, clock = make()
    client, sid = join(service, clock, b"a", watched=True)
    log_events(service)
    service.ledger.sessions[sid].state = ENDED  # a bug would have left it so
    outcome = client.send(Op.BYE)
    reply = decode(outcome.replies[0][1])
    assert reply[0] == ERR and reply[2] == "internal_error", reply
    assert service.counters.internal_errors == 1
    assert "internal_error" in [e.event.event for e in outcome.effects if isinstance(e, Log)]
    other, _ = join(service, clock, b"b", watched=True)  # and the daemon serves on
    assert decode(other.send(Op.STATS).replies[0][1])[0] == OK
