"""`shmarena daemon --metrics-port`: a real daemon's Prometheus endpoint,
scraped over HTTP under load from child processes (cached and uncached
clients, owners recycled, errors, a client killed with its blocks), and its
numbers checked against `stats --json` and `client.stats()` once the load
stopped. Also: every scrape is of one instant (the latency histogram's count
per op equals that op's request counter in the same scrape, even under load),
and the refusals when prometheus_client is missing or the port is taken."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

import shmarena
from shmarena.daemon.metrics import (
    METRICS_CONNECTION_MAX_S,
    METRICS_IO_TIMEOUT_S,
    METRICS_MAX_CONNECTIONS,
)
from tests.conftest import Daemon, subprocess_env, unique_name, wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

LOAD = """
import random, sys
import shmarena
cached, rounds, seed = sys.argv[1] == "1", int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
with shmarena.connect(cache=cached) as client:
    held = []
    for i in range(rounds):
        held.append(client.alloc(rng.choice([4096, 3 * 4096, 65536, 200_000])))
        if len(held) > 8:
            held.pop(rng.randrange(len(held))).free()
        if i % 20 == 0:
            with client.owner(f"batch-{seed}-{i}") as owner:  # recycled on exit
                owner.alloc_many([4096] * 3)
    for buf in held:
        buf.free()
    client.sync()
"""

HOLD_AND_WAIT = """
import sys
import shmarena
client = shmarena.connect(cache=False)
held = [client.alloc(1 << 20) for _ in range(3)] + [client.alloc(5 * 4096)]
print("ready", flush=True)
sys.stdin.read()
"""
KILLED_BYTES = 3 * (1 << 20) + 5 * 4096

# metric -> stats key, for the gauges that must equal `stats` exactly
GAUGE_KEYS = {
    "shmarena_arena_size_bytes": "size_bytes",
    "shmarena_used_bytes": "used_bytes",
    "shmarena_requested_bytes": "requested_bytes",
    "shmarena_free_bytes": "free_bytes",
    "shmarena_largest_free_bytes": "largest_free_bytes",
    "shmarena_cached_bytes": "cached_bytes",
    "shmarena_cached_blocks": "cached_blocks",
    "shmarena_retained_only_bytes": "retained_only_bytes",
    "shmarena_pinned_bytes": "pinned_bytes",
    "shmarena_queued_bytes": "queued_bytes",
    "shmarena_fragmentation_ratio": "fragmentation",
    "shmarena_live_blocks": "live_blocks",
    "shmarena_owners": "owners",
    "shmarena_names": "names",
    "shmarena_waiting_requests": "waiting_requests",
}


def scrape(port: int) -> Samples:
    """Every sample of one scrape: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: value for (n, labels), value in samples.items() if n == name}


def one(samples: Samples, name: str) -> float:
    return samples[(name, frozenset())]


def histogram_counts(samples: Samples) -> dict[str, float]:
    return by_label(samples, "shmarena_request_duration_seconds_count", "op")


def assert_one_instant(samples: Samples) -> None:
    """The histogram and the counters of one scrape come from the same moment."""
    assert one(samples, "shmarena_up") == 1
    requests = by_label(samples, "shmarena_requests_total", "op")
    assert histogram_counts(samples) == requests
    infinite = {
        dict(labels)["op"]: value
        for (n, labels), value in samples.items()
        if n == "shmarena_request_duration_seconds_bucket" and dict(labels)["le"] == "+Inf"
    }
    assert infinite == requests


