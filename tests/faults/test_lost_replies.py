"""Replies lost or late: the client sends the request again with the same id
and the daemon answers the repeat from its reply cache, so nothing runs twice
and the accounting stays exact."""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable

import pytest

import shmarena
from tests.conftest import Daemon

DROP = ["--debug-drop-replies", "0.3", "--debug-delay-ms", "3", "--debug-seed", "7"]


def run_ops(client: shmarena.Client, ops: int, seed: int) -> dict[str, int]:
    """Random allocs (cached and direct), frees, owners and recycles; returns
    what the client did, counted on its side."""
    rng = random.Random(seed)
    live: list[shmarena.Buffer] = []
    owned: dict[str, list[shmarena.Buffer]] = {}
    done = {"allocs": 0, "frees": 0, "recycles": 0}
    for step in range(ops):
        roll = rng.random()
        if len(live) > 40:  # keep the live set bounded: free instead
            roll = 0.6
        if roll < 0.45 or not live:
            size = rng.choice([100, 4096, 70_000, 1 << 20, (2 << 20) + 1])
            name = rng.choice([None, None, "a", "b"])
            if name is None:
                buf = client.alloc(size)
                live.append(buf)
            else:
                buf = client.owner(name).alloc(size)
                owned.setdefault(name, []).append(buf)
            buf.view[:8] = step.to_bytes(8, "little")
            done["allocs"] += 1
        elif roll < 0.55:
            bufs = client.alloc_many([rng.choice([4096, 3 << 20]) for _ in range(3)])
            live += bufs
            done["allocs"] += 3
        elif roll < 0.9:
            buf = live.pop(rng.randrange(len(live)))
            buf.free()
            done["frees"] += 1
        elif roll < 0.95 and owned:
            name = rng.choice(sorted(owned))
            count, _ = client.recycle(name)
            assert count == len(owned.pop(name))
            done["recycles"] += 1
        else:
            client.sync()
    client.sync()
    stats = client.stats()
    sizes = [b.size for b in live] + [b.size for bufs in owned.values() for b in bufs]
    assert stats["requested_bytes"] == sum(sizes)
    assert stats["live_blocks"] == len(sizes)
    assert client.check() == []
    for buf in live:
        buf.free()
    for name in owned:
        client.recycle(name)
        done["recycles"] += 1
    client.sync()
    stats = client.stats()
    assert stats["used_bytes"] == 0 and stats["requested_bytes"] == 0
    return done


@pytest.mark.parametrize("cache", [False, True], ids=["direct", "cached"])
def test_dropped_replies_are_retried_never_run_twice(
    make_daemon: Callable[..., Daemon], cache: bool, ops: int = 1500
) -> None:
    daemon = make_daemon(size="256M", extra=DROP)
    client = daemon.client(cache=cache, retry_s=0.005, timeout_s=10.0)
    done = run_ops(client, ops, seed=11)
    transport = client._transport
    assert transport is not None
    counters = client.stats()["counters"]
    if not cache:  # every alloc is one daemon allocation: none ran twice
        assert counters["allocs"] == done["allocs"]
    assert counters["recycles"] == done["recycles"]
    assert transport.resent > ops * 0.05  # the drops did happen and were retried
    print(
        f"\nFIGURE: {ops} operations ({'cached' if cache else 'direct'}) at a 30% reply "
        f"drop rate: {transport.resent} requests sent again, daemon allocations "
        f"{counters['allocs']} for {done['allocs']} allocs asked, requests seen "
        f"{counters['requests']}; used bytes back to 0, check clean"
    )


@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True], ids=["direct", "cached"])
def test_ten_thousand_operations_at_thirty_percent_drop(
    make_daemon: Callable[..., Daemon], cache: bool
) -> None:
    test_dropped_replies_are_retried_never_run_twice(make_daemon, cache, ops=10_000)


def test_answers_that_come_after_the_caller_gave_up_are_given_back(daemon: Daemon) -> None:
    """A daemon that is only slow (here: stopped) answers after the client's
    timeout; the blocks in those answers go back, they do not leak."""
    client = daemon.client(timeout_s=1.0, retry_s=0.1)
    assert daemon.proc is not None
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(shmarena.DaemonUnavailable):
            client.alloc(8 << 20)  # straight from the daemon (above the large-block budget)
        with pytest.raises(shmarena.DaemonUnavailable):
            client.alloc(4096)  # a cache refill
        with pytest.raises(shmarena.DaemonUnavailable):
            client.alloc_many([3 << 20, 8192])
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    client.sync()  # the late answers come in before this one ...
    client.sync()  # ... and the frees they caused have been applied after this one
    stats = client.stats()
    assert stats["used_bytes"] == 0 and stats["requested_bytes"] == 0
    assert stats["counters"]["allocs"] >= 2  # they did run, once each
    buf = client.alloc(4096)  # the refill's blocks are the cache's again
    assert client.stats()["counters"]["fills"] == stats["counters"]["fills"]
    buf.free()
    assert client.check() == []
