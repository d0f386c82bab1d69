"""Sessions across a daemon crash on a persistent arena (`--backing`): a client
process that outlives a SIGKILL of the daemon resumes its session on the
restarted daemon by itself, within the grace period, and keeps every block (its
session owner's, its implicit owner's, the free blocks in its cache); a client
that does not come back in time (SIGSTOPped) loses its blocks to the grace
timer and is told so with SessionLost; a client that died while the daemon was
down is reclaimed as the daemon starts.

Everything is real: daemons started by the conftest fixtures on a backing file
in the test's temp dir, client processes driven line by line over pipes, and an
observer client in this process that reads `stats`, `clients` and `owners`.

Figures (FIGURE lines): resume latency (from the restarted daemon answering to
its counters showing the session resumed), the longest stall of a busy client
across the restart, and how long after the restart an absent client's session
is reclaimed (the grace period plus up to one expiry tick).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import shmarena
from tests.conftest import Daemon, wait_for

GRACE_S = 3.0
SIZE = "32M"

# A client process. It reads one command per line on stdin and answers each
# with one JSON line on stdout. It keeps every buffer it holds in `held`, each
# stamped with a pattern of its own, and can say exactly what it holds:
# requested bytes (the sizes), and used bytes (each size rounded to its cache
# class when it came from the cache, else to the minimum block).
CLIENT = r"""
import json, random, sys, threading, time
import shmarena
from shmarena.client.cache import size_class

client = shmarena.connect(timeout_s=60.0, retry_s=0.2)
MIN = int(client.info["min_block_bytes"])
held = {}          # key -> [buffer, owner name, came from the cache]
counter = [0]
loop = {"count": 0, "errors": [], "stall_s": 0.0, "stop": threading.Event(), "thread": None}


def say(**fields):
    print(json.dumps(fields), flush=True)


