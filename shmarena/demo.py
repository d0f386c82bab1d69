"""`shmarena demo`: a small producer/consumer pipeline through the arena.

Producer processes fill frames under one detached owner per batch and send
only handles and checksums to the consumer (this process), which attaches
each frame, verifies it, and recycles the whole batch in one call. At the end
it reports what moved and that nothing leaked, then what one allocation costs,
measured in this process with nothing else running: a cache hit (no message
to the daemon), a round trip through the daemon (a client without a cache,
as on a cache miss), and `multiprocessing.shared_memory` create+unlink of the
same size, for comparison. If no daemon answers under the chosen name, a
temporary one is started for the run and stopped after it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import signal
import statistics
import subprocess
import time
import zlib
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shmarena.client.buffer import Buffer, Handle
from shmarena.client.client import Owner, connect
from shmarena.config import format_size
from shmarena.console import make_console
from shmarena.errors import DaemonUnavailable, OutOfMemory, ShmArenaError
from shmarena.spawn import shmarena_command

START_TIMEOUT_S = 20.0
OOM_WAIT_S = 30.0
# alloc+free pairs timed per kind (medians of these): a few tenths of a
# second in all, even with the round trips on a loaded 2-core machine.
HIT_SAMPLES = 5000
ROUND_TRIP_SAMPLES = 300
SHM_SAMPLES = 300


def _fill(view: memoryview, seed: int) -> None:
    """A deterministic pattern, written without a Python-level byte loop."""
    pattern = seed.to_bytes(8, "little") * 512  # 4 KiB
    size = len(view)
    whole = size - size % len(pattern)
    if whole:
        view[:whole] = pattern * (whole // len(pattern))
    view[whole:] = pattern[: size - whole]


def _producer(
    index: int,
    name: str,
    run_dir: str,
    batches: int,
    frames: int,
    frame_size: int,
    work: Any,
    done: Any,
) -> None:
    latencies: list[int] = []
    with connect(name, runtime_dir=run_dir, label=f"demo-producer-{index}") as client:
        for batch in range(batches):
            owner_name = f"demo-{os.getppid()}-p{index}-b{batch}"
            owner = client.owner(owner_name, detached=True)
            sent = []
            for frame in range(frames):
                buf = _alloc_waiting(owner, frame_size, latencies)
                _fill(buf.view, (index << 32) | (batch << 16) | frame)
                sent.append((tuple(buf.handle), zlib.crc32(buf.view)))
            work.put((owner_name, sent))
    done.put(latencies)


def _alloc_waiting(owner: Owner, size: int, latencies: list[int]) -> Buffer:
    """Allocate; when the arena is full, wait for the consumer to recycle."""
    deadline = time.monotonic() + OOM_WAIT_S
    while True:
        t0 = time.perf_counter_ns()
        try:
            buf = owner.alloc(size)
        except OutOfMemory:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)  # backpressure: the consumer is behind
            continue
        latencies.append(time.perf_counter_ns() - t0)
        return buf


def _answers(name: str, run_dir: str) -> bool:
    try:
        with connect(name, runtime_dir=run_dir, timeout_s=1.0) as client:
            client.ping()
        return True
    except DaemonUnavailable:
        return False


def _start_daemon(args: argparse.Namespace, console: Console) -> subprocess.Popen[bytes] | None:
    command = shmarena_command(
        "daemon", "--name", args.name, "--runtime-dir", args.run_dir, "--size", str(args.size),
    )  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read().decode(errors="replace") if process.stdout else ""
            console.print(f"[red]the temporary daemon failed to start:[/red]\n{output}")
            return None
        if _answers(args.name, args.run_dir):
            return process
        time.sleep(0.02)
    process.kill()
    process.wait()
    console.print(f"[red]the temporary daemon did not answer within {START_TIMEOUT_S:g} s[/red]")
    return None


def _stop_daemon(process: subprocess.Popen[bytes], name: str, run_dir: str) -> None:
    try:
        with connect(name, runtime_dir=run_dir, timeout_s=2.0) as client:
            client.shutdown()
    except ShmArenaError:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_demo(args: argparse.Namespace) -> int:
    console = make_console()  # as the admin commands: piped, tables are not wrapped
    if min(args.producers, args.batches, args.frames, args.frame_size) <= 0:
        console.print("demo: --producers, --batches, --frames and --frame-size must be positive")
        return 2
    daemon = None
    if _answers(args.name, args.run_dir):
        console.print(f"using the running daemon {args.name!r}")
    else:
        console.print(
            f"starting a temporary daemon {args.name!r} with a {format_size(args.size)} arena"
        )
        daemon = _start_daemon(args, console)
        if daemon is None:
            return 1
    try:
        status = _pipeline(args, console)
        if status == 0:
            _report_costs(args, console)
            busy = args.producers + 2  # the consumer and the daemon too
            cpus = os.cpu_count()
            console.print(
                f"(the producer allocs above: both kinds, {busy} processes on {cpus} CPUs)"
            )
        return status
    finally:
        if daemon is not None:
            _stop_daemon(daemon, args.name, args.run_dir)
            console.print("temporary daemon stopped (socket and arena removed)")


def _pipeline(args: argparse.Namespace, console: Console) -> int:
    ctx = mp.get_context("spawn")
    total_frames = args.producers * args.batches * args.frames
    # Bounded: producers wait instead of outrunning the consumer.
    work = ctx.Queue(maxsize=max(2, args.producers * 2))
    done = ctx.Queue()
    with connect(args.name, runtime_dir=args.run_dir, label="demo-consumer") as client:
        used_before = client.stats()["used_bytes"]
        producers = [
            ctx.Process(
                target=_producer,
                args=(
                    i,
                    args.name,
                    args.run_dir,
                    args.batches,
                    args.frames,
                    args.frame_size,
                    work,
                    done,
                ),
                daemon=True,
            )  # fmt: skip
            for i in range(args.producers)
        ]
        started = time.perf_counter()
        for process in producers:
            process.start()
        verified = mismatches = recycled = 0
        peak_used = 0
        try:
            with Progress(
                TextColumn("frames verified"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            ) as progress:
                task = progress.add_task("frames", total=total_frames)
                while verified + mismatches < total_frames:
                    try:
                        owner_name, frames = work.get(timeout=1.0)
                    except queue.Empty:
                        dead = [p for p in producers if p.exitcode not in (None, 0)]
                        if dead:
                            console.print(f"[red]a producer failed (exit {dead[0].exitcode})")
                            return 1
                        continue
                    for wire, crc in frames:
                        buf = client.attach(Handle(*wire))
                        if zlib.crc32(buf.view) == crc:
                            verified += 1
                        else:
                            mismatches += 1
                    peak_used = max(peak_used, client.stats()["used_bytes"])
                    client.recycle(owner_name)  # the whole batch in one call
                    recycled += 1
                    progress.update(task, completed=verified + mismatches)
            latencies = []
            for _ in producers:
                latencies.extend(done.get(timeout=30))
            for process in producers:
                process.join(timeout=30)
        finally:
            for process in producers:
                if process.is_alive():
                    process.terminate()
                    process.join(timeout=5)
        elapsed = time.perf_counter() - started
        stats = client.stats()
        problems = client.check()
    leaked = stats["used_bytes"] - used_before
    moved = total_frames * args.frame_size
    latencies.sort()
    table = Table(title="shmarena demo", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("producers", str(args.producers)),
        ("frames", f"{verified + mismatches} of {format_size(args.frame_size)}"),
        ("bytes moved (zero-copy)", format_size(moved)),
        ("throughput", f"{moved / elapsed / 2**20:.0f} MiB/s in {elapsed:.2f} s"),
        (
            "producer allocs",
            f"median {_us(statistics.median(latencies))} µs, "
            f"p99 {_us(latencies[int(len(latencies) * 0.99) - 1])} µs (under load, see below)",
        ),
        ("owners recycled", f"{recycled} (one call each)"),
        ("checksum mismatches", str(mismatches)),
        ("peak arena use", format_size(peak_used)),
        (
            "arena after",
            f"used {format_size(stats['used_bytes'])}, free {format_size(stats['free_bytes'])}, "
            f"largest free block {format_size(stats['largest_free_bytes'])}, "
            f"{stats['live_blocks']} live blocks",
        ),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    console.print(f"leaked: {leaked} bytes")
    if problems:
        console.print("allocator check: BROKEN")
        for problem in problems:
            console.print(f"  {problem}")
    else:
        console.print("allocator check: ok")
    return 0 if not mismatches and not leaked and not problems else 1


# -- what one allocation costs ------------------------------------------------


def _us(ns: float) -> str:
    """Nanoseconds as microseconds, with a decimal below 10 µs."""
    us = ns / 1000
    return f"{us:.1f}" if us < 10 else f"{us:.0f}"


def _median_ns(pair: Any, samples: int) -> float:
    """The median time of `pair()` over `samples` calls (after a few warm-up
    calls, which fill the cache and map what they need)."""
    for _ in range(min(20, samples)):
        pair()
    times = []
    for _ in range(samples):
        t0 = time.perf_counter_ns()
        pair()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times)


def _shared_memory_ns(size: int, samples: int) -> float | None:
    """The stdlib's cost for one buffer: SharedMemory(create=True) + close +
    unlink (a /dev/shm file each; its pages untouched, as ours are here)."""
    from multiprocessing import shared_memory  # only for this comparison

    def pair() -> None:
        segment = shared_memory.SharedMemory(create=True, size=size)
        segment.close()
        segment.unlink()

    try:
        return _median_ns(pair, samples)
    except OSError:
        return None  # no /dev/shm here: nothing to compare with


def _report_costs(args: argparse.Namespace, console: Console) -> None:
    """Time alloc+free of one buffer as a cache hit and as a round trip
    through the daemon, and the stdlib's create+unlink of the same size, and
    print one line each."""
    with (
        connect(args.name, runtime_dir=args.run_dir, label="demo-costs") as cached,
        connect(args.name, runtime_dir=args.run_dir, label="demo-costs", cache=False) as direct,
    ):
        size = min(args.frame_size, cached.cache_max_bytes) or args.frame_size

        def hit() -> None:
            cached.alloc(size).free()

        def round_trip() -> None:
            direct.alloc(size).free()  # the alloc waits for the daemon; the free does not

        hit_ns = _median_ns(hit, HIT_SAMPLES) if cached.cache_max_bytes else None
        trip_ns = _median_ns(round_trip, ROUND_TRIP_SAMPLES)
        direct.sync()  # every free applied before the clients close
    shm_ns = _shared_memory_ns(size, SHM_SAMPLES)
    size_text = format_size(size)
    console.print(f"\none alloc+free of a {size_text} buffer (medians, this process alone):")
    if hit_ns is not None:
        console.print(f"  cache hit (no message to the daemon):       {_us(hit_ns)} µs")
    else:
        console.print("  cache hit: none (the arena is too small for a client cache)")
    console.print(f"  round trip through the daemon (cache miss): {_us(trip_ns)} µs")
    if shm_ns is None:
        console.print("  shared_memory: not measured (no /dev/shm)")
        return
    base, what = (hit_ns, "a cache hit") if hit_ns is not None else (trip_ns, "a round trip")
    ratio = shm_ns / base
    times = f"{ratio:.1f}" if ratio < 10 else f"{ratio:.0f}"
    console.print(
        f"  shared_memory: {_us(shm_ns)} µs per buffer (create+unlink), {times}× slower than {what}"
    )