def test_scrape_under_load_matches_stats(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon("64M", extra=["--metrics-port", "0"])
    client = daemon.client(cache=False)  # no cache: its requests are the daemon's exact figures
    where = client.stats()["metrics"]
    assert where["bind"] == "127.0.0.1" and where["port"] > 0
    port = where["port"]

    loaders = [
        daemon.python(LOAD, "1" if i % 2 else "0", "300", str(i)) for i in range(3)
    ]  # two without a cache, one with (its fills and posts)
    holder = daemon.python(HOLD_AND_WAIT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
    with pytest.raises(shmarena.OutOfMemory):
        client.alloc(1 << 30)
    with pytest.raises(shmarena.OutOfMemory):
        client.alloc(65 << 20)
    with pytest.raises(shmarena.UnknownOwner):
        client.recycle("no-such-owner")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)

    # Scrape while the loaders run: each scrape is consistent in itself, and
    # the counters only go up from one to the next.
    scrapes = []
    while True:
        running = any(p.poll() is None for p in loaders)
        samples = scrape(port)
        assert_one_instant(samples)
        scrapes.append(samples)
        if not running:
            break
    totals = [sum(by_label(s, "shmarena_requests_total", "op").values()) for s in scrapes]
    assert totals == sorted(totals) and totals[0] < totals[-1]
    assert [p.wait(timeout=60) for p in loaders] == [0, 0, 0]
    wait_for(
        lambda: client.stats()["counters"]["sessions_reclaimed"] == 1,
        what="the killed client to be reclaimed",
    )

    # Leave holes so the figures compared below are not those of an empty arena.
    kept = [client.alloc(3 * 4096) for _ in range(8)]
    for buf in kept[::2]:
        buf.free()
    client.sync()

    # Quiesced. `stats --json` (another process, through the CLI) and a
    # scrape right after it: the arena's figures are the same.
    from_cli = json.loads(daemon.cli("stats", "--json", check=True).stdout)
    samples = scrape(port)
    for metric, key in GAUGE_KEYS.items():
        assert one(samples, metric) == from_cli[key], metric
    assert from_cli["used_bytes"] == 4 * 3 * 4096 and from_cli["fragmentation"] > 0
    assert one(samples, "shmarena_queues") == len(from_cli["queues"])
    assert one(samples, "shmarena_segments") == len(from_cli["segments"])
    assert by_label(samples, "shmarena_free_blocks", "order") == {
        order: float(count) for order, count in from_cli["free_blocks_by_order"].items()
    }

    # And this client's stats, then a scrape with no request in between:
    # every counter equal.
    stats = client.stats()
    samples = scrape(port)
    assert_one_instant(samples)
    counters = stats["counters"]
    assert by_label(samples, "shmarena_requests_total", "op") == {
        op: float(n) for op, n in counters["ops"].items()
    }
    assert counters["errors_by_code"] == {"out_of_memory": 2, "unknown_owner": 1}
    assert by_label(samples, "shmarena_errors_total", "code") == {
        "out_of_memory": 2.0,
        "unknown_owner": 1.0,
    }
    assert counters["reclaimed_bytes"] == KILLED_BYTES
    assert one(samples, "shmarena_reclaimed_bytes_total") == KILLED_BYTES
    assert one(samples, "shmarena_sessions_reclaimed_total") == 1
    assert one(samples, "shmarena_sessions_opened_total") == counters["sessions_opened"]
    assert one(samples, "shmarena_allocated_blocks_total") == counters["allocs"]
    assert one(samples, "shmarena_freed_blocks_total") == counters["frees"]
    assert one(samples, "shmarena_sessions") == stats["sessions"] == 1
    for metric, key in GAUGE_KEYS.items():
        assert one(samples, metric) == stats[key], metric
    # what the load did shows: every kind of request it made, and a cache's traffic
    ops = counters["ops"]
    assert {"hello", "alloc", "alloc_many", "owner", "recycle", "fill", "post"} <= set(ops)
    assert ops["hello"] >= 5  # three loaders, the holder, this client (and the CLI)
    assert sum(histogram_counts(samples).values()) == sum(ops.values())
    info = {dict(labels)["name"] for (n, labels) in samples if n == "shmarena_info"}
    assert info == {daemon.name}
    print(
        "scrape vs stats:",
        {m: one(samples, m) for m in ("shmarena_used_bytes", "shmarena_free_bytes",
                                      "shmarena_largest_free_bytes",
                                      "shmarena_fragmentation_ratio", "shmarena_live_blocks",
                                      "shmarena_reclaimed_bytes_total")},
        {k: stats[k] for k in ("used_bytes", "free_bytes", "largest_free_bytes",
                               "fragmentation", "live_blocks")},
        "requests_total", by_label(samples, "shmarena_requests_total", "op"),
        "errors_total", by_label(samples, "shmarena_errors_total", "code"),
        f"{len(scrapes)} scrapes under load",
    )  # fmt: skip

    daemon.stop()
    with pytest.raises(urllib.error.URLError):
        scrape(port)  # the endpoint went with the daemon


def test_without_prometheus_client_the_daemon_says_what_to_install(run_dir: str) -> None:
    name = unique_name()
    # sys.modules[...] = None makes any `import prometheus_client` raise ImportError
    code = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"
        "from shmarena.cli import main\n"
        "raise SystemExit(main(['daemon', '--size', '8M', '--metrics-port', '0']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(run_dir, name),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "--metrics-port needs the prometheus_client package" in result.stderr
    assert "pip install 'shmarena[metrics]'" in result.stderr
    Daemon(name, run_dir, "8M").assert_clean()


def test_a_taken_port_is_refused_and_nothing_is_left(run_dir: str) -> None:
    name = unique_name()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "shmarena", "daemon", "--size", "8M",
             "--metrics-port", str(port)],
            env=subprocess_env(run_dir, name),
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"--metrics-port {port}: cannot listen there" in result.stderr
    assert "0 picks a free one" in result.stderr
    Daemon(name, run_dir, "8M").assert_clean()