def pattern(key, size):
    unit = key.to_bytes(8, "little") + size.to_bytes(8, "little")
    return (unit * (size // 16 + 1))[:size]


def keep(buf, owner, detached=False):
    counter[0] += 1
    key = counter[0]
    cached = buf.size <= client.cache_max_bytes and not detached
    buf.view[:] = pattern(key, buf.size)
    held[key] = [buf, owner, cached]
    return key


def carved(size, cached):
    return size_class(size, MIN) if cached else -(-size // MIN) * MIN


def holdings():
    by_owner = {}
    for buf, owner, cached in held.values():
        row = by_owner.setdefault(owner, [0, 0, 0])
        row[0] += 1
        row[1] += carved(buf.size, cached)
        row[2] += buf.size
    return {
        "session": client.session,
        "used": sum(r[1] for r in by_owner.values()),
        "requested": sum(r[2] for r in by_owner.values()),
        "owners": by_owner,
    }


def bad_patterns():
    return [k for k, (buf, _, _) in held.items() if bytes(buf.view) != pattern(k, buf.size)]


def release(key):
    buf = held.pop(key)[0]
    assert bytes(buf.view) == pattern(key, buf.size), f"block {key} changed"
    buf.free()


def setup(detached):
    implicit = f"session-{client.session}"
    x = client.owner("x")
    for size in (3000, 200_000, 700_000):           # cached, cached, direct
        keep(x.alloc(size), "x")
    for buf in x.alloc_many([5000, 600_000]):
        keep(buf, "x")
    for size in (10_000, 1_000_000, 4096):
        keep(client.alloc(size), implicit)
    for buf in client.alloc_many([70_000, 900_000]):
        keep(buf, implicit)
    if detached:
        d = client.owner(detached, detached=True)
        for size in (50_000, 800_000):
            keep(d.alloc(size), detached, detached=True)
    client.sync()


def more():
    implicit = f"session-{client.session}"
    x = client.owner("x")
    keep(client.alloc(20_000), implicit)
    keep(client.alloc(3 * 4096), implicit)
    keep(x.alloc(900_000), "x")
    keep(x.alloc(150_000), "x")
    for buf in client.alloc_many([100, 700_000]):
        keep(buf, implicit)
    # Free some from before the restart: one cached and one direct of each owner.
    for owner in ("x", implicit):
        for want_cached in (True, False):
            key = min(k for k, (_, o, c) in held.items() if o == owner and c == want_cached)
            release(key)
    client.sync()


def churn():
    # Allocate, stamp, verify and free without pause; a round trip every few
    # steps. Any exception is a failure: across a daemon restart the calls
    # must only take longer.
    rng = random.Random(5)
    implicit = f"session-{client.session}"
    x = client.owner("x")
    mine = []
    while not loop["stop"].is_set():
        began = time.monotonic()
        try:
            roll = rng.random()
            size = rng.choice((100, 4096, 30_000, 300_000, 600_000, 1_500_000))
            if roll < 0.02:
                # Recycle the owner: its blocks go back (the cached ones to
                # this cache, by notice); forget them without a free.
                x.recycle()
                for key in [k for k, (_, o, _) in held.items() if o == "x"]:
                    del held[key]
                mine = [k for k in mine if k in held]
                x = client.owner("x")  # there again, empty
            elif roll < 0.5 or len(mine) < 4:
                if rng.random() < 0.5:
                    mine.append(keep(x.alloc(size), "x"))
                else:
                    mine.append(keep(client.alloc(size), implicit))
            else:
                release(mine.pop(rng.randrange(len(mine))))
            if len(mine) > 24:
                release(mine.pop(0))
            if loop["count"] % 8 == 0:
                client.sync()
        except Exception as error:
            loop["errors"].append(f"{type(error).__name__}: {error}")
            return
        loop["count"] += 1
        loop["stall_s"] = max(loop["stall_s"], time.monotonic() - began)


for line in sys.stdin:
    command, *args = line.split()
    try:
        if command == "setup":
            setup(args[0] if args else "")
            say(**holdings())
        elif command == "verify":
            say(bad=bad_patterns(), blocks=len(held), **holdings())
        elif command == "more":
            more()
            say(check=client.check(), bad=bad_patterns(), **holdings())
        elif command == "stats":
            try:
                stats = client.stats()
                say(ok=True, session=client.session, used=stats["used_bytes"])
            except shmarena.SessionLost as error:
                say(ok=False, lost=str(error), reason=error.details.get("reason"))
        elif command == "loop":
            loop["thread"] = threading.Thread(target=churn, daemon=True)
            loop["thread"].start()
            say(started=True)
        elif command == "count":
            say(count=loop["count"], errors=loop["errors"])
        elif command == "stop":
            loop["stop"].set()
            loop["thread"].join(timeout=60)
            client.sync()
            say(count=loop["count"], errors=loop["errors"], stall_s=loop["stall_s"],
                check=client.check(), bad=bad_patterns(), **holdings())
        elif command == "quit":
            client.close()
            say(bye=True)
            break
    except Exception as error:
        say(error=f"{type(error).__name__}: {error}")
"""


class Child:
    """A CLIENT process, one command at a time."""

    def __init__(self, daemon: Daemon) -> None:
        self.proc = daemon.python(
            CLIENT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.pid = self.proc.pid

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            pytest.fail(f"client exited ({self.proc.wait()}) on {command!r}:\n{err}")
        answer: dict[str, Any] = json.loads(line)
        assert "error" not in answer, f"client: {command}: {answer['error']}"
        return answer

    def quit(self) -> None:
        assert self.ask("quit") == {"bye": True}
        assert self.proc.wait(timeout=20) == 0, self.proc.stderr.read() if self.proc.stderr else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped one too
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@contextmanager
def child_of(daemon: Daemon) -> Iterator[Child]:
    child = Child(daemon)
    try:
        yield child
    finally:
        child.kill()


@contextmanager
def observer(daemon: Daemon) -> Iterator[shmarena.Client]:
    """A client of this process that only looks (no cache, holds nothing)."""
    client = shmarena.connect(daemon.name, runtime_dir=daemon.run_dir, cache=False)
    try:
        yield client
    finally:
        client.close()


def backing_args(path: Path) -> list[str]:
    return ["--backing", str(path), "--grace", f"{GRACE_S:g}"]


@dataclass
class Restart:
    daemon: Daemon
    killed_at: float  # time.monotonic() of the SIGKILL
    spawned_at: float  # ... of starting the new daemon process
    answered_at: float  # ... of its first answer

    def figures(self, done_at: float) -> str:
        return (
            f"{(done_at - self.answered_at) * 1000:.0f} ms after the restarted daemon answered, "
            f"{(done_at - self.spawned_at) * 1000:.0f} ms after it was started, "
            f"{(done_at - self.killed_at) * 1000:.0f} ms after the SIGKILL"
        )


def crash_and_restart(
    make_daemon: Callable[..., Daemon], first: Daemon, path: Path, between: Callable[[], None]
) -> Restart:
    """SIGKILL the daemon, run `between`, start it again on the same file and
    name, and say when each happened."""
    assert first.proc is not None
    killed_at = time.monotonic()
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=10)
    between()
    spawned_at = time.monotonic()
    second = make_daemon(size=SIZE, extra=backing_args(path), name=first.name)
    return Restart(second, killed_at, spawned_at, time.monotonic())


def client_row(obs: shmarena.Client, session: int) -> dict[str, Any] | None:
    rows = [r for r in obs.list_clients() if r["session"] == session]
    return rows[0] if rows else None


def owner_bytes(obs: shmarena.Client) -> dict[str, list[int]]:
    """Blocks and bytes per owner that holds any."""
    return {r["name"]: [r["blocks"], r["bytes"]] for r in obs.list_owners() if r["blocks"]}


def leftovers(obs: shmarena.Client) -> int:
    """Sessions of this test process recovered from before the restart. The
    fixture's start-up probe (and an observer) says bye with a short timeout;
    on a busy machine the bye may time out and leave an empty session behind
    (its socket closed), which a restart recovers and which can never resume:
    it waits out the grace like an absent client. Normally none."""
    started = obs.stats()["started_at"]
    return sum(
        r["pid"] == os.getpid() and r["session"] != obs.session and r["since"] < started
        for r in obs.list_clients()
    )


def wait_resumed(obs: shmarena.Client) -> tuple[float, int]:
    """Wait until the restarted daemon has the client's session back (the only
    one that can resume) and waits for no other but leftovers; when, and how
    many leftovers there are."""
    found = [0]

    def resumed() -> bool:
        stats = obs.stats()
        found[0] = leftovers(obs)
        return (
            stats["counters"]["sessions_resumed"] == 1 and stats["recovering_sessions"] == found[0]
        )

    wait_for(resumed, timeout_s=GRACE_S + 5, what="the recovered session to resume")
    return time.monotonic(), found[0]


# -- a client that stays -------------------------------------------------------------


def test_an_idle_client_resumes_its_session_and_keeps_every_block(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    path = tmp_path / "arena"
    first = make_daemon(size=SIZE, extra=backing_args(path))
    with child_of(first) as child:
        held = child.ask("setup")
        session = held["session"]
        with observer(first) as obs:  # closed before the crash: not a session to resume
            before = obs.stats()
            row_before = client_row(obs, session)
            owners_before = owner_bytes(obs)
        assert row_before is not None and row_before["cached_bytes"] > 0
        assert before["used_bytes"] == held["used"]
        assert before["requested_bytes"] == held["requested"]
        assert owners_before == {o: r[:2] for o, r in held["owners"].items()}

        restart = crash_and_restart(make_daemon, first, path, lambda: None)
        second = restart.daemon
        with observer(second) as obs:
            resumed_at, left = wait_resumed(obs)
            print(f"FIGURE: idle client resumed {restart.figures(resumed_at)}")

            # Past the grace period (and the expiry tick after it) the session
            # is still there, unchanged; the client has not sent anything.
            def past_grace_and_still_there() -> bool:
                row = client_row(obs, session)
                assert row is not None, "the resumed session was reclaimed"
                for key in ("pid", "owners", "blocks", "bytes", "cached_blocks", "cached_bytes"):
                    assert row[key] == row_before[key], key
                return bool(obs.stats()["uptime_s"] > GRACE_S + 2)

            wait_for(past_grace_and_still_there, timeout_s=GRACE_S + 10, interval_s=0.1)
            stats = obs.stats()
            assert stats["used_bytes"] == before["used_bytes"]
            assert stats["requested_bytes"] == before["requested_bytes"]
            assert stats["cached_bytes"] == before["cached_bytes"]
            assert stats["counters"]["sessions_reclaimed"] == left
            assert owner_bytes(obs) == owners_before

            # Now the client works on, in the same session, with its old blocks.
            verified = child.ask("verify")
            assert verified["bad"] == [] and verified["session"] == session
            after = child.ask("more")
            assert after["check"] == [] and after["bad"] == []
            assert after["session"] == session
            stats = obs.stats()
            assert stats["used_bytes"] == after["used"]
            assert stats["requested_bytes"] == after["requested"]
            assert owner_bytes(obs) == {o: r[:2] for o, r in after["owners"].items()}
            assert obs.check() == []
            assert client_row(obs, session) is not None
            assert [r["session"] for r in obs.list_clients() if r["pid"] == child.pid] == [session]
            child.quit()
            assert obs.stats()["used_bytes"] == 0
        log = second.stop()
    assert f"recovered session {session} resumed" in log, log


def run_busy_client(make_daemon: Callable[..., Daemon], path: Path, restarts: int) -> None:
    """A client allocating, freeing, recycling and syncing without pause while
    the daemon is SIGKILLed and restarted under it `restarts` times."""
    daemon = make_daemon(size=SIZE, extra=backing_args(path))
    with child_of(daemon) as child:
        session = child.ask("setup")["session"]
        child.ask("loop")

        def counted_past(n: int) -> Callable[[], bool]:
            def check() -> bool:
                answer = child.ask("count")
                assert answer["errors"] == [], answer["errors"]
                return bool(answer["count"] >= n)

            return check

        wait_for(counted_past(50), timeout_s=20, what="the client loop to run")
        down = []
        for cycle in range(restarts):
            restart = crash_and_restart(make_daemon, daemon, path, lambda: None)
            daemon = restart.daemon
            down.append(restart.answered_at - restart.killed_at)
            at_restart = child.ask("count")["count"]
            # Go on a while (a different while each time) before the next crash.
            steps = 60 + 37 * cycle % 90
            wait_for(counted_past(at_restart + steps), timeout_s=30, what="the loop to go on")
            with observer(daemon) as obs:
                wait_resumed(obs)
        done = child.ask("stop")
        assert done["errors"] == [], done["errors"]
        assert done["check"] == [] and done["bad"] == []
        assert done["session"] == session
        print(
            f"FIGURE: busy client, {restarts} restart(s): {done['count']} steps, longest step "
            f"{done['stall_s']:.2f} s; the daemon was down {max(down):.2f} s at most "
            "(SIGKILL to the new daemon's first answer)"
        )
        with observer(daemon) as obs:
            stats = obs.stats()
            assert stats["used_bytes"] == done["used"]
            assert stats["requested_bytes"] == done["requested"]
            assert owner_bytes(obs) == {o: r[:2] for o, r in done["owners"].items()}
            others = [r["session"] for r in obs.list_clients() if r["pid"] != os.getpid()]
            assert others == [session]
            assert obs.check() == []
            child.quit()
            assert obs.stats()["used_bytes"] == 0


def test_a_busy_client_sees_no_error_across_the_restart(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    run_busy_client(make_daemon, tmp_path / "arena", restarts=1)


@pytest.mark.slow
def test_a_busy_client_sees_no_error_across_many_restarts(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    run_busy_client(make_daemon, tmp_path / "arena", restarts=25)


# -- a client that does not come back in time ----------------------------------------------


def test_a_stopped_client_loses_its_session_after_the_grace(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    path = tmp_path / "arena"
    first = make_daemon(size=SIZE, extra=backing_args(path))
    with child_of(first) as child:
        held = child.ask("setup")
        session = held["session"]
        with observer(first) as obs:
            before = obs.stats()
            cached_before = client_row(obs, session)["cached_bytes"]  # type: ignore[index]
        assert before["used_bytes"] == held["used"] > 0 and cached_before > 0

        child.proc.send_signal(signal.SIGSTOP)
        restart = crash_and_restart(make_daemon, first, path, lambda: None)
        second = restart.daemon
        try:
            with observer(second) as obs:
                # Recovered, waiting for its client: the blocks are still held.
                left = leftovers(obs)
                assert client_row(obs, session) is not None
                assert obs.stats()["used_bytes"] == before["used_bytes"]
                wait_for(
                    lambda: client_row(obs, session) is None,
                    timeout_s=GRACE_S + 10,
                    what="the grace period to reclaim the absent session",
                )
                print(
                    f"FIGURE: absent client reclaimed {restart.figures(time.monotonic())} "
                    f"(grace {GRACE_S:g} s)"
                )
                stats = obs.stats()
                assert stats["used_bytes"] == before["used_bytes"] - held["used"]
                assert stats["cached_bytes"] == 0
                assert stats["recovering_sessions"] == 0
                assert stats["counters"]["sessions_resumed"] == 0
                assert stats["counters"]["sessions_reclaimed"] == 1 + left
                assert obs.check() == []
        finally:
            child.proc.send_signal(signal.SIGCONT)
        lost = child.ask("stats")
        print(f"SessionLost after SIGCONT: {lost.get('lost')}")
        assert lost["ok"] is False and lost["reason"] == "not_resumed"
        assert "grace" in lost["lost"]
        again = child.ask("stats")
        assert again["ok"] is True and again["session"] != session and again["used"] == 0
        child.quit()
        log = second.stop()
    assert f"client session {session} expired: reclaimed" in log, log
    assert f"recovered session {session} resumed" not in log, log


# -- a client that died while the daemon was down ------------------------------------------


def test_a_client_that_died_meanwhile_is_reclaimed_at_start(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    path = tmp_path / "arena"
    first = make_daemon(size=SIZE, extra=backing_args(path))
    detached = "kept-across-death"
    with child_of(first) as child:
        held = child.ask(f"setup {detached}")
        session = held["session"]
        kept = held["owners"][detached]
        with observer(first) as obs:
            assert obs.stats()["used_bytes"] == held["used"]

        def kill_client() -> None:
            child.proc.kill()
            child.proc.wait()

        second = crash_and_restart(make_daemon, first, path, kill_client).daemon
        with observer(second) as obs:

            def reclaimed() -> bool:
                return bool(obs.stats()["used_bytes"] == kept[1])

            wait_for(reclaimed, timeout_s=1.0, what="the dead client's blocks to be reclaimed")
            stats = obs.stats()
            assert stats["cached_bytes"] == 0
            assert stats["recovering_sessions"] == leftovers(obs)
            assert stats["counters"]["sessions_resumed"] == 0
            assert client_row(obs, session) is None
            assert owner_bytes(obs) == {detached: kept[:2]}
            (row,) = obs.list_owners()
            assert row["scope"] == "detached" and not row["alive"]
            assert obs.check() == []
            obs.recycle(detached)
        log = second.stop()
    assert f"recovered session {session} (pid {child.pid}) has exited: reclaimed" in log, log
    assert os.path.exists(path)  # the daemon never removes its backing file
