"""shmarena.Queue against a real daemon and real processes: large arrays
cross without a copy, consumers killed at any moment cost the others nothing
and leak nothing, threads of one process do not hold each other up. The port
of CPython's own Queue tests is tests/integration/test_queue_cpython.py."""

from __future__ import annotations

import multiprocessing
import queue as stdlib_queue
import random
import signal
import subprocess
import threading
from collections.abc import Callable

import numpy as np
import pytest

import shmarena
from tests.conftest import Daemon, wait_for

# A consumer: takes messages of (ident, array or None) until None, checks each
# array's contents and reports (ident, contents ok, data in the arena).
CONSUMER = """
import os, sys, shmarena
from shmarena.client import registry
jobs = shmarena.Queue(name=sys.argv[1])
results = shmarena.Queue(name=sys.argv[2])
results.put(("ready", os.getpid()))
while True:
    message = jobs.get()
    if message is None:
        break
    ident, data = message
    ok = data is None or bool((data == ident % 251).all())
    inside = data is None or any(
        s <= data.ctypes.data < e for s, e in registry.mapping_ranges()
    )
    results.put((ident, ok, inside))
    del data, message
"""


def settled(client: shmarena.Client, used: int) -> bool:
    stats = client.stats()
    return (
        stats["used_bytes"] == used
        and stats["retained_only_bytes"] == 0
        and stats["queued_bytes"] == 0
    )


def start_consumer(
    daemon: Daemon, jobs: str, results: shmarena.Queue, wait: bool = True
) -> subprocess.Popen[str]:
    child = daemon.python(CONSUMER, jobs, results.name)
    if wait:
        tag, _ = results.get(timeout=30)
        assert tag == "ready"
    return child


