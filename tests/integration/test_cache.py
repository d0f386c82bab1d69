"""The per-process cache against a real daemon: hits send nothing, the
daemon's accounting is exact after any synchronous call and catches up by
itself, and a killed process's cache comes back."""

from __future__ import annotations

import random
import signal
import subprocess

import pytest

import shmarena
from shmarena.client.cache import size_class
from tests.conftest import Daemon, wait_for


def round_trips(client: shmarena.Client) -> int:
    """Requests the daemon has answered (this stats call included); one-way
    posts of bookkeeping are not round trips."""
    counters = client.stats()["counters"]
    return int(counters["requests"] - counters["posts"])


def carved(client: shmarena.Client, buf: shmarena.Buffer) -> int:
    """What a buffer holds in the arena: its cache class, or pages; a kept
    large block reused for a smaller size (client/large.py) is at most 1/8
    over the pages, as this process's cache recorded it."""
    unit = int(client.info["min_block_bytes"])
    size = buf.size
    if size <= client.cache_max_bytes:
        return size_class(size, unit)
    pages = -(-size // unit) * unit
    cache = client._cache
    entry = cache.out.get(buf._address) if cache is not None else None
    if entry is None or entry[0] != buf._gen:
        return pages
    assert pages <= entry[3] <= pages + pages // 8
    return int(entry[3])


def test_cache_hits_send_nothing(client: shmarena.Client) -> None:
    for size in (100, 4096, 65536, 70000):
        client.alloc(size).free()  # the first of each class fills it
    client.sync()
    before = round_trips(client)
    for _ in range(2000):
        for size in (100, 4096, 65536, 70000):
            client.alloc(size).free()
    client.sync()
    # The stats call and the sync; 8000 hand-outs and frees cost no message.
    assert round_trips(client) - before == 2


def test_alloc_many_is_one_round_trip_at_most(client: shmarena.Client) -> None:
    sizes = [random.Random(1).choice([512, 4096, 30000, 65536, 300000, 3 << 20]) for _ in range(64)]
    client.sync()
    before = round_trips(client)
    buffers = client.alloc_many(sizes)
    assert [b.size for b in buffers] == sizes
    assert round_trips(client) - before == 2  # one FILL (misses and large sizes together) + stats
    before = round_trips(client)
    again = client.alloc_many([s for s in sizes if s <= client.cache_max_bytes][:8])
    assert round_trips(client) - before <= 2
    client.free(buffers + again)


def test_accounting_is_exact_after_sync(daemon: Daemon, client: shmarena.Client) -> None:
    rng = random.Random(7)
    batch = client.owner("batch")
    live: dict[int, tuple[shmarena.Buffer, str]] = {}
    implicit = f"session-{client.session}"
    for step in range(3000):
        if live and (len(live) > 40 or rng.random() < 0.45):
            key = rng.choice(list(live))
            buf, _ = live.pop(key)
            if rng.random() < 0.1:
                buf.handle  # noqa: B018 - a handle that left: freed through the daemon
            buf.free()
        else:
            size = int(2 ** rng.uniform(6, 21))
            owner = batch if rng.random() < 0.3 else client
            buf = owner.alloc(size)
            live[id(buf)] = (buf, "batch" if owner is batch else implicit)
        if step % 500 == 499:
            client.sync()
            stats = client.stats()
            assert stats["requested_bytes"] == sum(b.size for b, _ in live.values())
            assert stats["used_bytes"] == sum(carved(client, b) for b, _ in live.values())
            assert (
                stats["used_bytes"] + stats["cached_bytes"] + stats["free_bytes"]
                == (stats["size_bytes"])
            )
            rows = {r["name"]: r for r in client.list_owners()}
            for name in ("batch", implicit):
                mine = [b for b, o in live.values() if o == name]
                assert rows.get(name, {"blocks": 0})["blocks"] == len(mine)
    assert client.check() == []


def test_bookkeeping_reaches_the_daemon_without_a_call(daemon: Daemon) -> None:
    worker, watcher = daemon.client(), daemon.client()
    worker.alloc(4096).free()  # fills the class
    worker.sync()
    held = [worker.alloc(4096) for _ in range(10)]  # hits: nothing sent yet
    # The worker makes no further call; its flusher reports within milliseconds.
    wait_for(
        lambda: watcher.stats()["used_bytes"] == 10 * 4096,
        timeout_s=5,
        what="the worker's hand-outs to show in stats",
    )
    worker.free(held)
    wait_for(lambda: watcher.stats()["used_bytes"] == 0, timeout_s=5, what="the frees to show")


def test_a_consumers_free_returns_the_block_to_the_producers_cache(daemon: Daemon) -> None:
    producer, consumer = daemon.client(), daemon.client()
    buf = producer.alloc(65536)
    buf.view[:5] = b"hello"
    seen = consumer.attach(buf.handle)
    assert bytes(seen.view[:5]) == b"hello"
    consumer.free(buf.handle)  # the consumer frees what the producer made
    consumer.sync()
    stats = consumer.stats()
    assert stats["used_bytes"] == 0
    assert stats["cached_bytes"] == producer.stats()["cached_bytes"] > 0
    producer.sync()  # the producer learns its block is back ...
    assert producer.alloc(65536).offset == buf.offset  # ... and hands it out again
    with pytest.raises(shmarena.StaleHandle, match="double free"):
        buf.free()  # the producer's own Buffer is stale now


KILLED = r"""
import shmarena, sys
client = shmarena.connect()
keep = [client.alloc(s) for s in (100, 5000, 65536, 1 << 20, 3 << 20)]
for _ in range(50):
    client.alloc(4096).free()
client.sync()
print("holding", flush=True)
sys.stdin.read()
"""


def test_a_killed_process_cache_comes_back(daemon: Daemon, client: shmarena.Client) -> None:
    proc = daemon.python(KILLED, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout and proc.stdout.readline().strip() == "holding"
    stats = client.stats()
    assert stats["cached_bytes"] > 0 and stats["used_bytes"] > 0
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    wait_for(
        lambda: client.stats()["free_bytes"] == client.stats()["size_bytes"],
        what="the killed process's buffers and cache to return",
    )
    assert proc.stdin is not None
    proc.stdin.close()
    assert client.check() == []


def test_without_the_cache_every_alloc_asks_the_daemon(daemon: Daemon) -> None:
    client = daemon.client(cache=False)
    assert client.cache_max_bytes == 0
    client.sync()
    before = round_trips(client)
    for _ in range(5):
        client.alloc(4096).free()
    client.sync()
    assert round_trips(client) - before >= 5 + 1
    assert client.stats()["cached_bytes"] == 0


def test_populate_maps_the_arena_up_front(daemon: Daemon) -> None:
    client = daemon.client(populate=True)
    buf = client.alloc(1 << 20)
    buf.view[-3:] = b"end"
    assert bytes(client.attach(buf.handle).view[-3:]) == b"end"
    buf.free()


def test_recycling_an_own_owner_refills_the_cache(client: shmarena.Client) -> None:
    client.alloc(65536).free()  # the class is filled: 2, then 4 and 8 blocks (refills ramp up)
    with client.owner("frame-batch") as batch:
        first = {batch.alloc(65536).offset for _ in range(12)}
    # Leaving the block recycled the owner; its blocks came back to this
    # process's cache with the reply, so the next 12 need no refill (only 2
    # would be left otherwise).
    fills = client.stats()["counters"]["fills"]
    before = round_trips(client)
    with client.owner("frame-batch") as batch:
        second = {batch.alloc(65536).offset for _ in range(12)}
    assert len(second & first) >= 8
    # one OWNER and one RECYCLE round trip, and this stats call: no FILL
    assert round_trips(client) - before == 3
    assert client.stats()["counters"]["fills"] == fills


def test_a_cache_never_holds_more_than_its_cap(make_daemon) -> None:
    """Many size classes in use at once: the cache gives the coldest back so
    what it holds free stays within 1/16 of the arena."""
    daemon = make_daemon(size="256M")
    client = daemon.client()
    cap = (256 << 20) // 16
    sizes = sorted({size_class(s, 4096) for s in range(4096, 1 << 20, 20_000)})
    assert len(sizes) > 20  # each refill carves up to 2 MiB: far more than the cap
    for _ in range(3):
        bufs = [client.alloc(size) for size in sizes]
        for buf in bufs:
            buf.free()
        client.sync()
        (row,) = client.list_clients()
        assert row["cached_bytes"] <= cap, (row["cached_bytes"], cap)
    stats = client.stats()
    assert stats["used_bytes"] == 0 and client.check() == []
