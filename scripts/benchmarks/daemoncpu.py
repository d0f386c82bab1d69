"""Section: the daemon's CPU per request, all its threads (the ZeroMQ I/O thread too).

The figure is read from the kernel, not timed: the first field of
`/proc/<pid>/task/*/schedstat` is the nanoseconds each thread of the daemon
spent on a CPU, and their sum before and after N operations of one client
(this process) is what those operations cost the daemon. So it counts what
a wall clock on either side misses or double counts: the I/O thread's hops,
the poll and recv/send system calls, msgpack, the service and the ledger.
A daemon serves every client from one loop, so this cost, not the client's
latency, caps how many requests per second one daemon can serve.

Kinds: PING (a round trip that does nothing: the floor); an uncached
alloc+free of 64 KiB (`cache=False`: an ALLOC round trip and a one-way FREE);
a cached alloc+free whose handle escaped (the block goes back through the
batched events, flushed by `sync`); and FILL misses (a cache that keeps
running dry: the daemon's cost per FILL request, with its batch of blocks).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import numpy as np

import shmarena
from benchmarks.common import KiB, Plan, console, fmt_us, new_table, note
from benchmarks.harness import Daemon, connected, started_daemon
from benchmarks.measure import Report

CPU_SIZE = 64 * KiB
# The target for an uncached alloc+free (all the daemon's threads).
UNCACHED_TARGET_US = 40.0


def daemon_cpu_ns(pid: int) -> int:
    """Nanoseconds on a CPU of every thread of process `pid`, summed (schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        path = f"/proc/{pid}/task/{task}/schedstat"
        with contextlib.suppress(FileNotFoundError, ProcessLookupError), open(path) as f:
            total += int(f.read().split()[0])  # (a thread that ended meanwhile: nothing)
    return total


def per_op_us(pid: int, run: Callable[[int], int], count: int) -> float:
    """Daemon CPU µs per operation of `run(count)`, which returns how many
    operations it did (FILLs are counted by the daemon, not asked for)."""
    before = daemon_cpu_ns(pid)
    done = run(count)
    return (daemon_cpu_ns(pid) - before) / 1e3 / max(1, done)


Kind = tuple[Callable[[int], int], Callable[[], None]]  # run(n) -> ops done; reset()


def kinds(daemon: Daemon, stack: contextlib.ExitStack) -> dict[str, Kind]:
    """The operations measured: `run(n)` does them and says how many it did;
    `reset()`, untimed before each run, undoes what the last one left."""
    uncached = connected(stack, daemon, cache=False)
    cached = connected(stack, daemon, cache=True)
    filler = connected(stack, daemon, cache=True)
    held: list[shmarena.Buffer] = []

    def ping(count: int) -> int:
        for _ in range(count):
            uncached.ping()
        return count

    def uncached_pair(count: int) -> int:
        alloc = uncached.alloc
        for _ in range(count):
            alloc(CPU_SIZE).free()
        uncached.sync()  # the one-way FREEs are in before the figure is read
        return count

    def escaped_pair(count: int) -> int:
        alloc = cached.alloc
        for _ in range(count):
            buf = alloc(CPU_SIZE)
            _ = buf.handle  # the handle escapes: the free goes through the events
            buf.free()
        cached.sync()
        return count

    def fill_misses(count: int) -> int:
        # Blocks kept: the class's cache runs dry again and again. Each FILL
        # brings a batch, so `count` allocations make fewer FILLs: the daemon
        # counts them (two stats round trips, small beside the FILLs).
        before = fills(filler)
        held.extend(filler.alloc(4 * KiB) for _ in range(count * 8))
        return fills(filler) - before

    def free_held() -> None:
        for buf in held:
            buf.free()
        held.clear()
        filler.sync()

    def nothing() -> None:
        pass

    return {
        "ping": (ping, nothing),
        "uncached alloc+free 64 KiB": (uncached_pair, nothing),
        "cached alloc+free 64 KiB, handle escaped": (escaped_pair, nothing),
        "FILL miss (4 KiB class)": (fill_misses, free_held),
    }


def fills(client: shmarena.Client) -> int:
    return int(client.stats()["counters"]["ops"].get("fill", 0))


def section_daemoncpu(plan: Plan, report: Report) -> None:
    """Daemon CPU per request by kind, in interleaved rounds (medians)."""
    note("daemon CPU per request (schedstat, all threads)")
    count = 300 if plan.quick else 1000
    with contextlib.ExitStack() as stack:
        daemon = started_daemon(stack, "1G", "4K")
        pid = daemon.harness.pid
        assert pid is not None
        runs = kinds(daemon, stack)
        for run, reset in runs.values():  # warm: sessions open, segments mapped, caches primed
            run(20)
            reset()
        samples: dict[str, list[float]] = {key: [] for key in runs}
        for r in range(plan.rounds):
            order = list(runs)
            shift = r % len(order)
            for key in order[shift:] + order[:shift]:
                run, reset = runs[key]
                reset()
                samples[key].append(per_op_us(pid, run, count))
            runs["FILL miss (4 KiB class)"][1]()
    table = new_table(
        f"daemon CPU per operation, all threads ({plan.rounds} rounds of {count})",
        "<operation",
        "median µs",
        "min µs",
        "max µs",
    )
    results: dict[str, Any] = {}
    for key, values in samples.items():
        median = float(np.median(values))
        results[key] = {"median_us": median, "rounds_us": values}
        table.add_row(key, fmt_us(median), fmt_us(min(values)), fmt_us(max(values)))
    console.print(table)
    report.sections["daemoncpu"] = results
    report.target(
        "daemon CPU per uncached alloc+free 64 KiB, all threads",
        results["uncached alloc+free 64 KiB"]["median_us"],
        "<=",
        UNCACHED_TARGET_US,
        "µs",
    )