def test_a_large_array_crosses_without_a_copy(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon("512M")
    client = daemon.client()
    start = client.stats()["used_bytes"]
    jobs, results = shmarena.Queue(client=client), shmarena.Queue(client=client)
    consumer = start_consumer(daemon, jobs.name, results)
    array = np.full(4 << 20, 7, dtype=np.uint8)  # 4 MiB, not in the arena: one copy in
    jobs.put((7, array))
    assert results.get(timeout=30) == (7, True, True)
    buf = client.alloc(256 << 20)  # 256 MiB already in the arena: named, not copied
    resident = buf.ndarray(dtype=np.uint8)
    resident[:] = 8
    used = client.stats()["used_bytes"]
    jobs.put((8, resident))
    assert client.stats()["used_bytes"] == used  # no block was made for it
    assert results.get(timeout=30) == (8, True, True)
    jobs.put(None)
    assert consumer.wait(timeout=30) == 0
    buf.free()
    wait_for(lambda: settled(client, start), what="every block to go back")
    jobs.close()
    results.close()
    wait_for(lambda: client.stats()["queues"] == [], what="both queues to go")


def test_a_consumer_killed_holding_messages_costs_the_others_nothing(daemon: Daemon) -> None:
    client = daemon.client()
    start = client.stats()["used_bytes"]
    jobs = shmarena.Queue(client=client)
    for ident in range(6):
        jobs.put((ident, np.full(1 << 17, ident % 251, dtype=np.uint8)))
    holder = daemon.python(
        "import sys, shmarena\n"
        "q = shmarena.Queue(name=sys.argv[1])\n"
        "held = [q.get(timeout=30) for _ in range(3)]\n"
        "print('holding', flush=True)\n"
        "sys.stdin.read()\n",
        jobs.name,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
    assert client.stats()["retained_only_bytes"] >= 3 << 17  # the holder's three
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    assert holder.stdin is not None
    holder.stdin.close()
    holder.stdout.close()
    rest = [jobs.get(timeout=10) for _ in range(3)]
    assert [ident for ident, _ in rest] == [3, 4, 5]
    assert all(bool((data == ident).all()) for ident, data in rest)
    del rest
    wait_for(lambda: settled(client, start), what="the dead holder's blocks to go back")
    assert client.check() == []
    jobs.close()


def test_ten_thousand_messages_with_random_consumer_kills_leak_nothing(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon("128M")
    client = daemon.client()
    start = client.stats()["used_bytes"]
    total, kills = 10_000, 0
    jobs = shmarena.Queue(64, client=client)
    results = shmarena.Queue(client=client)
    consumers = [start_consumer(daemon, jobs.name, results) for _ in range(2)]
    rng = random.Random(7)

    def produce() -> None:
        for ident in range(total):
            data = np.full(1 << 16, ident % 251, dtype=np.uint8) if ident % 4 == 0 else None
            jobs.put((ident, data))

    producer = threading.Thread(target=produce)
    producer.start()
    seen: dict[int, tuple[bool, bool]] = {}
    try:
        while producer.is_alive() or jobs.qsize() > 0:
            try:
                message = results.get(timeout=30)
            except stdlib_queue.Empty:
                pytest.fail(f"no result for 30 s; {len(seen)} seen, qsize {jobs.qsize()}")
            if message[0] == "ready":
                continue
            ident, ok, inside = message
            assert ident not in seen, f"message {ident} arrived twice"
            seen[ident] = (ok, inside)
            if rng.random() < 0.002:  # about 20 kills over the run
                victim = consumers.pop(rng.randrange(len(consumers)))
                victim.send_signal(signal.SIGKILL)
                victim.wait(timeout=10)
                kills += 1
                consumers.append(start_consumer(daemon, jobs.name, results, wait=False))
        producer.join(timeout=60)
        for _ in consumers:
            jobs.put(None)
        for consumer in consumers:
            assert consumer.wait(timeout=30) == 0
        while True:  # what the last consumers reported before they left
            try:
                message = results.get_nowait()
            except stdlib_queue.Empty:
                break
            if message[0] != "ready":
                seen[message[0]] = message[1:]
    finally:
        for consumer in consumers:
            if consumer.poll() is None:
                consumer.kill()
                consumer.wait(timeout=10)
        producer.join(timeout=60)
    lost = total - len(seen)
    assert kills >= 5
    assert 0 <= lost <= kills  # a killed consumer takes at most the one it was working on
    assert all(ok for ok, _ in seen.values())
    assert all(inside for ok, inside in seen.values())
    wait_for(lambda: settled(client, start), what="no block to stay held after the soak")
    stats = client.stats()
    print(
        f"\nFIGURE: queue soak: {total} messages, {kills} consumer kills, {lost} lost with "
        f"them; used_bytes {start} before, {stats['used_bytes']} after, retained_only_bytes "
        f"{stats['retained_only_bytes']}, queued_bytes {stats['queued_bytes']}"
    )
    assert stats["used_bytes"] == start and stats["retained_only_bytes"] == 0
    assert client.check() == []
    jobs.close()
    results.close()


def test_a_thread_blocked_in_get_does_not_hold_up_a_put_from_another(daemon: Daemon) -> None:
    client = daemon.client()
    q = shmarena.Queue(client=client)
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(q.get(timeout=30)))
    reader.start()
    wait_for(lambda: client.stats()["waiting_requests"] == 1, what="the get to wait")
    q.put("from another thread")
    reader.join(timeout=30)
    assert got == ["from another thread"]
    q.close()


def _forked_child(inbox: shmarena.Queue, outbox: shmarena.Queue) -> None:
    outbox.put(inbox.get(timeout=30) * 2)


def test_a_forked_child_uses_the_queue_over_its_own_session(daemon: Daemon) -> None:
    client = daemon.client()
    inbox, outbox = shmarena.Queue(client=client), shmarena.Queue(client=client)
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_forked_child, args=(inbox, outbox))
    child.start()
    try:
        inbox.put(np.arange(1 << 15))
        doubled = outbox.get(timeout=30)
        assert int(doubled.sum()) == 2 * sum(range(1 << 15))
    finally:
        child.join(timeout=30)
    assert child.exitcode == 0
    inbox.close()
    outbox.close()


def test_bounded_queue_put_waits_for_room_and_gives_up_with_full(daemon: Daemon) -> None:
    client = daemon.client()
    q = shmarena.Queue(1, client=client)
    q.put(1)
    assert q.full() and q.qsize() == 1
    with pytest.raises(stdlib_queue.Full):
        q.put(2, timeout=0.05)
    with pytest.raises(shmarena.QueueFull, match="stayed full"):
        q.put(2, timeout=0.05)
    taker = threading.Thread(target=lambda: q.get(timeout=30))
    wait_for(lambda: client.stats()["waiting_requests"] == 0, what="nothing to wait")
    q_put = threading.Thread(target=lambda: q.put(3, timeout=30))
    q_put.start()
    wait_for(lambda: client.stats()["waiting_requests"] == 1, what="the put to wait")
    taker.start()
    taker.join(timeout=30)
    q_put.join(timeout=30)
    assert q.get(timeout=5) == 3 and q.empty()
    q.close()
    with pytest.raises(ValueError, match="is closed"):
        q.put(4)
