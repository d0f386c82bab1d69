"""What one heavy client costs everybody else: parked waiters and owner churn.

Starts a daemon of its own, then measures another client's ping latency and
the daemon's resident memory (VmRSS) at each stage:

1. idle, as a baseline;
2. with WAITERS lookups of names nobody publishes parked in the daemon (raw
   sockets, each holding as many as the daemon's per-session limit allows);
3. after those sessions said goodbye;
4. after one session created and recycled OWNERS owners, one at a time, the
   README's `with client.owner(f"batch-{i}")` pattern.

    python scripts/pressure.py [--waiters 10000] [--owners 100000] [--pings 2000]

It prints one line per stage and a summary table; nothing is asserted (the
tests check behaviour, this script measures it). Latency is wall time of
`client.ping()` round trips, median and 99th percentile; the daemon's CPU
(all its threads, from /proc) per ping, and while nobody asks anything.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import msgpack
import zmq

import shmarena
from shmarena import testing
from shmarena.protocol import PROTOCOL_VERSION, Op

HELLO_ID = 1 << 62  # HELLO is outside the numbered sequence
IDLE_S = 2.0  # how long each stage watches the daemon's CPU with nobody asking


def daemon_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def daemon_cpu_s(pid: int) -> float:
    """User + system CPU time of the daemon, all its threads."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_start_ticks() -> int:
    with open("/proc/self/stat", "rb") as f:
        data = f.read()
    return int(data[data.rfind(b")") + 2 :].split()[19])


def ping_figures(client: shmarena.Client, count: int) -> tuple[float, float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        client.ping()
        samples.append(time.perf_counter() - start)
    samples.sort()
    return statistics.median(samples) * 1e6, samples[int(0.99 * (len(samples) - 1))] * 1e6


class Parker:
    """One raw session that parks lookups of names nobody publishes."""

    def __init__(self, context: zmq.Context[Any], socket_path: str, label: str) -> None:
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(f"ipc://{socket_path}")
        self.next_id = 1
        pid, ticks = os.getpid(), own_start_ticks()
        hello = [int(Op.HELLO), HELLO_ID, PROTOCOL_VERSION, pid, ticks, label, []]
        self.socket.send(msgpack.packb(hello))
        reply = msgpack.unpackb(self.socket.recv())
        if reply[0] != 0:
            raise RuntimeError(f"hello refused: {reply}")

    def park(self, count: int, prefix: str, wait_s: float) -> None:
        for i in range(count):
            request = [int(Op.LOOKUP), self.next_id, f"{prefix}-{i}", wait_s]
            self.socket.send(msgpack.packb(request))
            self.next_id += 1

    def refusals(self) -> list[str]:
        """Replies that came back at once (a parked lookup gets none)."""
        found = []
        while self.socket.poll(0):
            reply = msgpack.unpackb(self.socket.recv())
            found.append(f"{reply[2]}: {reply[3]}" if reply[0] != 0 else repr(reply))
        return found

    def bye(self) -> None:
        self.socket.send(msgpack.packb([int(Op.BYE), HELLO_ID + 1]))
        self.socket.poll(10_000)
        self.socket.close(linger=0)


def wait_for(condition: Any, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waiters", type=int, default=10_000, help="lookups to park")
    parser.add_argument("--owners", type=int, default=100_000, help="owners to create/recycle")
    parser.add_argument("--pings", type=int, default=2000, help="pings per latency figure")
    args = parser.parse_args(argv)

    daemon = testing.start_daemon("64M", name=f"pressure{os.getpid()}", timeout_s=30)
    name, run_dir = daemon.name, daemon.run_dir
    rows: list[tuple[str, float, float, float, float, float]] = []
    context: zmq.Context[Any] = zmq.Context()
    try:
        pinger = shmarena.connect(name, runtime_dir=run_dir, label="pinger")

        def stage(label: str) -> None:
            cpu = daemon_cpu_s(daemon.pid)
            time.sleep(IDLE_S)  # nobody asks: what does the daemon burn meanwhile?
            idle_pct = (daemon_cpu_s(daemon.pid) - cpu) / IDLE_S * 100
            cpu = daemon_cpu_s(daemon.pid)
            p50, p99 = ping_figures(pinger, args.pings)
            per_ping_us = (daemon_cpu_s(daemon.pid) - cpu) / args.pings * 1e6
            rss = daemon_rss_mib(daemon.pid)
            rows.append((label, p50, p99, per_ping_us, idle_pct, rss))
            print(f"{label}: ping p50 {p50:.0f} us, p99 {p99:.0f} us, daemon CPU {per_ping_us:.0f} "
                  f"us per ping, {idle_pct:.0f} % of a core idle; daemon RSS {rss:.1f} MiB",
                  flush=True)  # fmt: skip

        stage("idle")

        limits = pinger.stats().get("limits", {})
        per_session = min(args.waiters, limits.get("kept_requests_per_session", args.waiters))
        parkers: list[Parker] = []
        left = args.waiters
        while left > 0:
            parker = Parker(context, os.path.join(run_dir, f"{name}.sock"), f"parker{len(parkers)}")
            count = min(per_session, left)
            parker.park(count, f"never-{len(parkers)}", wait_s=600.0)
            parkers.append(parker)
            left -= count
        wait_for(lambda: pinger.stats()["waiting_requests"] >= args.waiters,
                 f"{args.waiters} parked lookups")  # fmt: skip
        refused = [r for p in parkers for r in p.refusals()]
        if refused:
            print(f"  {len(refused)} lookups were answered at once, e.g. {refused[0]}")
        print(f"  {args.waiters} lookups parked over {len(parkers)} sessions")
        stage(f"{args.waiters} parked lookups")
        for parker in parkers:
            parker.bye()
        wait_for(lambda: pinger.stats()["waiting_requests"] == 0, "the parked lookups to go")
        stage("parkers gone")

        with shmarena.connect(name, runtime_dir=run_dir, label="churn") as churn:
            tenth = max(1, args.owners // 10)
            start = time.perf_counter()
            marks = []
            for i in range(args.owners):
                if i % tenth == 0:
                    marks.append(time.perf_counter())
                with churn.owner(f"batch-{i}"):
                    pass
            end = time.perf_counter()
            marks.append(end)
            took = end - start
            first_us = (marks[1] - marks[0]) / tenth * 1e6
            last_us = (marks[-1] - marks[-2]) / tenth * 1e6
            print(f"  {args.owners} owners created and recycled in {took:.1f} s "
                  f"({took / args.owners * 1e6:.0f} us each; first tenth {first_us:.0f} us "
                  f"each, last tenth {last_us:.0f} us each)")  # fmt: skip
            stage(f"after {args.owners} owners")
            owners = pinger.stats()["owners"]
            print(f"  owners left in the daemon: {owners}")
        problems = pinger.check()
        print(f"  check: {problems or 'clean'}")
        pinger.close()
    finally:
        context.destroy(linger=0)
        daemon.close(timeout_s=30)
    print()
    print(f"{'stage':<28} {'ping p50 us':>12} {'ping p99 us':>12} {'CPU us/ping':>12} "
          f"{'idle CPU %':>11} {'daemon RSS MiB':>15}")  # fmt: skip
    for label, p50, p99, per_ping, idle, rss in rows:
        print(f"{label:<28} {p50:>12.0f} {p99:>12.0f} {per_ping:>12.0f} {idle:>11.0f} {rss:>15.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
