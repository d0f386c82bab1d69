"""Quotas and backpressure against a real daemon and real processes: an
allocation over an owner's or a session's quota is refused with a message
naming the quota, on the cached and the uncached path alike; one under it is
unaffected; `alloc(size, timeout=...)` waits in the daemon, first come first
served, and returns the moment another process frees enough."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable

import pytest

import shmarena
from tests.conftest import Daemon, wait_for

KiB, MiB = 1 << 10, 1 << 20


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
def test_an_owner_quota_refuses_what_goes_over_it_only(daemon: Daemon, cache: bool) -> None:
    client = daemon.client(cache=cache)
    capped = client.owner("capped", quota=256 * KiB)
    assert capped.quota == 256 * KiB
    kept = [capped.alloc(64 * KiB) for _ in range(4)]  # exactly the quota
    with pytest.raises(shmarena.QuotaExceeded) as caught:
        capped.alloc(4 * KiB)
    message = str(caught.value)
    assert "'capped'" in message and "256 KiB" in message and "shmarena quota" in message
    assert isinstance(caught.value, MemoryError)
    free_owner = client.owner("free")
    others = [free_owner.alloc(64 * KiB) for _ in range(8)]  # no quota: unaffected
    others += [client.alloc(64 * KiB) for _ in range(8)]
    with pytest.raises(shmarena.QuotaExceeded):
        capped.alloc_many([4 * KiB, 4 * KiB])
    kept.pop().free()
    kept.append(capped.alloc(64 * KiB))  # room again under the quota
    row = next(r for r in client.list_owners() if r["name"] == "capped")
    assert row["bytes"] == 256 * KiB and row["quota"] == 256 * KiB
    for buf in kept + others:
        buf.free()
    assert client.check() == []


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
def test_a_session_quota_counts_what_the_session_holds(
    make_daemon: Callable[..., Daemon], cache: bool
) -> None:
    daemon = make_daemon("64M", extra=["--quota-per-session", "1M"])
    client = daemon.client(cache=cache)
    held = [client.alloc(64 * KiB) for _ in range(12)]  # 768 KiB, under the quota
    with pytest.raises(shmarena.QuotaExceeded) as caught:
        for _ in range(8):
            held.append(client.alloc(64 * KiB))
    message = str(caught.value)
    assert "1 MiB" in message and "--quota-per-session" in message
    stats = client.stats()
    assert stats["quota_per_session_bytes"] == MiB
    mine = next(r for r in client.list_clients() if r["session"] == client.session)
    assert mine["bytes"] + mine.get("cached_bytes", 0) <= MiB  # it never got over
    other = daemon.client(cache=cache)  # another session has a quota of its own
    theirs = [other.alloc(64 * KiB) for _ in range(12)]
    with pytest.raises(shmarena.QuotaExceeded, match="detached owners it created count"):
        client.owner("shared", detached=True).alloc(4 * MiB)  # no way around the quota
    for buf in held + theirs:
        buf.free()
    assert client.check() == []


def test_quotas_are_set_and_shown_from_the_command_line(daemon: Daemon) -> None:
    client = daemon.client()
    client.owner("jobs", detached=True)
    daemon.cli("quota", "jobs", "2M", check=True)
    daemon.cli("quota", "--per-session", "8M", check=True)
    shown = json.loads(daemon.cli("quota", "--json", check=True).stdout)
    assert shown["per_session_bytes"] == 8 * MiB
    assert shown["owners"] == [{"name": "jobs", "scope": "detached", "bytes": 0, "quota": 2 * MiB}]
    jobs = client.owner("jobs", detached=True)  # opened again: it learns the quota
    assert jobs.quota == 2 * MiB
    with pytest.raises(shmarena.QuotaExceeded, match="'jobs'"):
        jobs.alloc(3 * MiB)
    table = daemon.cli("quota", check=True).stdout
    assert "per-session quota: 8 MiB" in table and "jobs" in table
    daemon.cli("quota", "jobs", "none", check=True)
    jobs.alloc(3 * MiB).free()  # the daemon has no quota for it any more
    refused = daemon.cli("quota", "nobody", "1M")
    assert refused.returncode == 1 and "nobody" in refused.stderr + refused.stdout
    bad = daemon.cli("quota", "jobs", "lots")
    assert bad.returncode == 2 and "64M" in bad.stderr
    client.recycle("jobs")


# A process that allocates `size` with a timeout, says "waiting" first, and
# prints what happened: "got" or the error's class and message.
WAITER = """
import sys, time, shmarena
c = shmarena.connect(cache=False)
c.ping()
print("waiting", flush=True)
try:
    buf = c.alloc(int(sys.argv[1]), timeout=float(sys.argv[2]))
    print("got", buf.size, flush=True)
