"""Large blocks (above the size classes) stay with the process that freed
them, within a budget and an idle decay (client/large.py), against a real
daemon: a steady loop sends nothing, idle blocks go back by themselves, and
a killed process's kept blocks come back like everything else."""

from __future__ import annotations

import signal
import subprocess

import pytest

import shmarena
from shmarena.client.large import large_budget
from shmarena.testing import wait_until
from tests.conftest import Daemon

MIB = 1 << 20


def round_trips(client: shmarena.Client) -> int:
    """Requests the daemon has answered (this stats call included)."""
    counters = client.stats()["counters"]
    return int(counters["requests"] - counters["posts"])


def cached(client: shmarena.Client, session: int) -> int:
    """Bytes the daemon counts in `session`'s cache."""
    (row,) = [r for r in client.list_clients() if r["session"] == session]
    return int(row["cached_bytes"])


def keeping(client: shmarena.Client) -> shmarena.Client:
    """`client`, its kept large blocks decaying only after a minute (so a
    slow machine does not give them back in the middle of a test)."""
    assert client._cache is not None
    client._cache.decay_s = 60.0
    return client


def test_a_16_mib_loop_makes_no_request_after_warm_up(make_daemon) -> None:
    daemon = make_daemon(size="256M")
    client = keeping(daemon.client())
    client.alloc(16 * MIB).free()  # carved once, for this session's cache
    client.sync()
    before = round_trips(client)
    for i in range(300):
        buf = client.alloc(16 * MIB - 4096 * (i % 3))  # reuse within the slack
        buf.view[-1] = i % 256
        buf.free()
    client.sync()
    assert round_trips(client) - before == 2  # the sync and this stats call
    stats = client.stats()
    assert stats["used_bytes"] == 0 and stats["cached_bytes"] == 16 * MIB
    assert client.check() == []


def test_idle_large_blocks_go_back_by_themselves(daemon: Daemon) -> None:
    worker, watcher = keeping(daemon.client()), daemon.client()
    worker.alloc(3 * MIB).free()
    worker.sync()
    assert cached(watcher, worker.session) == 3 * MIB
    cache = worker._cache
    assert cache is not None
    cache.decay_s = 0.5  # from now on (however slow the machine was so far)
    cache.wake()  # the flusher waits for the old deadline otherwise
    # The worker makes no further call; its flusher gives the block back.
    wait_until(
        lambda: cached(watcher, worker.session) == 0,
        timeout_s=20,
        what="the idle large block to decay back to the arena",
    )
    assert watcher.stats()["free_bytes"] == watcher.stats()["size_bytes"]


def test_the_budget_bounds_what_is_kept(daemon: Daemon) -> None:
    client = keeping(daemon.client())
    budget = large_budget(64 * MIB)
    assert client.cache_max_bytes < 2 * MIB <= budget
    bufs = [client.alloc(size) for size in (2 * MIB, 2 * MIB + 8192, 3 * MIB, 5 * MIB // 2)]
    for buf in bufs:
        buf.free()
    client.sync()
    assert 0 < cached(client, client.session) <= budget
    assert client.stats()["used_bytes"] == 0 and client.check() == []


def test_drain_all_gives_large_blocks_back(daemon: Daemon) -> None:
    client = keeping(daemon.client())
    client.alloc(2 * MIB).free()
    client.alloc(3 * MIB // 2).free()  # both within the budget (4 MiB here)
    client.sync()
    assert cached(client, client.session) == 7 * MIB // 2
    cache = client._cache
    assert cache is not None
    assert cache.drain_all() == 7 * MIB // 2
    client.sync()
    assert cached(client, client.session) == 0
    assert client.stats()["free_bytes"] == client.stats()["size_bytes"]


def test_a_stale_handle_to_a_reused_large_block_is_refused(daemon: Daemon) -> None:
    producer, consumer = keeping(daemon.client()), daemon.client()
    first = producer.alloc(2 * MIB)
    first.view[:4] = b"old!"
    old = first.handle  # it left the process: its free goes through the daemon
    first.free()
    with pytest.raises(shmarena.StaleHandle):
        consumer.attach(old)
    producer.sync()  # the block is back in the producer's cache ...
    again = producer.alloc(2 * MIB)
    assert again.offset == first.offset  # ... and handed out again
    again.view[:4] = b"new!"
    new = again.handle
    with pytest.raises(shmarena.StaleHandle):
        consumer.attach(old)
    assert bytes(consumer.attach(new).view[:4]) == b"new!"
    again.free()


KEEPER = r"""
import shmarena, sys
client = shmarena.connect()
client._cache.decay_s = 60.0  # kept until killed, however slow the machine
for size in (2 << 20, 3 << 19):
    client.alloc(size).free()  # kept, decaying
held = client.alloc(3 << 20 | 4096)
client.alloc(100).free()
client.sync()
print("holding", flush=True)
sys.stdin.read()
"""


def test_a_killed_process_decaying_blocks_come_back(daemon: Daemon) -> None:
    client = daemon.client()
    baseline = client.stats()
    proc = daemon.python(KEEPER, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout and proc.stdout.readline().strip() == "holding"
    stats = client.stats()
    assert stats["cached_bytes"] >= 7 * MIB // 2 and stats["used_bytes"] >= 3 * MIB
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    wait_until(
        lambda: client.stats()["free_bytes"] == baseline["free_bytes"],
        timeout_s=20,
        what="the killed process's blocks and kept large blocks to return",
    )
    stats = client.stats()
    assert stats["cached_bytes"] == baseline["cached_bytes"]
    assert stats["used_bytes"] == baseline["used_bytes"]
    assert proc.stdin is not None
    proc.stdin.close()
    assert client.check() == []
