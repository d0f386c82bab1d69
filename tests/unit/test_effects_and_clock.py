"""The service returns replies and effects (Service.receive), and its timers
run on a clock a test moves (ManualClock): leases, waits and expiry without
sleeping."""

from __future__ import annotations

import ast
import pathlib

import pytest

import shmarena.daemon
from shmarena.daemon.clock import ManualClock, SystemClock
from shmarena.daemon.effects import Log, Stop, Unwatch, Watch
from shmarena.daemon.service import ArenaInfo, Service
from shmarena.protocol import (
    ERR,
    OK,
    PROTOCOL_VERSION,
    Op,
    decode,
)
from tests.unit.receiving import Client

KiB = 1024
LEASE_S = 10.0


def make(size: int = 256 * KiB) -> tuple[Service, ManualClock]:
    clock = ManualClock()
    info = ArenaInfo("unit", 7, size, 4 * KiB, "/shmarena-unit", 1, clock.time(), lease_s=LEASE_S)
    return Service(info), clock


def hello(service: Service, clock: ManualClock, ident: bytes, watched: bool) -> tuple[Client, int]:
    client = Client(service, clock, ident)
    outcome = client.send(Op.HELLO, PROTOCOL_VERSION, 4321, 5, "t", [])
    assert outcome.replies == []  # answered once the server says how it watches
    (watch,) = [e for e in outcome.effects if isinstance(e, Watch)]
    assert (watch.pid, watch.start_ticks) == (4321, 5)
    answered = service.watched(watch.session, watched)
    assert answered is not None and answered[0] == ident
    reply = decode(answered[1])
    assert reply[0] == OK and reply[2]["watched"] is watched
    return client, watch.session


def test_manual_clock_moves_only_forward_and_only_when_told() -> None:
    clock = ManualClock(50.0)
    assert clock.time() == clock.monotonic() == 50.0
    clock.jump(2.5)
    assert clock.time() == clock.monotonic() == 52.5
    with pytest.raises(ValueError):
        clock.jump(-1)
    assert SystemClock().monotonic() <= SystemClock().monotonic()


def test_a_new_session_asks_for_a_watch_and_its_hello_says_how_it_is_watched() -> None:
    service, clock = make()
    _, session = hello(service, clock, b"a", watched=True)
    events = [e.event.event for e in service.take_effects() if isinstance(e, Log)]
    assert events == ["client_joined"]
    assert service.ledger.sessions[session].watched


def test_a_session_on_a_lease_expires_when_the_clock_passes_it() -> None:
    service, clock = make()
    client, session = hello(service, clock, b"a", watched=False)
    client.send(Op.ALLOC, 64 * KiB, None, False, 0.0, "")
    service.take_effects()
    clock.jump(LEASE_S - 1)
    assert service.expire(clock.time()) == []
    clock.jump(2)
    assert service.expire(clock.time()) == [session]
    effects = service.take_effects()
    assert Unwatch(session) in effects
    assert [e.event.event for e in effects if isinstance(e, Log)] == ["client_died"]
    assert service.stats(clock.time())["used_bytes"] == 0 and service.check() == []


def test_a_waiting_alloc_is_refused_when_its_wait_runs_out_on_the_clock() -> None:
    service, clock = make()
    a, _ = hello(service, clock, b"a", watched=True)
    b, _ = hello(service, clock, b"b", watched=True)
    (reply,) = a.send(Op.ALLOC, 256 * KiB, None, False, 0.0, "").replies
    assert decode(reply[1])[0] == OK  # the arena is full
    assert b.send(Op.ALLOC, 64 * KiB, None, False, 3.0, "").replies == []  # kept
    assert service.next_wake() == clock.time() + 3.0
    clock.jump(2.0)
    service.wake(clock.time())
    assert service.take_outbox() == []  # still waiting
    clock.jump(1.5)
    service.wake(clock.time())
    ((peer, frame),) = service.take_outbox()
    answer = decode(frame)
    assert peer == b"b" and answer[0] == ERR and answer[2] == "out_of_memory"
    assert answer[4]["waited_s"] == 3.5 and service.next_wake() is None


def test_a_waiting_alloc_met_by_a_free_is_answered_in_the_outcome_of_the_free() -> None:
    service, clock = make()
    a, _ = hello(service, clock, b"a", watched=True)
    b, _ = hello(service, clock, b"b", watched=True)
    (reply,) = a.send(Op.ALLOC, 256 * KiB, None, False, 0.0, "").replies
    handle = decode(reply[1])[2]
    assert b.send(Op.ALLOC, 64 * KiB, None, False, 5.0, "").replies == []
    a.send(Op.FREE, [handle])
    clock.jump(0.5)
    service.wake(clock.time())
    ((peer, frame),) = service.take_outbox()
    assert peer == b"b" and decode(frame)[0] == OK


def test_bye_and_shutdown_are_effects_for_the_server() -> None:
    service, clock = make()
    a, session = hello(service, clock, b"a", watched=True)
    service.take_effects()
    outcome = a.send(Op.BYE)
    assert len(outcome.replies) == 1 and Unwatch(session) in outcome.effects
    admin, _ = hello(service, clock, b"admin", watched=True)
    outcome = admin.send(Op.SHUTDOWN)
    assert Stop() in outcome.effects and decode(outcome.replies[0][1])[0] == OK


IO_MODULES = {"zmq", "mmap", "socket", "os", "time", "posix_ipc", "subprocess", "signal", "select"}
IO_MODULES |= {"threading", "queue"}
SERVICE_MODULES = [
    "service.py",
    "admission.py",
    "effects.py",
    "model.py",
    "failures.py",
    "handlers/__init__.py",
    "handlers/base.py",
    "handlers/alloc.py",
    "handlers/owners.py",
    "handlers/exchange.py",
    "handlers/sessions.py",
    "handlers/admin.py",
    "handlers/paging.py",
]


@pytest.mark.parametrize("module", SERVICE_MODULES)
def test_the_service_and_what_was_split_from_it_stay_pure(module: str) -> None:
    path = pathlib.Path(shmarena.daemon.__file__).parent / module
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    found = roots & IO_MODULES
    assert not found, f"daemon/{module} imports {sorted(found)}; keep I/O in the server"