except shmarena.OutOfMemory as error:
    print(type(error).__name__, error, flush=True)
sys.stdin.read()
"""


def start_waiter(daemon: Daemon, size: int, timeout: float) -> subprocess.Popen[str]:
    child = daemon.python(
        WAITER, str(size), str(timeout), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "waiting"
    return child


def waiters(client: shmarena.Client) -> list[int]:
    return [w["size"] for w in client.stats()["alloc_waiters"]]


def test_waiting_allocations_are_met_in_order_as_soon_as_room_is_freed(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon("8M")
    client = daemon.client(cache=False)
    hogs = [client.alloc(2 * MiB) for _ in range(4)]  # the arena is full
    children = []
    try:
        children.append(start_waiter(daemon, 4 * MiB, 60))  # first: needs two frees
        wait_for(lambda: waiters(client) == [4 * MiB], what="the first waiter")
        children.append(start_waiter(daemon, 2 * MiB, 60))  # second: one would do
        wait_for(lambda: waiters(client) == [4 * MiB, 2 * MiB], what="the second waiter")
        hogs.pop().free()  # room for the second only: it waits behind the first
        client.sync()
        assert waiters(client) == [4 * MiB, 2 * MiB]
        hogs.pop().free()
        first, second = children
        assert first.stdout is not None and second.stdout is not None
        assert first.stdout.readline().split() == ["got", str(4 * MiB)]
        assert waiters(client) == [2 * MiB]  # the second still waits: no room left
        hogs.pop().free()
        assert second.stdout.readline().split() == ["got", str(2 * MiB)]
        stats = client.stats()
        assert stats["alloc_waiters"] == [] and stats["counters"]["alloc_waits"] == 2
    finally:
        for child in children:
            child.kill()
            child.wait(timeout=10)
            for stream in (child.stdin, child.stdout):
                if stream is not None:
                    stream.close()
    for hog in hogs:
        hog.free()
    wait_for(lambda: client.stats()["used_bytes"] == 0, what="the waiters' blocks to go back")


def test_a_waiter_that_times_out_gets_out_of_memory_and_a_dead_one_leaves(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon("8M")
    client = daemon.client(cache=False)
    hog = client.alloc(8 * MiB)
    started = time.monotonic()
    with pytest.raises(shmarena.OutOfMemory) as caught:
        client.alloc(MiB, timeout=0.5)
    elapsed = time.monotonic() - started
    assert not isinstance(caught.value, shmarena.QuotaExceeded)
    assert "waited" in str(caught.value) and caught.value.details["waited_s"] >= 0.5
    print(f"\nFIGURE: alloc(timeout=0.5) on a full arena raised OutOfMemory after {elapsed:.3f} s")
    doomed = start_waiter(daemon, MiB, 60)
    wait_for(lambda: waiters(client) == [MiB], what="the doomed waiter")
    doomed.kill()
    doomed.wait(timeout=10)
    for stream in (doomed.stdin, doomed.stdout):
        if stream is not None:
            stream.close()
    wait_for(lambda: waiters(client) == [], what="the dead waiter to leave the queue")
    hog.free()
    assert client.alloc(MiB, timeout=5).size == MiB  # room: no wait at all
    assert client.stats()["counters"]["alloc_wait_timeouts"] == 1
