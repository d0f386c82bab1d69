"""Kept requests against a real daemon and real processes: a waiting
allocation that meets a quota hears of it (not DaemonUnavailable), one the
arena can never hold is refused at once and holds nobody back, and one
session may keep only so many requests, told by a `limit_reached` that
names the bound."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import msgpack
import pytest
import zmq

import shmarena
from shmarena.limits import MAX_KEPT_PER_SESSION
from shmarena.protocol import PROTOCOL_VERSION, Op
from tests.conftest import Daemon, wait_for

MiB = 1 << 20

WAITER = """
import shmarena, sys
c = shmarena.connect()
print("waiting", flush=True)
try:
    buf = c.alloc(int(sys.argv[1]), timeout=float(sys.argv[2]))
    print("got", buf.size, flush=True)
except shmarena.ShmArenaError as error:
    print(type(error).__name__, error, flush=True)
sys.stdin.read()
"""


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        child.kill()
        child.wait(timeout=10)
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()


def start_waiter(
    daemon: Daemon, children: list[subprocess.Popen[str]], size: int, timeout: float
) -> subprocess.Popen[str]:
    child = daemon.python(
        WAITER, str(size), str(timeout), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    children.append(child)
    assert child.stdout is not None and child.stdout.readline().strip() == "waiting"
    return child


def answer(child: subprocess.Popen[str]) -> str:
    assert child.stdout is not None
    return child.stdout.readline().strip()


def waiters(client: shmarena.Client) -> list[int]:
    return [w["size"] for w in client.stats()["alloc_waiters"]]


def test_a_waiter_that_meets_a_quota_gets_quota_exceeded_and_the_next_is_served(
    make_daemon: Callable[..., Daemon], children: list[subprocess.Popen[str]]
) -> None:
    daemon = make_daemon("8M")
    client = daemon.client(cache=False)
    hogs = [client.alloc(2 * MiB) for _ in range(4)]  # the arena is full
    first = start_waiter(daemon, children, 4 * MiB, 20)
    wait_for(lambda: waiters(client) == [4 * MiB], what="the first waiter")
    second = start_waiter(daemon, children, 2 * MiB, 60)
    wait_for(lambda: waiters(client) == [4 * MiB, 2 * MiB], what="the second waiter")
    client.set_quota("", 3 * MiB)  # the first now asks more than a session may hold
    hogs.pop().free()
    hogs.pop().free()
    got = answer(first)
    assert got.startswith("QuotaExceeded") and "--quota-per-session" in got, got
    assert answer(second) == f"got {2 * MiB}"  # not held back by the first
    stats = client.stats()
    assert stats["alloc_waiters"] == [] and stats["waiting_requests"] == 0
    assert client.check() == []
    for hog in hogs:
        hog.free()


def test_an_alloc_the_arena_can_never_hold_is_refused_at_once_and_holds_nobody_back(
    make_daemon: Callable[..., Daemon], children: list[subprocess.Popen[str]]
) -> None:
    daemon = make_daemon("8M")
    client = daemon.client(cache=False)
    with pytest.raises(shmarena.OutOfMemory) as caught:
        client.alloc(16 * MiB, timeout=60)
    message = str(caught.value)
    assert "can never hold" in message and "--size" in message and "16 MiB" in message
    hogs = [client.alloc(2 * MiB) for _ in range(4)]  # the arena is full
    first = start_waiter(daemon, children, 9 * MiB, 60)
    assert "can never hold" in answer(first)
    second = start_waiter(daemon, children, 2 * MiB, 60)
    wait_for(lambda: waiters(client) == [2 * MiB], what="the possible waiter")
    hogs.pop().free()
    assert answer(second) == f"got {2 * MiB}"
    assert client.stats()["alloc_waiters"] == [] and client.check() == []
    for hog in hogs:
        hog.free()


class RawPeer:
    """A bare DEALER speaking the wire protocol: it can keep many requests
    at once, as no client call does."""

    def __init__(self, daemon: Daemon) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(f"ipc://{daemon.socket_path}")
        self.rid = 0

    def send(self, op: Op, *args: object) -> int:
        self.rid += 1
        self.socket.send(msgpack.packb([int(op), self.rid, *args]))
        return self.rid

    def reply(self, timeout_ms: int = 10_000) -> list | None:
        if not self.socket.poll(timeout_ms):
            return None
        return msgpack.unpackb(self.socket.recv(), raw=False, strict_map_key=False)

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


def test_one_session_keeps_a_bounded_number_of_requests(daemon: Daemon) -> None:
    client = daemon.client(cache=False)
    raw = RawPeer(daemon)
    try:
        raw.socket.send(
            msgpack.packb([int(Op.HELLO), 0, PROTOCOL_VERSION, 4242, 1, "many lookups"])
        )
        hello = raw.reply()
        assert hello is not None and hello[0] == 0, hello
        ids = {f"n{i}": raw.send(Op.LOOKUP, f"n{i}", 60.0) for i in range(MAX_KEPT_PER_SESSION)}
        refused = raw.send(Op.LOOKUP, "one-more", 60.0)
        reply = raw.reply()
        assert reply is not None and reply[1] == refused, reply
        assert reply[2] == "limit_reached" and str(MAX_KEPT_PER_SESSION) in reply[3]
        assert reply[4] == {"limit": "kept_requests_per_session", "value": MAX_KEPT_PER_SESSION}
        stats = client.stats()
        assert stats["waiting_requests"] == MAX_KEPT_PER_SESSION
        assert stats["limits"]["kept_requests_per_session"] == MAX_KEPT_PER_SESSION
        # a publish meets exactly the lookup of its name; the others stay kept
        buf = client.alloc(4096)
        client.publish("n7", buf)
        met = raw.reply()
        assert met is not None and met[:2] == [0, ids["n7"]], met
        assert client.stats()["waiting_requests"] == MAX_KEPT_PER_SESSION - 1
        assert raw.reply(timeout_ms=200) is None  # nothing else was answered
        assert daemon.cli("check").returncode == 0
    finally:
        raw.close()