def test_bad_port_number_is_a_usage_error(run_dir: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shmarena", "daemon", "--metrics-port", "70000"],
        env=subprocess_env(run_dir, unique_name()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--metrics-port must be 0..65535" in result.stderr


def daemon_threads(daemon: Daemon) -> int:
    assert daemon.proc is not None
    return len(os.listdir(f"/proc/{daemon.proc.pid}/task"))


def test_an_idle_connection_is_closed_and_others_are_served(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon("8M", extra=["--metrics-port", "0"])
    client = daemon.client()
    port = client.stats()["metrics"]["port"]
    with socket.create_connection(("127.0.0.1", port)) as idle:
        idle.settimeout(METRICS_IO_TIMEOUT_S + 20)  # the test fails, not hangs, if never closed
        idle.sendall(b"GET /metr")  # and then nothing: no end of the request line
        stalled = time.monotonic()
        assert one(scrape(port), "shmarena_up") == 1  # other scrapers are answered
        assert client.ping() > 0
        started = time.monotonic()
        try:
            got = idle.recv(4096)
        except TimeoutError:
            waited = time.monotonic() - started
            pytest.fail(f"an idle metrics connection was still open after {waited:.0f} s")
        closed_s = time.monotonic() - stalled
        assert got == b"" or got.startswith(b"HTTP/1")
    assert one(scrape(port), "shmarena_up") == 1 and client.check() == []
    print(f"\nFIGURE: an idle metrics connection was closed {closed_s:.1f} s after it stalled")


def test_concurrent_metrics_connections_are_capped(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon("8M", extra=["--metrics-port", "0"])
    client = daemon.client()
    port = client.stats()["metrics"]["port"]
    assert client.stats()["limits"]["metrics_connections"] == METRICS_MAX_CONNECTIONS
    threads_before = daemon_threads(daemon)
    idle = []
    try:
        for _ in range(METRICS_MAX_CONNECTIONS):
            conn = socket.create_connection(("127.0.0.1", port))
            conn.sendall(b"GET /metr")
            idle.append(conn)
        wait_for(
            lambda: daemon_threads(daemon) >= threads_before + METRICS_MAX_CONNECTIONS,
            what="a thread per held connection",
        )
        # One more: refused at once with a 503 that says why, no thread for it.
        extra = []
        for _ in range(4):
            conn = socket.create_connection(("127.0.0.1", port))
            conn.settimeout(20)
            extra.append(conn)
            reply = b""
            try:
                while chunk := conn.recv(4096):
                    reply += chunk
            except TimeoutError:
                pytest.fail("a connection over the cap was neither answered nor closed")
            assert reply.startswith(b"HTTP/1.0 503"), reply
            assert b"at once" in reply
        assert daemon_threads(daemon) <= threads_before + METRICS_MAX_CONNECTIONS
        for conn in extra:
            conn.close()
        assert client.ping() > 0
    finally:
        for conn in idle:
            conn.close()
    # The held ones gone, scrapes are served again.
    wait_for(lambda: scrape_or_none(port), what="a scrape to be answered again")


def scrape_or_none(port: int) -> Samples | None:
    try:
        return scrape(port)
    except (urllib.error.URLError, ConnectionError):
        return None


def test_a_trickling_scraper_is_cut_off(make_daemon: Callable[..., Daemon]) -> None:
    """A byte a second never trips the per-read timeout; the whole-connection
    deadline ends it anyway."""
    daemon = make_daemon("8M", extra=["--metrics-port", "0"])
    client = daemon.client()
    port = client.stats()["metrics"]["port"]
    with socket.create_connection(("127.0.0.1", port)) as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        opened = time.monotonic()
        slow.settimeout(1.0)  # wait for the close a second at a time, sending a byte in between
        while True:
            if time.monotonic() - opened > METRICS_CONNECTION_MAX_S + 30:
                pytest.fail("a trickling metrics connection was never cut off")
            try:
                if slow.recv(4096) == b"":
                    break
            except TimeoutError:
                try:
                    slow.sendall(b"a")
                except OSError:
                    break  # cut off while we sent
            except ConnectionResetError:
                break
        lived_s = time.monotonic() - opened
    assert lived_s >= METRICS_IO_TIMEOUT_S  # it was the deadline, not the read timeout
    assert one(scrape(port), "shmarena_up") == 1 and client.ping() > 0
    print(
        f"\nFIGURE: a metrics connection sending a byte a second was cut off after {lived_s:.1f} s"
    )
