"""Benchmark shmarena against its alternatives and its own floors, side by side.

What it measures (one run, eight sections):

1. alloc+free latency per pair at 4 KiB, 64 KiB, 1 MiB and 16 MiB for a cached
   client (cache=True), an uncached client (cache=False: every call is a round
   trip to the daemon), multiprocessing.shared_memory (create, close, unlink),
   and the transport floor: one raw ZeroMQ DEALER -> ROUTER round trip of a
   30-byte message to an echo process.
2. aggregate cached alloc+free throughput at 64 KiB with one and with two
   client processes started together (each its own client).
3. handing a numpy array of 1, 16 and 256 MiB from this process (the producer)
   to a consumer process, which makes an array over the data, reads one element
   and acks with one byte: a shmarena handle, a shared_memory segment name, the
   array itself through a multiprocessing.Queue (a pickled copy), the array
   through a shmarena.Queue (one already in the arena: named, not copied; and a
   plain one: copied into the arena once), and the token floor (8 bytes
   through the same Pipe / multiprocessing.Queue, plus the ack).
4. memory efficiency of a fresh 1 GiB arena (uncached): log-uniform requests of
   4 KiB .. 4 MiB (fixed seed) until the first OutOfMemory, then ten rounds of
   "free a random half of the live buffers, refill until OutOfMemory".
5. scale: 64 KiB alloc+free latency (cached and uncached) with 1 000 and with
   1 000 000 live blocks (100 000 with --quick) in the daemon, and the daemon's
   RSS at both. Two daemons started alike (256 MiB, min block 64 B) hold the
   two states side by side, so that both are measured interleaved.
6. persist: 64 KiB alloc+free (cached and uncached) against daemons whose
   arena is a backing file, by --durability: none, batch and sync on tmpfs,
   and batch on the disk of the temp dir ("batch-disk", where fdatasync waits
   for the device); ratios to none.
7. pages: first-touch cost per GiB of a fresh segment: what the daemon pays
   making it (fallocate, or a pre-fault as --numa-node does) and what a fresh
   client process pays mapping it and writing one byte per 4 KiB page, lazily
   or with populate=True; against a bare ftruncate'd segment, and on huge
   pages (hugetlbfs, shmem THP) where available. As root it reserves huge
   pages, mounts hugetlbfs and sets shmem_enabled for the section, and puts
   all three back.
8. dask: in a distributed.LocalCluster of two worker processes, a task on
   worker A makes a 256 MiB uint8 array and a task on worker B reads it: the
   transfer A -> B (from B's transfer_incoming_log) and the consumer's end to
   end time, without shmarena.dask.ShmarenaPlugin (Dask's own path) and with
   it (the array made in the arena; a plain array, copied in on send). Two
   clusters side by side, interleaved. Skipped, saying so, when distributed
   is not installed (pip install 'shmarena[dask]').

How to run it (from the repository root, in a venv with shmarena installed):

    python scripts/bench.py                       # full run: about a minute
    python scripts/bench.py --quick               # under a minute, every section
    python scripts/bench.py --rounds 8            # more rounds, less noise
    python scripts/bench.py --json run.json       # every figure as one JSON object
    python scripts/bench.py --save-baseline base.json
    python scripts/bench.py --compare base.json --threshold 10

The script starts its own daemons (`python -m shmarena daemon --detach`, names
`bench-<pid>-<n>`, runtime dirs from mkdtemp) and stops them at the end, also
on errors and Ctrl-C; afterwards nothing of it is left in /dev/shm.

How to read it:

- The machine it runs on may be noisy (absolute latencies can move 2-5x
  between runs), so every measurement is interleaved: R rounds, and in every
  round a chunk of every variant, so that noise hits all variants alike; the
  samples of a variant are pooled over the rounds. Trust ratios between
  variants of one run more than absolute microseconds.
- "median" is the typical cost, "p99" the tail, both in microseconds of the
  pooled samples. The cheap variants (cached, shared_memory) are timed 20
  pairs per sample and divided, so the clock's own cost does not dominate;
  their p99 is therefore the p99 of 20-pair means (a smoothed tail).
- "x faster" ratios: higher is better. "x floor" ratios: lower is better, 1.0
  means as cheap as the bare transport. Every ratio in the JSON says which way
  is better.
- Every chunk also stops after a time budget (at least 5 samples), so a slow
  variant gets fewer samples; the tables and the JSON give the counts.
- The "targets" table says met / missed for each goal; a missed target does
  not change the exit status.
- --compare FILE compares only ratio figures (never absolute times) with a
  saved run and exits 1 when one got worse by more than --threshold percent
  and beyond the noise of the two runs: a ratio measured round by round is a
  regression only if the ranges of its per-round values no longer overlap
  (shown as "noise" otherwise). Deterministic figures (memory efficiency,
  RSS) and single-trial ones are judged by the threshold alone.
  Compare full runs: --quick ratios of an unchanged tree can move by tens of
  percent on a noisy machine.

Exit status: 0 done, 1 a ratio regressed (--compare), 2 the benchmark failed
or could not clean up after itself, 130 interrupted (143 on SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.shared_memory import SharedMemory
from multiprocessing.synchronize import Barrier
from typing import Any

import msgpack
import numpy as np
import posix_ipc
import zmq
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# Benchmark the working copy this script belongs to, even without an install.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shmarena  # noqa: E402
from shmarena.config import shm_name  # noqa: E402
from shmarena.shm.arena import shm_path  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

SEED = 20240611  # memory-efficiency request sizes; the churn victims use SEED + 1
LATENCY_SIZES = (4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB)
HANDOFF_SIZES = (1 * MiB, 16 * MiB, 256 * MiB)
QUEUE_ROWS = {  # section 3's table rows for the queue variants
    "queue": "multiprocessing.Queue (pickled copy)",
    "squeue": "shmarena.Queue (array in the arena)",
    "squeue_copy": "shmarena.Queue (plain array: one copy in)",
}
THROUGHPUT_SIZE = 64 * KiB
SCALE_SIZE = 64 * KiB
SCALE_SMALL = 1_000
FLOOR_MESSAGE = b"f" * 30  # the transport floor's message: 30 bytes
TOKEN = b"tok12345"  # the handoff floor's token: 8 bytes
ACK, NACK = b"\x01", b"\x00"
CHEAP_BATCH = 20  # pairs per sample for the cheap variants
MIN_SAMPLES_PER_CHUNK = 5  # a chunk stops at its time budget, but never before this
MAX_BATCH = 4096  # the daemon's limit of sizes / handles per request
EFFICIENCY_CHUNK = 32  # sizes per alloc_many while filling the arena
CHURN_ROUNDS = 10
CHILD_TIMEOUT_S = 120.0  # longest wait for any child process' answer
HIGHER, LOWER = "higher", "lower"  # which way a ratio is better

# Rich wraps at 80 columns when the output is not a terminal: give the tables room.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


# -- plan ----------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How much of everything to do: the full run or --quick."""

    quick: bool
    rounds: int
    warmup: int  # untimed pairs (or handoffs) per variant before the first round
    latency_samples: int  # samples per chunk, sections 1 and 5
    chunk_budget_s: float  # a chunk stops after this long (and MIN_SAMPLES_PER_CHUNK)
    throughput_trial_s: float  # wanted length of one single-client trial
    throughput_trials: int  # trials per client count per round
    handoff_samples: int  # Pipe handoffs per chunk
    queue_samples: dict[int, int]  # Queue handoffs per chunk, by array size
    scale_blocks: int  # live blocks of the big scale daemon
    dask_samples: int  # 256 MiB Dask handoffs per variant per round

    @staticmethod
    def make(quick: bool, rounds: int | None) -> Plan:
        if quick:
            return Plan(
                quick=True,
                rounds=rounds or 3,
                warmup=10,
                latency_samples=50,
                chunk_budget_s=0.08,
                throughput_trial_s=0.1,
                throughput_trials=1,
                handoff_samples=30,
                queue_samples={1 * MiB: 4, 16 * MiB: 2, 256 * MiB: 1},
                scale_blocks=100_000,
                dask_samples=1,
            )
        return Plan(
            quick=False,
            rounds=rounds or 5,
            warmup=50,
            latency_samples=200,
            chunk_budget_s=0.4,
            throughput_trial_s=0.3,
            throughput_trials=2,
            handoff_samples=100,
            queue_samples={1 * MiB: 20, 16 * MiB: 4, 256 * MiB: 1},
            scale_blocks=1_000_000,
            dask_samples=2,
        )


# -- small helpers ---------------------------------------------------------------


def size_label(size: int) -> str:
    """4096 -> "4KiB", 1048576 -> "1MiB" (used in table rows and JSON keys)."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B"


def count_label(count: int) -> str:
    """1000 -> "1k", 100000 -> "100k", 1000000 -> "1M"."""
    if count % 1_000_000 == 0:
        return f"{count // 1_000_000}M"
    if count % 1_000 == 0:
        return f"{count // 1_000}k"
    return str(count)


def fmt_us(value: float) -> str:
    if math.isnan(value):
        return "-"
    if value < 10:
        return f"{value:.2f}"
    if value < 1000:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def fmt_ratio(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.3g}×" if value < 100 else f"{value:,.0f}×"


def safe_div(a: float, b: float) -> float:
    return a / b if b else math.nan


def summarize(samples_us: Sequence[float]) -> dict[str, float | int]:
    """Median and p99 (numpy's linear interpolation) of pooled samples, in µs."""
    if not samples_us:
        return {"median_us": math.nan, "p99_us": math.nan, "samples": 0}
    values = np.asarray(samples_us, dtype=np.float64)
    return {
        "median_us": float(np.median(values)),
        "p99_us": float(np.percentile(values, 99)),
        "samples": int(values.size),
    }


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage collection pauses inside timed loops (as timeit does)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold back Ctrl-C / SIGTERM while a cleanup step runs, so a second Ctrl-C
    cannot leave a daemon or a segment behind; they take effect after it.

    This swaps the Python-level handlers rather than blocking the signals:
    blocking (pthread_sigmask) would only cover the main thread, and a signal
    taken by any other thread (zmq's I/O threads, a Queue's feeder) still
    raises KeyboardInterrupt in the main thread."""
    caught: list[int] = []

    def hold(signum: int, frame: object) -> None:
        caught.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in caught[:1]:
            handler = previous[signal.Signals(signum)]
            if callable(handler):  # default_int_handler or _on_sigterm: raises
                handler(signum, None)


CLEANUP_PROBLEMS: list[str] = []


def cleanup(step: Callable[..., object], *args: Any) -> Callable[[], None]:
    """A cleanup callback for an ExitStack: runs `step` with signals deferred
    and records (instead of raising) what went wrong, so the other cleanups
    still run."""

    def run() -> None:
        with signals_deferred():
            try:
                step(*args)
            except Exception as exc:  # reported at the end, with the others
                CLEANUP_PROBLEMS.append(f"{getattr(step, '__qualname__', step)}: {exc!r}")

    return run


class Terminated(BaseException):
    """SIGTERM, turned into an exception so every finally block runs."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def recv_within(conn: Connection, timeout_s: float, what: str) -> Any:
    """conn.recv(), or RuntimeError naming `what` when nothing comes in time."""
    if not conn.poll(timeout_s):
        raise RuntimeError(f"{what} did not answer within {timeout_s:g} s")
    return conn.recv()


def tell(send: Callable[[Any], object], message: Any) -> None:
    """Send a stop message to a child that may be gone already (then the
    join / terminate / kill of stop_process ends it anyway)."""
    with contextlib.suppress(OSError, ValueError):
        send(message)


def ignore_sigint() -> None:
    """In child processes: Ctrl-C is the parent's business; it stops us cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# -- daemons -------------------------------------------------------------------


class Daemon:
    """One shmarena daemon started for this run, with its own runtime dir."""

    serial = 0

    def __init__(self, size: str, min_block: str, extra: Sequence[str] = ()) -> None:
        Daemon.serial += 1
        self.name = f"bench-{os.getpid()}-{Daemon.serial}"
        self.size = size
        self.min_block = min_block
        self.extra = list(extra)  # more daemon options (--backing ...)
        self.run_dir = tempfile.mkdtemp(prefix="shmb-")
        self.pid: int | None = None

    @property
    def shm_path(self) -> str:
        return shm_path(shm_name(self.name))

    def _command(self, *args: str) -> list[str]:
        """`python -m shmarena --name NAME --runtime-dir DIR ARGS...`"""
        return [
            sys.executable,
            "-m",
            "shmarena",
            "--name",
            self.name,
            "--runtime-dir",
            self.run_dir,
            *args,
        ]

    def start(self) -> None:
        command = self._command(
            "daemon", "--size", self.size, "--min-block", self.min_block, *self.extra, "--detach"
        )
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(
                f"daemon {self.name} did not start (exit {done.returncode}): "
                f"{done.stderr.strip() or done.stdout.strip()}"
            )
        client = self.connect(cache=False)
        try:
            self.pid = int(client.info["pid"])
        finally:
            client.close()

    def connect(self, cache: bool) -> shmarena.Client:
        return shmarena.connect(self.name, runtime_dir=self.run_dir, cache=cache)

    def rss_bytes(self) -> int:
        """The daemon's VmRSS."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _alive(self, pid: int) -> bool:
        """Alive, not a zombie, and still a shmarena daemon of this name (so
        a recycled pid is never signalled)."""
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, IndexError):
            return False
        return state != b"Z" and self.name.encode() in cmdline.split(b"\0")

    def _find_pid(self) -> int | None:
        """The pid of this daemon when start() did not learn it (it failed or
        timed out): the process whose command line is `... shmarena daemon
        --name NAME ...` with this run's unique NAME."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if b"daemon" in args and b"--name" in args:
                index = args.index(b"--name")
                if args[index + 1 : index + 2] == [self.name.encode()]:
                    return int(entry)
        return None

    def _wait_gone(self, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._alive(pid):
                return True
            time.sleep(0.02)
        return not self._alive(pid)

    def stop(self) -> None:
        """Shut the daemon down (CLI, then SIGTERM, then SIGKILL), make sure its
        arena is gone from /dev/shm, and remove the runtime dir."""
        pid = self.pid if self.pid is not None else self._find_pid()
        if pid is not None and self._alive(pid):
            try:
                done = subprocess.run(self._command("shutdown"), capture_output=True, timeout=60)
                asked = done.returncode == 0
            except subprocess.TimeoutExpired:
                asked = False
            # `shutdown` returns before the daemon has exited: wait for it, then
            # insist. SIGTERM stops it cleanly too; SIGKILL is the last resort.
            polite_s = 30.0 if asked else 0.0
            for sig, wait_s in ((None, polite_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
                if sig is not None and self._alive(pid):
                    os.kill(pid, sig)
                if self._wait_gone(pid, wait_s):
                    break
            else:
                CLEANUP_PROBLEMS.append(f"daemon {self.name} (pid {pid}) would not exit")
        if os.path.exists(self.shm_path):  # only if the daemon died without cleaning up
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_shared_memory(shm_name(self.name))
            CLEANUP_PROBLEMS.append(f"had to unlink {self.shm_path} for the daemon")
        shutil.rmtree(self.run_dir, ignore_errors=True)


def started_daemon(
    stack: contextlib.ExitStack, size: str, min_block: str, extra: Sequence[str] = ()
) -> Daemon:
    """Start a daemon whose shutdown is registered on `stack` first. Ctrl-C
    waits until the start is over (a second or so): interrupted half-way, the
    `--detach` command would be killed but not the daemon it had spawned."""
    daemon = Daemon(size, min_block, extra)
    stack.callback(cleanup(daemon.stop))
    with signals_deferred():
        daemon.start()
    return daemon


def connected(stack: contextlib.ExitStack, daemon: Daemon, cache: bool) -> shmarena.Client:
    client = daemon.connect(cache)
    stack.callback(cleanup(client.close))
    return client


# -- child processes -----------------------------------------------------------


def stop_process(process: SpawnProcess, timeout_s: float = 5.0) -> None:
    """Join; terminate and kill if it does not end by itself."""
    if process.pid is None:  # never started
        return
    process.join(timeout_s)
    if process.is_alive():
        process.terminate()
        process.join(2.0)
    if process.is_alive():
        process.kill()
        process.join(2.0)


def started_process(
    stack: contextlib.ExitStack,
    ctx: SpawnContext,
    target: Callable[..., None],
    args: tuple[Any, ...],
    name: str,
) -> SpawnProcess:
    process = ctx.Process(target=target, args=args, name=name, daemon=True)
    stack.callback(cleanup(stop_process, process))  # first, so no window is left open
    with signals_deferred():  # started, or not at all
        process.start()
    return process


def _echo_server(endpoint: str, ready: Connection) -> None:
    """The transport floor's server: a ROUTER that echoes each message back,
    handling the two frames (peer id, message) by hand."""
    ignore_sigint()
    context = zmq.Context()
    s = context.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    s.bind(endpoint)
    ready.send_bytes(ACK)
    try:
        while True:
            ident = s.recv()
            m = s.recv()
            s.send(ident, zmq.SNDMORE)
            s.send(m)
            if m == b"stop":
                break
    finally:
        s.close(linger=0)
        context.term()


def _throughput_worker(
    conn: Connection,
    name: str,
    run_dir: str,
    size: int,
    barriers: dict[int, Barrier],
) -> None:
    """One client process of section 2: warm up on request, then run timed
    trials of N cached alloc+free pairs, started together through a barrier."""
    ignore_sigint()
    gc.disable()
    clock = time.perf_counter_ns
    client = shmarena.connect(name, runtime_dir=run_dir, cache=True)
    alloc = client.alloc
    try:
        conn.send(("ready", os.getpid()))
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            if message[0] == "warm":  # ("warm", seconds) -> pairs per second
                start = clock()
                end = start + int(message[1] * 1e9)
                pairs = 0
                while clock() < end:
                    for _ in range(10):
                        alloc(size).free()
                    pairs += 10
                client.sync()
                conn.send(pairs / ((clock() - start) / 1e9))
            elif message[0] == "run":  # ("run", clients, pairs) -> (start_ns, end_ns)
                _, clients, pairs = message
                barriers[clients].wait(timeout=CHILD_TIMEOUT_S)
                start = clock()
                for _ in range(pairs):
                    alloc(size).free()
                client.sync()  # "all done" includes the daemon applying every free
                conn.send((start, clock()))
    finally:
        client.close()


def _pipe_consumer(conn: Connection, name: str, run_dir: str) -> None:
    """The consumer of the Pipe handoffs: turn what arrives into a numpy array
    over the data, read its last element, ack with one byte."""
    ignore_sigint()
    client = shmarena.connect(name, runtime_dir=run_dir, cache=True)
    try:
        conn.send_bytes(ACK)
        while True:
            kind, payload, count, expected = conn.recv()
            if kind == "stop":
                break
            if kind == "shmarena":
                array = client.attach(shmarena.Handle(*payload)).ndarray((count,), np.float64)
                ok = bool(array[-1] == expected)
                del array
            elif kind == "shared_memory":
                segment = SharedMemory(name=payload)
                array = np.ndarray((count,), dtype=np.float64, buffer=segment.buf)
                ok = bool(array[-1] == expected)
                del array  # the array holds an export of segment.buf: drop it first
                segment.close()
            else:  # the token floor
                ok = payload == TOKEN
            conn.send_bytes(ACK if ok else NACK)
    finally:
        client.close()


def _queue_consumer(inbox: Any, outbox: Any) -> None:
    """The consumer of the Queue handoffs: the array (or the token) arrives
    pickled; read the last element, ack with one byte."""
    ignore_sigint()
    outbox.put(ACK)
    while True:
        kind, payload, expected = inbox.get()
        if kind == "stop":
            break
        ok = payload == TOKEN if kind == "token" else bool(payload[-1] == expected)
        del payload
        outbox.put(ACK if ok else NACK)


# -- interleaved measurement ------------------------------------------------------


@dataclass
class Variant:
    """One thing to time. `run(n)` does n operations (pairs, handoffs); one
    sample times `batch` of them and records the mean per operation in µs."""

    key: str
    run: Callable[[int], None]
    batch: int = 1
    per_chunk: int = 50  # samples per chunk (a chunk also stops at the time budget)
    warmup: int = 10
    after: Callable[[], None] | None = None  # after each chunk, untimed (e.g. sync)
    samples: list[float] = field(default_factory=list)
    chunk_starts: list[int] = field(default_factory=list)  # where each round's chunk begins

    def summary(self) -> dict[str, Any]:
        bounds = [*self.chunk_starts, len(self.samples)]
        rounds = [
            float(np.median(self.samples[a:b])) for a, b in itertools.pairwise(bounds) if b > a
        ]
        return {**summarize(self.samples), "ops_per_sample": self.batch, "round_medians": rounds}


def timed_chunk(variant: Variant, budget_s: float) -> None:
    clock = time.perf_counter_ns
    run, batch, out = variant.run, variant.batch, variant.samples
    minimum = min(MIN_SAMPLES_PER_CHUNK, variant.per_chunk)
    variant.chunk_starts.append(len(out))
    deadline = clock() + int(budget_s * 1e9)
    for done in range(1, variant.per_chunk + 1):
        t0 = clock()
        run(batch)
        t1 = clock()
        out.append((t1 - t0) / batch / 1e3)
        if t1 > deadline and done >= minimum:
            break
    if variant.after is not None:
        variant.after()


def interleave(variants: Sequence[Variant], rounds: int, budget_s: float) -> None:
    """Warm every variant up, then run `rounds` rounds of one chunk of every
    variant. The order rotates from round to round, so no variant always runs
    first or right after the same neighbour."""
    with gc_paused():
        for variant in variants:
            if variant.warmup:
                variant.run(variant.warmup)
            if variant.after is not None:
                variant.after()
        for r in range(rounds):
            shift = r * len(variants) // max(1, rounds)
            for variant in [*variants[shift:], *variants[:shift]]:
                timed_chunk(variant, budget_s)


def alloc_free(client: shmarena.Client, size: int) -> Callable[[int], None]:
    def run(count: int) -> None:
        alloc = client.alloc
        for _ in range(count):
            alloc(size).free()

    return run


def alloc_view_free(client: shmarena.Client, size: int) -> Callable[[int], None]:
    """The pair as code that uses its buffer does it: alloc, write through
    `view`, free (a view taken pins the block until it is gone)."""

    def run(count: int) -> None:
        alloc = client.alloc
        for _ in range(count):
            buf = alloc(size)
            buf.view[0] = 1
            buf.free()

    return run


def attach_only(client: shmarena.Client, handle: shmarena.Handle) -> Callable[[int], None]:
    """A plain attach of a live block's handle (no round trip; what it checks
    locally is all it costs)."""

    def run(count: int) -> None:
        attach = client.attach
        for _ in range(count):
            attach(handle)

    return run


def shm_create_unlink(size: int) -> Callable[[int], None]:
    def run(count: int) -> None:
        segment: SharedMemory | None = None
        try:
            for _ in range(count):
                segment = SharedMemory(create=True, size=size)
                segment.close()
                segment.unlink()
                segment = None
        finally:
            if segment is not None:  # interrupted between create and unlink
                with contextlib.suppress(Exception):
                    segment.close()
                with contextlib.suppress(Exception):
                    segment.unlink()

    return run


def zmq_round_trip(dealer: zmq.Socket[Any]) -> Callable[[int], None]:
    def run(count: int) -> None:
        send, recv = dealer.send, dealer.recv
        for _ in range(count):
            send(FLOOR_MESSAGE)
            recv()

    return run


def pipe_handoff(conn: Connection, message: tuple[Any, ...]) -> Callable[[int], None]:
    def run(count: int) -> None:
        send, recv_bytes = conn.send, conn.recv_bytes
        for _ in range(count):
            send(message)
            if recv_bytes() != ACK:
                raise RuntimeError(f"the consumer could not read {message[0]} data")

    return run


def queue_handoff(inbox: Any, outbox: Any, message: tuple[Any, ...]) -> Callable[[int], None]:
    def run(count: int) -> None:
        put, get = inbox.put, outbox.get
        for _ in range(count):
            put(message)
            if get(timeout=CHILD_TIMEOUT_S) != ACK:
                raise RuntimeError(f"the consumer could not read the queued {message[0]}")

    return run


# -- the report ------------------------------------------------------------------


@dataclass
class Target:
    name: str
    value: float
    op: str  # "<=" or ">="
    limit: float
    unit: str  # how to show value and limit: "µs", "×" or "" (a fraction)

    @property
    def met(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    def shown(self, value: float) -> str:
        if self.unit == "µs":
            return f"{fmt_us(value)} µs"
        if self.unit == "×":
            return fmt_ratio(value)
        return "-" if math.isnan(value) else f"{value:.4f}"


@dataclass
class Report:
    """Every figure of the run, ready for JSON: sections, ratios, targets."""

    sections: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, dict[str, Any]] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)

    def ratio(
        self,
        key: str,
        value: float,
        better: str,
        meaning: str,
        rounds: Sequence[float] | None = None,
    ) -> float:
        """Record a ratio; `rounds`: the same ratio in each interleaved round
        (its spread is the run's own noise, which --compare takes into account)."""
        entry: dict[str, Any] = {"value": value, "better": better, "meaning": meaning}
        if rounds:
            entry["rounds"] = list(rounds)
        self.ratios[key] = entry
        return value

    def target(self, name: str, value: float, op: str, limit: float, unit: str) -> None:
        self.targets.append(Target(name, value, op, limit, unit))


def round_ratios(numerator: dict[str, Any], denominator: dict[str, Any]) -> list[float]:
    """A ratio of two variants, round by round (from their per-round medians)."""
    return divide_each(numerator.get("round_medians", ()), denominator.get("round_medians", ()))


def divide_each(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    # Every variant runs one chunk per round, so the lists are equally long.
    return [safe_div(a, b) for a, b in zip(numerators, denominators, strict=False)]


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "loadavg_at_start": list(os.getloadavg()),
        "versions": {
            "shmarena": shmarena.__version__,
            "numpy": np.__version__,
            "pyzmq": zmq.pyzmq_version(),
            "libzmq": zmq.zmq_version(),
            "msgpack": ".".join(map(str, msgpack.version)),
        },
    }
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            info["mem_total_bytes"] = int(f.readline().split()[1]) * 1024
    # GIT_OPTIONAL_LOCKS=0: a read-only look, never touching the index.
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )
        if done.returncode == 0:
            info["git"] = done.stdout.strip()
    return info


def new_table(title: str, *columns: str) -> Table:
    """A table whose first column is left aligned and the others right aligned;
    a column named with a leading "<" is left aligned too."""
    table = Table(title=title, title_justify="left")
    for index, column in enumerate(columns):
        left = index == 0 or column.startswith("<")
        table.add_column(column.lstrip("<"), justify="left" if left else "right")
    return table


def note(text: str) -> None:
    console.print(f"[dim]{text}[/dim]")


# -- section 1: alloc+free latency -------------------------------------------------


def section_latency(
    plan: Plan, daemon: Daemon, ctx: SpawnContext, scratch: str, report: Report
) -> None:
    note("1/8 alloc+free latency: cached, uncached, shared_memory, transport floor")
    with contextlib.ExitStack() as stack:
        cached = connected(stack, daemon, cache=True)
        uncached = connected(stack, daemon, cache=False)

        # The transport floor: an echo ROUTER in its own process, our DEALER.
        endpoint = f"ipc://{scratch}/echo.sock"
        ready_parent, ready_child = ctx.Pipe(duplex=False)
        echo = started_process(stack, ctx, _echo_server, (endpoint, ready_child), "bench-echo")
        ready_child.close()
        if not ready_parent.poll(CHILD_TIMEOUT_S):
            raise RuntimeError("the echo server did not start")
        ready_parent.recv_bytes()
        zctx: zmq.Context[Any] = zmq.Context()
        stack.callback(cleanup(zctx.term))  # runs after the socket is closed
        dealer = zctx.socket(zmq.DEALER)
        stack.callback(cleanup(dealer.close, 0))
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVTIMEO, int(CHILD_TIMEOUT_S * 1000))
        dealer.connect(endpoint)

        def stop_echo() -> None:
            if echo.is_alive():
                dealer.send(b"stop", zmq.NOBLOCK)
                if dealer.poll(2000):
                    dealer.recv()

        stack.callback(cleanup(stop_echo))

        def variant(
            key: str, run: Callable[[int], None], batch: int, after: Callable[[], None] | None
        ) -> Variant:
            return Variant(key, run, batch, plan.latency_samples, plan.warmup, after)

        variants: list[Variant] = []
        for size in LATENCY_SIZES:
            label = size_label(size)
            variants += [
                variant(f"cached@{label}", alloc_free(cached, size), CHEAP_BATCH, cached.sync),
                variant(
                    f"cached+view@{label}", alloc_view_free(cached, size), CHEAP_BATCH, cached.sync
                ),
                variant(f"uncached@{label}", alloc_free(uncached, size), 1, uncached.sync),
                variant(f"shared_memory@{label}", shm_create_unlink(size), CHEAP_BATCH, None),
            ]
        variants.append(variant("floor", zmq_round_trip(dealer), 1, None))
        held = uncached.alloc(64 * KiB)  # another session's block, as a reader meets it
        stack.callback(cleanup(held.free))
        variants.append(variant("attach", attach_only(cached, held.handle), CHEAP_BATCH, None))
        interleave(variants, plan.rounds, plan.chunk_budget_s)

    by_key = {v.key: v.summary() for v in variants}
    floor = by_key["floor"]
    table = new_table(
        f"1. alloc+free latency per pair ({plan.rounds} interleaved rounds)",
        "size",
        "<variant",
        "pairs/sample",
        "samples",
        "median µs",
        "p99 µs",
        "<ratio",
    )
    results: dict[str, Any] = {"floor": floor, "sizes": {}}
    for size in LATENCY_SIZES:
        label = size_label(size)
        row = {
            name: by_key[f"{name}@{label}"]
            for name in ("cached", "cached+view", "uncached", "shared_memory")
        }
        results["sizes"][label] = row
        faster = report.ratio(
            f"latency.cached_vs_shared_memory@{label}",
            safe_div(row["shared_memory"]["median_us"], row["cached"]["median_us"]),
            HIGHER,
            "x times faster: shared_memory median / cached median",
            round_ratios(row["shared_memory"], row["cached"]),
        )
        over_floor = report.ratio(
            f"latency.uncached_over_floor@{label}",
            safe_div(row["uncached"]["median_us"], floor["median_us"]),
            LOWER,
            "multiple of the floor: uncached median / ZeroMQ round-trip median",
            round_ratios(row["uncached"], floor),
        )
        ratios = {
            "cached": f"{fmt_ratio(faster)} faster than shared_memory",
            "cached+view": "writes one byte through view",
            "uncached": f"{fmt_ratio(over_floor)} floor",
            "shared_memory": "",
        }
        for name, figures in row.items():
            table.add_row(
                label,
                name,
                str(figures["ops_per_sample"]),
                str(figures["samples"]),
                fmt_us(figures["median_us"]),
                fmt_us(figures["p99_us"]),
                ratios[name],
            )
        table.add_section()
    results["attach"] = by_key["attach"]
    table.add_row(
        "64 KiB",
        "attach (plain, no round trip)",
        str(by_key["attach"]["ops_per_sample"]),
        str(by_key["attach"]["samples"]),
        fmt_us(by_key["attach"]["median_us"]),
        fmt_us(by_key["attach"]["p99_us"]),
        "",
    )
    table.add_row(
        "30 B",
        "transport floor (ZeroMQ round trip)",
        "1",
        str(floor["samples"]),
        fmt_us(floor["median_us"]),
        fmt_us(floor["p99_us"]),
        "",
    )
    console.print(table)
    report.sections["latency"] = results

    at64 = results["sizes"]["64KiB"]
    report.target("cached 64 KiB alloc+free median", at64["cached"]["median_us"], "<=", 3, "µs")
    report.target(
        "cached vs shared_memory at 64 KiB (x faster)",
        report.ratios["latency.cached_vs_shared_memory@64KiB"]["value"],
        ">=",
        30,
        "×",
    )
    for label in ("4KiB", "64KiB"):
        report.target(
            f"uncached over the floor at {label.replace('KiB', ' KiB')}",
            report.ratios[f"latency.uncached_over_floor@{label}"]["value"],
            "<=",
            1.3,
            "×",
        )


# -- section 2: throughput with 1 and 2 client processes ---------------------------------


def section_throughput(plan: Plan, daemon: Daemon, ctx: SpawnContext, report: Report) -> None:
    note("2/8 cached alloc+free throughput with 1 and 2 client processes")
    barriers = {1: ctx.Barrier(1), 2: ctx.Barrier(2)}
    trials: dict[int, list[float]] = {1: [], 2: []}
    with contextlib.ExitStack() as stack:
        conns: list[Connection] = []
        for index in range(2):
            parent, child = ctx.Pipe()
            started_process(
                stack,
                ctx,
                _throughput_worker,
                (child, daemon.name, daemon.run_dir, THROUGHPUT_SIZE, barriers),
                f"bench-worker-{index}",
            )
            child.close()
            stack.callback(cleanup(tell, parent.send, ("stop",)))
            conns.append(parent)
        for index, conn in enumerate(conns):
            recv_within(conn, CHILD_TIMEOUT_S, f"throughput worker {index}")
        # Warm up one worker at a time; the first one's rate sizes the trials so a
        # single-client trial lasts about plan.throughput_trial_s.
        rates = []
        for index, conn in enumerate(conns):
            conn.send(("warm", 0.2 if plan.quick else 0.5))
            rates.append(float(recv_within(conn, CHILD_TIMEOUT_S, f"worker {index} warm-up")))
        pairs = max(50, int(rates[0] * plan.throughput_trial_s))

        for r in range(plan.rounds):
            for _ in range(plan.throughput_trials):
                for clients in (1, 2) if r % 2 == 0 else (2, 1):
                    for conn in conns[:clients]:
                        conn.send(("run", clients, pairs))
                    spans = [
                        recv_within(conn, CHILD_TIMEOUT_S, "throughput worker")
                        for conn in conns[:clients]
                    ]
                    start = min(s for s, _ in spans)
                    end = max(e for _, e in spans)
                    trials[clients].append(clients * pairs / ((end - start) / 1e9))

    table = new_table(
        f"2. cached alloc+free throughput at 64 KiB ({pairs} pairs per client per trial)",
        "clients",
        "trials",
        "median ops/s",
        "min ops/s",
        "max ops/s",
        "µs per op",
        "<ratio",
    )
    results: dict[str, Any] = {"pairs_per_client": pairs, "warmup_rates": rates}
    medians = {c: float(np.median(trials[c])) for c in trials}
    ratio = report.ratio(
        "throughput.2_clients_over_1",
        safe_div(medians[2], medians[1]),
        HIGHER,
        "x aggregate throughput: 2 client processes / 1 (median ops/s)",
    )
    for clients in (1, 2):
        values = trials[clients]
        results[f"{clients}_clients"] = {
            "median_ops_per_s": medians[clients],
            "min_ops_per_s": min(values),
            "max_ops_per_s": max(values),
            "trials": len(values),
            "ops_per_s": values,
        }
        table.add_row(
            str(clients),
            str(len(values)),
            f"{medians[clients]:,.0f}",
            f"{min(values):,.0f}",
            f"{max(values):,.0f}",
            fmt_us(1e6 / medians[clients]),
            f"{fmt_ratio(ratio)} one client" if clients == 2 else "",
        )
    console.print(table)
    report.sections["throughput"] = results
    report.target("2 clients over 1 client (aggregate)", ratio, ">=", 1.7, "×")


# -- section 3: producer -> consumer handoff ----------------------------------------------


def section_handoff(plan: Plan, daemon: Daemon, ctx: SpawnContext, report: Report) -> None:
    note("3/8 producer -> consumer handoff of 1, 16, 256 MiB numpy arrays")
    with contextlib.ExitStack() as stack:
        # The consumers: one on a duplex Pipe, one on a pair of Queues. Cleanup
        # runs last-registered first: stop message, then join, then close.
        conn, child = ctx.Pipe()
        started_process(
            stack, ctx, _pipe_consumer, (child, daemon.name, daemon.run_dir), "bench-pipe-consumer"
        )
        child.close()
        stack.callback(cleanup(tell, conn.send, ("stop", None, 0, 0.0)))
        inbox, outbox = ctx.Queue(), ctx.Queue()

        def close_queues() -> None:
            # The consumer is gone by now: nothing still queued is wanted, so do
            # not wait for the feeder threads to push it into the pipes.
            for queue in (inbox, outbox):
                queue.cancel_join_thread()
                queue.close()

        stack.callback(cleanup(close_queues))
        started_process(stack, ctx, _queue_consumer, (inbox, outbox), "bench-queue-consumer")
        stack.callback(cleanup(tell, inbox.put, ("stop", None, 0.0)))
        producer = connected(stack, daemon, cache=True)
        # The same consumer on a pair of shmarena.Queues (they travel by name).
        sinbox, soutbox = shmarena.Queue(client=producer), shmarena.Queue(client=producer)
        stack.callback(cleanup(soutbox.close))
        stack.callback(cleanup(sinbox.close))
        started_process(stack, ctx, _queue_consumer, (sinbox, soutbox), "bench-squeue-consumer")
        stack.callback(cleanup(tell, sinbox.put, ("stop", None, 0.0)))
        if not conn.poll(CHILD_TIMEOUT_S) or conn.recv_bytes() != ACK:
            raise RuntimeError("the pipe consumer did not start")
        if outbox.get(timeout=CHILD_TIMEOUT_S) != ACK:
            raise RuntimeError("the queue consumer did not start")
        if soutbox.get(timeout=CHILD_TIMEOUT_S) != ACK:
            raise RuntimeError("the shmarena.Queue consumer did not start")

        variants: list[Variant] = [
            Variant(
                "pipe_token",
                pipe_handoff(conn, ("token", TOKEN, 0, 0.0)),
                per_chunk=plan.handoff_samples,
                warmup=plan.warmup,
            ),
            Variant(
                "queue_token",
                queue_handoff(inbox, outbox, ("token", TOKEN, 0.0)),
                per_chunk=plan.handoff_samples,
                warmup=plan.warmup,
            ),
        ]
        for size in HANDOFF_SIZES:
            label = size_label(size)
            count = size // 8
            expected = float(count - 1)  # the last element of arange(count)
            # Every array is created and filled once, outside the timing.
            buf = producer.alloc(size)
            stack.callback(cleanup(buf.free))
            resident = buf.ndarray((count,), np.float64)
            resident[:] = np.arange(count, dtype=np.float64)
            with signals_deferred():  # no Ctrl-C between creating and registering
                segment = SharedMemory(create=True, size=size)
                stack.callback(cleanup(segment.unlink))
                stack.callback(cleanup(segment.close))
            view = np.ndarray((count,), dtype=np.float64, buffer=segment.buf)
            view[:] = np.arange(count, dtype=np.float64)
            del view  # segment.close() needs every export of segment.buf gone
            plain = np.arange(count, dtype=np.float64)
            variants += [
                Variant(
                    f"shmarena@{label}",
                    pipe_handoff(conn, ("shmarena", tuple(buf.handle), count, expected)),
                    per_chunk=plan.handoff_samples,
                    warmup=plan.warmup,
                ),
                Variant(
                    f"shared_memory@{label}",
                    pipe_handoff(conn, ("shared_memory", segment.name, count, expected)),
                    per_chunk=plan.handoff_samples,
                    warmup=plan.warmup,
                ),
                Variant(
                    f"queue@{label}",
                    queue_handoff(inbox, outbox, ("array", plain, expected)),
                    per_chunk=plan.queue_samples[size],
                    warmup=1,
                ),
                Variant(
                    f"squeue@{label}",
                    queue_handoff(sinbox, soutbox, ("array", resident, expected)),
                    per_chunk=plan.handoff_samples,
                    warmup=plan.warmup,
                ),
                Variant(
                    f"squeue_copy@{label}",
                    queue_handoff(sinbox, soutbox, ("array", plain, expected)),
                    per_chunk=plan.queue_samples[size],
                    warmup=1,
                ),
            ]
        interleave(variants, plan.rounds, plan.chunk_budget_s)

    by_key = {v.key: v.summary() for v in variants}
    floors = {"pipe": by_key["pipe_token"], "queue": by_key["queue_token"]}
    table = new_table(
        f"3. handoff producer -> consumer, round trip ({plan.rounds} interleaved rounds)",
        "size",
        "<variant",
        "samples",
        "median µs",
        "p99 µs",
        "over token floor",
    )
    results: dict[str, Any] = {
        "floor_pipe_token": floors["pipe"],
        "floor_queue_token": floors["queue"],
        "sizes": {},
    }
    for size in HANDOFF_SIZES:
        label = size_label(size)
        row: dict[str, Any] = {}
        for name, floor_kind in (
            ("shmarena", "pipe"),
            ("shared_memory", "pipe"),
            ("queue", "queue"),
            ("squeue", "queue"),
            ("squeue_copy", "queue"),
        ):
            figures = dict(by_key[f"{name}@{label}"])
            figures["over_floor"] = report.ratio(
                f"handoff.{name}_over_floor@{label}",
                safe_div(figures["median_us"], floors[floor_kind]["median_us"]),
                LOWER,
                f"multiple of the token floor: {name} median / {floor_kind} token median",
                round_ratios(figures, floors[floor_kind]),
            )
            row[name] = figures
            table.add_row(
                label,
                QUEUE_ROWS.get(name, name),
                str(figures["samples"]),
                fmt_us(figures["median_us"]),
                fmt_us(figures["p99_us"]),
                fmt_ratio(figures["over_floor"]),
            )
        report.ratio(
            f"handoff.queue_vs_shmarena@{label}",
            safe_div(row["queue"]["median_us"], row["shmarena"]["median_us"]),
            HIGHER,
            "x times faster: Queue median / shmarena median",
            round_ratios(row["queue"], row["shmarena"]),
        )
        for name in ("squeue", "squeue_copy"):
            report.ratio(
                f"handoff.queue_vs_{name}@{label}",
                safe_div(row["queue"]["median_us"], row[name]["median_us"]),
                HIGHER,
                f"x times faster: multiprocessing.Queue median / {QUEUE_ROWS[name]} median",
                round_ratios(row["queue"], row[name]),
            )
        results["sizes"][label] = row
        table.add_section()
    for kind, text in (
        ("pipe", "token floor: 8 B via Pipe"),
        ("queue", "token floor: 8 B via Queue"),
    ):
        table.add_row(
            "8 B",
            text,
            str(floors[kind]["samples"]),
            fmt_us(floors[kind]["median_us"]),
            fmt_us(floors[kind]["p99_us"]),
            "1×",
        )
    console.print(table)
    big, small = size_label(HANDOFF_SIZES[-1]), size_label(HANDOFF_SIZES[0])
    flat = report.ratio(
        "handoff.shmarena_256MiB_over_1MiB",
        safe_div(
            report.ratios[f"handoff.shmarena_over_floor@{big}"]["value"],
            report.ratios[f"handoff.shmarena_over_floor@{small}"]["value"],
        ),
        LOWER,
        "shmarena's over-floor ratio at 256 MiB / at 1 MiB (1.0: size does not matter)",
        divide_each(
            report.ratios[f"handoff.shmarena_over_floor@{big}"].get("rounds", ()),
            report.ratios[f"handoff.shmarena_over_floor@{small}"].get("rounds", ()),
        ),
    )
    versus_queue = report.ratios[f"handoff.queue_vs_shmarena@{big}"]["value"]
    console.print(
        f"shmarena handoff, over-floor ratio 256 MiB / 1 MiB: {fmt_ratio(flat)}; "
        f"Queue time / shmarena time at 256 MiB: {fmt_ratio(versus_queue)}"
    )
    squeue = report.ratios[f"handoff.queue_vs_squeue@{big}"]["value"]
    console.print(
        f"multiprocessing.Queue time / shmarena.Queue time at 256 MiB: {fmt_ratio(squeue)} "
        f"(array in the arena), "
        f"{fmt_ratio(report.ratios[f'handoff.queue_vs_squeue_copy@{big}']['value'])} "
        "(a plain array, copied into the arena once)"
    )
    report.sections["handoff"] = results
    report.target("shmarena.Queue vs multiprocessing.Queue at 256 MiB", squeue, ">=", 500, "×")
    report.target("handoff 256 MiB over 1 MiB (over the token floor)", flat, "<=", 1.2, "×")
    report.target("shmarena vs Queue at 256 MiB (x faster)", versus_queue, ">=", 1000, "×")


# -- section 4: memory efficiency ------------------------------------------------------------


class SizeStream:
    """Request sizes, log-uniform between 4 KiB and 4 MiB, from a fixed seed.
    Sizes drawn for a batch but not used are given back, so the sequence of
    requests is exactly the one a one-at-a-time loop would make."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.pending: deque[int] = deque()

    def take(self, count: int) -> list[int]:
        out = [self.pending.popleft() for _ in range(min(count, len(self.pending)))]
        out += [int(2 ** self.rng.uniform(12, 22)) for _ in range(count - len(out))]
        return out

    def give_back(self, sizes: Sequence[int]) -> None:
        self.pending.extendleft(reversed(sizes))


def fill_until_oom(client: shmarena.Client, stream: SizeStream, live: list[shmarena.Buffer]) -> int:
    """Allocate the stream's sizes until the first OutOfMemory; returns the
    size that failed. alloc_many is all-or-none, so when a batch fails its
    sizes are retried one at a time up to the first failure."""
    while True:
        sizes = stream.take(EFFICIENCY_CHUNK)
        try:
            live.extend(client.alloc_many(sizes))
            continue
        except shmarena.OutOfMemory:
            pass
        for index, size in enumerate(sizes):
            try:
                live.append(client.alloc(size))
            except shmarena.OutOfMemory:
                stream.give_back(sizes[index + 1 :])
                return size
        # The batch failed but every single alloc succeeded (the batch's rollback
        # may leave free blocks in another order): keep filling.


def section_memory(plan: Plan, report: Report) -> None:
    note("4/8 memory efficiency of a fresh 1 GiB arena (uncached), then 10 rounds of churn")
    phases: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        daemon = started_daemon(stack, "1G", "4K")
        client = connected(stack, daemon, cache=False)
        stream = SizeStream(SEED)
        churn = random.Random(SEED + 1)
        live: list[shmarena.Buffer] = []
        arena = int(client.info["size_bytes"])

        def record(phase: str, failed: int) -> None:
            stats = client.stats()
            requested = sum(b.size for b in live)
            if requested != stats["requested_bytes"]:
                raise RuntimeError(
                    f"the daemon counts {stats['requested_bytes']} requested bytes, "
                    f"the benchmark holds {requested}"
                )
            phases.append(
                {
                    "phase": phase,
                    "live_buffers": len(live),
                    "requested_bytes": requested,
                    "efficiency": requested / arena,
                    "used_bytes": stats["used_bytes"],
                    "largest_free_bytes": stats["largest_free_bytes"],
                    "free_bytes": stats["free_bytes"],
                    "failed_request_bytes": failed,
                }
            )

        with gc_paused():
            record("first failure", fill_until_oom(client, stream, live))
            for round_index in range(1, CHURN_ROUNDS + 1):
                victims = set(churn.sample(range(len(live)), len(live) // 2))
                freeing = [b for i, b in enumerate(live) if i in victims]
                live = [b for i, b in enumerate(live) if i not in victims]
                for start in range(0, len(freeing), MAX_BATCH):  # one request in practice
                    client.free(freeing[start : start + MAX_BATCH])
                record(f"churn {round_index}", fill_until_oom(client, stream, live))

    table = new_table(
        "4. memory efficiency: bytes requested and obtained / arena size (1 GiB, min block 4 KiB)",
        "<phase",
        "live buffers",
        "requested MiB",
        "efficiency",
        "carved MiB",
        "largest free",
        "failed request",
    )
    for phase in phases:
        table.add_row(
            phase["phase"],
            str(phase["live_buffers"]),
            f"{phase['requested_bytes'] / MiB:,.1f}",
            f"{phase['efficiency']:.4f}",
            f"{phase['used_bytes'] / MiB:,.1f}",
            size_label(phase["largest_free_bytes"]) if phase["largest_free_bytes"] else "0",
            f"{phase['failed_request_bytes'] / KiB:,.0f} KiB",
        )
    console.print(table)
    first = phases[0]["efficiency"]
    after = [p["efficiency"] for p in phases[1:]]
    report.sections["memory"] = {
        "seed": SEED,
        "arena_bytes": arena,
        "phases": phases,
        "first_failure": first,
        "churn_min": min(after),
        "churn_last": after[-1],
    }
    report.ratio("memory.efficiency_first_failure", first, HIGHER, "fraction of the arena")
    report.ratio("memory.efficiency_churn_min", min(after), HIGHER, "fraction of the arena")
    report.ratio("memory.efficiency_churn_last", after[-1], HIGHER, "fraction of the arena")
    console.print(
        f"efficiency at first failure {first:.4f}; after churn: min {min(after):.4f}, "
        f"last {after[-1]:.4f}"
    )
    report.target("memory efficiency at first failure", first, ">=", 0.98, "")
    report.target(
        "memory efficiency after churn (minimum of 10 rounds)", min(after), ">=", 0.90, ""
    )


# -- section 5: scale ------------------------------------------------------------------------


def hold_blocks(client: shmarena.Client, count: int) -> list[shmarena.Buffer]:
    """`count` live 64-byte blocks, made 4096 per request."""
    held: list[shmarena.Buffer] = []
    while len(held) < count:
        held.extend(client.alloc_many([64] * min(MAX_BATCH, count - len(held))))
    return held


def release_blocks(client: shmarena.Client, held: list[shmarena.Buffer]) -> None:
    """Free what hold_blocks made, 4096 per request, so that closing the client
    does not ask the daemon to recycle a million blocks in one request."""
    for start in range(0, len(held), MAX_BATCH):
        client.free(held[start : start + MAX_BATCH])
    held.clear()


def section_scale(plan: Plan, report: Report) -> None:
    big = plan.scale_blocks
    small_label, big_label = count_label(SCALE_SMALL), count_label(big)
    quick_note = " (--quick: 100 000 live blocks instead of 1 000 000)" if plan.quick else ""
    note(f"5/8 scale: 64 KiB alloc+free with {SCALE_SMALL:,} and {big:,} live blocks{quick_note}")
    # Two daemons side by side (256 MiB, min block 64 B), one holding 1 000 live
    # blocks and one holding `big`, so both states are measured interleaved.
    variants: list[Variant] = []
    rss: dict[str, int] = {}
    live_blocks: dict[str, int] = {}
    with contextlib.ExitStack() as stack, gc_paused():
        for label, count in ((small_label, SCALE_SMALL), (big_label, big)):
            daemon = started_daemon(stack, "256M", "64")
            holder = connected(stack, daemon, cache=False)
            held = hold_blocks(holder, count)
            stack.callback(cleanup(release_blocks, holder, held))
            stats = holder.stats()
            live_blocks[label] = int(stats["live_blocks"])
            rss[label] = daemon.rss_bytes()
            for cache in (True, False):
                client = connected(stack, daemon, cache=cache)
                name = "cached" if cache else "uncached"
                variants.append(
                    Variant(
                        f"{name}@{label}",
                        alloc_free(client, SCALE_SIZE),
                        batch=CHEAP_BATCH if cache else 1,
                        per_chunk=plan.latency_samples,
                        warmup=plan.warmup,
                        after=client.sync,
                    )
                )
        interleave(variants, plan.rounds, plan.chunk_budget_s)

    by_key = {v.key: v.summary() for v in variants}
    table = new_table(
        f"5. scale: 64 KiB alloc+free, daemons with {SCALE_SMALL:,} and {big:,} live blocks"
        + (" (--quick)" if plan.quick else ""),
        "live blocks",
        "<variant",
        "samples",
        "median µs",
        "p99 µs",
        "<ratio",
    )
    results: dict[str, Any] = {
        "live_blocks": live_blocks,
        "daemon_rss_bytes": rss,
        "big_count": big,
        "latency": by_key,
    }
    for name in ("cached", "uncached"):
        ratio = report.ratio(
            f"scale.{name}_latency_{big_label}_over_{small_label}",
            safe_div(
                by_key[f"{name}@{big_label}"]["median_us"],
                by_key[f"{name}@{small_label}"]["median_us"],
            ),
            LOWER,
            f"{name} median with {big:,} live blocks / with {SCALE_SMALL:,}",
            round_ratios(by_key[f"{name}@{big_label}"], by_key[f"{name}@{small_label}"]),
        )
        for label in (small_label, big_label):
            figures = by_key[f"{name}@{label}"]
            table.add_row(
                f"{live_blocks[label]:,}",
                name,
                str(figures["samples"]),
                fmt_us(figures["median_us"]),
                fmt_us(figures["p99_us"]),
                f"{fmt_ratio(ratio)} the {SCALE_SMALL:,}-block latency"
                if label == big_label
                else "",
            )
        table.add_section()
        report.target(
            f"scale {name}: latency {big_label} over {small_label}", ratio, "<=", 1.5, "×"
        )
    rss_ratio = report.ratio(
        f"scale.rss_{big_label}_over_{small_label}",
        safe_div(rss[big_label], rss[small_label]),
        LOWER,
        f"daemon VmRSS with {big:,} live blocks / with {SCALE_SMALL:,}",
    )
    for label in (small_label, big_label):
        table.add_row(
            f"{live_blocks[label]:,}",
            "daemon RSS",
            "",
            f"{rss[label] / MiB:,.1f} MiB",
            "",
            f"{fmt_ratio(rss_ratio)}" if label == big_label else "",
        )
    console.print(table)
    report.sections["scale"] = results


# -- section 6: the cost of a persistent table -------------------------------------------

PERSIST_SIZE = 64 * KiB


def section_persist(plan: Plan, report: Report) -> None:
    """Alloc+free against daemons whose arena is a backing file, by
    durability: none (the table is written only at a clean stop), batch (one
    journal write + fdatasync per loop wake-up, before its replies) and sync
    (per request). The files lie on tmpfs, so the figures are the cost of the
    bookkeeping and the system calls; `batch-disk` puts one on the disk of
    the scratch dir (ext4 here), where fdatasync waits for the device."""
    note("6/8 persistent backing: alloc+free by durability (tmpfs files, one on disk)")
    modes = {"none": "/dev/shm", "batch": "/dev/shm", "sync": "/dev/shm", "batch-disk": None}
    with contextlib.ExitStack() as stack:
        clients: dict[str, tuple[shmarena.Client, shmarena.Client]] = {}
        for mode, where in modes.items():
            folder = tempfile.mkdtemp(prefix=f"shmb-backing-{os.getpid()}-", dir=where)
            stack.callback(cleanup(shutil.rmtree, folder, True))
            durability = mode.split("-")[0]
            extra = ["--backing", os.path.join(folder, "arena"), "--durability", durability]
            daemon = started_daemon(stack, "256M", "4K", extra)
            clients[mode] = (connected(stack, daemon, True), connected(stack, daemon, False))
        variants: list[Variant] = []
        for mode, (cached, uncached) in clients.items():
            variants += [
                Variant(
                    f"cached@{mode}", alloc_free(cached, PERSIST_SIZE), CHEAP_BATCH,
                    plan.latency_samples, plan.warmup, cached.sync,
                ),
                Variant(
                    f"uncached@{mode}", alloc_free(uncached, PERSIST_SIZE), 1,
                    plan.latency_samples, plan.warmup, uncached.sync,
                ),
            ]  # fmt: skip
        interleave(variants, plan.rounds, plan.chunk_budget_s)
        syncs = {mode: c[1].stats()["journal_syncs"] for mode, c in clients.items()}
    by_key = {v.key: v.summary() for v in variants}
    table = new_table(
        f"6. alloc+free of {size_label(PERSIST_SIZE)} on a backing file, by durability "
        f"({plan.rounds} interleaved rounds)",
        "durability",
        "<path",
        "samples",
        "median µs",
        "p99 µs",
        "<vs none",
    )
    results: dict[str, Any] = {}
    for mode in modes:
        for path in ("cached", "uncached"):
            row = by_key[f"{path}@{mode}"]
            results[f"{path}@{mode}"] = row
            base = by_key[f"{path}@none"]
            shown = ""
            if mode != "none":
                ratio = report.ratio(
                    f"persist.{path}_{mode}_over_none",
                    safe_div(row["median_us"], base["median_us"]),
                    LOWER,
                    f"multiple of durability none: {path} median with {mode} / with none",
                    round_ratios(row, base),
                )
                shown = f"{fmt_ratio(ratio)} of none"
            table.add_row(
                mode, path, str(row["samples"]), fmt_us(row["median_us"]),
                fmt_us(row["p99_us"]), shown,
            )  # fmt: skip
        table.add_section()
    console.print(table)
    results["journal_syncs"] = syncs
    report.sections["persist"] = results
    report.target(
        "uncached alloc+free, batch durability on tmpfs (x none)",
        report.ratios["persist.uncached_batch_over_none"]["value"],
        "<=",
        2.0,
        "×",
    )
    report.target(
        "cached alloc+free, batch durability on tmpfs (x none)",
        report.ratios["persist.cached_batch_over_none"]["value"],
        "<=",
        1.15,
        "×",
    )


# -- 7. pages: first-touch cost ----------------------------------------------------


def _touch_worker(where: dict[str, Any], populate: bool, conn: Connection) -> None:
    """In a fresh process, as a client does: map the segment (with
    MAP_POPULATE when `populate`), then write one byte per 4 KiB page.
    Sends (map seconds, touch seconds)."""
    from shmarena.shm.arena import map_segment
    from shmarena.shm.backing import map_file

    size = int(where["size"])
    t0 = time.perf_counter()
    if "shm" in where:
        mapping = map_segment(where["shm"], size, populate)
    else:
        mapping = map_file(where["path"], size, int(where.get("offset", 0)), populate)
    t1 = time.perf_counter()
    pages = np.frombuffer(mapping, dtype=np.uint8)
    pages[::4096] = 1
    t2 = time.perf_counter()
    del pages
    mapping.close()
    conn.send((t1 - t0, t2 - t1))
    conn.close()


def _touched_in_child(
    ctx: SpawnContext, where: dict[str, Any], populate: bool
) -> tuple[float, float]:
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_touch_worker, args=(where, populate, child))
    process.start()
    child.close()
    try:
        return recv_within(parent, CHILD_TIMEOUT_S, "a first-touch child")  # type: ignore[no-any-return]
    finally:
        stop_process(process)


@contextlib.contextmanager
def huge_pages_for(size: int) -> Iterator[dict[str, str]]:
    """Huge pages for this section: those the machine offers, or, as root, a
    temporary reservation and hugetlbfs mount plus shmem THP = advise, all
    put back afterwards. Yields kind -> why it is missing ("" = available)."""
    from shmarena.shm import hugepages

    survey = hugepages.survey()
    changes: list[Callable[[], object]] = []
    mount = ""
    try:
        if os.geteuid() == 0 and os.access(hugepages.NR_HUGEPAGES, os.W_OK):
            with open(hugepages.NR_HUGEPAGES) as f:
                old_nr = f.read().strip()
            with open(hugepages.SHMEM_ENABLED) as f:
                old_shmem = hugepages.selected(f.read())

            def put(path: str, value: str) -> None:
                with open(path, "w") as f:
                    f.write(value)

            pages = int(old_nr) + size // survey.default_page_bytes
            put(hugepages.NR_HUGEPAGES, str(pages))
            changes.append(lambda: put(hugepages.NR_HUGEPAGES, old_nr))
            put(hugepages.SHMEM_ENABLED, "advise")
            changes.append(lambda: put(hugepages.SHMEM_ENABLED, old_shmem))
            mount = tempfile.mkdtemp(prefix="shmb-huge-")
            changes.append(lambda: os.rmdir(mount))  # undone last: after the umount
            done = subprocess.run(["mount", "-t", "hugetlbfs", "none", mount], capture_output=True)
            if done.returncode == 0:
                changes.append(lambda: subprocess.run(["umount", mount], check=False))
            note(
                f"(as root: reserved {pages} huge pages, mounted hugetlbfs at {mount} and set "
                "shmem_enabled to advise for this section; all put back afterwards)"
            )
            survey = hugepages.survey()
        missing = {}
        plan = hugepages.plan(survey, size, False)
        has_mount = any(
            survey.pools.get(page) and survey.pools[page].available * page >= size  # type: ignore[operator]
            for _, page in survey.mounts
        )
        missing["hugetlbfs"] = "" if has_mount else (plan if isinstance(plan, str) else "no pages")
        thp = survey.shmem_enabled in ("always", "within_size", "advise", "force")
        missing["thp"] = "" if thp else f"shmem_enabled is [{survey.shmem_enabled}]"
        yield missing
    finally:
        for undo in reversed(changes):
            with contextlib.suppress(OSError):
                undo()


def section_pages(plan: Plan, report: Report) -> None:
    """What the first touch of an arena's pages costs, per GiB, and who
    pays it: the daemon when it makes the segment (fallocate allocates the
    pages; pre-faulting, as --numa-node and --hugepages do, also maps them),
    and each client process when it first writes a page (or up front with
    connect(populate=True), MAP_POPULATE). `no pre-fault` is a bare shm
    segment sized with ftruncate, the cost shmarena avoids paying lazily. Each
    row: median over `rounds` fresh segments, each touched by a fresh process."""
    from shmarena.shm import numa
    from shmarena.shm.arena import Arena, Pages

    size = (256 if plan.quick else 1024) * MiB
    gib = size / (1 << 30)
    note(f"7/8 pages: first touch of a {size_label(size)} segment, ms per GiB")
    ctx = mp.get_context("spawn")
    serial = itertools.count()
    rows: dict[str, dict[str, list[float]]] = {}

    def measure(label: str, pages: Pages | None, populate: bool) -> None:
        name = f"/shmarena-bench-{os.getpid()}-p{next(serial)}"
        t0 = time.perf_counter()
        if pages is None:  # the reference: ftruncate only, nothing allocated
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=size)
            shm.close_fd()
            where: dict[str, Any] = {"shm": name, "size": size}
            arena = None
        else:
            arena = Arena.create(name, size, None, pages)
            where = {"index": 0, **arena.locator}
        made = time.perf_counter() - t0
        try:
            mapped, touched = _touched_in_child(ctx, where, populate)
        finally:
            if arena is not None:
                arena.close(unlink=True)
            else:
                posix_ipc.unlink_shared_memory(name)
        row = rows.setdefault(label, {"make": [], "map": [], "touch": []})
        for key, seconds in (("make", made), ("map", mapped), ("touch", touched)):
            row[key].append(seconds * 1000 / gib)

    with huge_pages_for(size) as missing:
        variants: list[tuple[str, Pages | None, bool]] = [
            ("no pre-fault (bare ftruncate), client touches", None, False),
            ("shm (default), client touches", Pages(), False),
            ("shm (default), client populate=True", Pages(), True),
            ("shm pre-faulted (--numa-node 0), client touches",
             Pages(numa_policy=numa.MPOL_BIND, numa_nodes=(0,), prefault=True), False),
        ]  # fmt: skip
        from shmarena.shm import hugepages

        survey = hugepages.survey()
        if not missing["hugetlbfs"]:
            point, page = next(
                (p, b) for p, b in survey.mounts
                if (pool := survey.pools.get(b)) and pool.available * b >= size
            )  # fmt: skip
            variants.append(("hugetlbfs 2 MiB, client touches",
                             Pages("hugetlbfs", point, page, prefault=True), False))  # fmt: skip
        if not missing["thp"]:
            variants.append(("shmem THP (memfd), client touches",
                             Pages("memfd", page_bytes=survey.thp_bytes, thp=True,
                                   prefault=True), False))  # fmt: skip
        for _ in range(plan.rounds):
            for label, pages, populate in variants:
                measure(label, pages, populate)
    table = new_table(
        f"7. first touch of a {size_label(size)} arena, ms per GiB (median of {plan.rounds})",
        "<variant",
        "daemon makes",
        "client maps",
        "client touches",
        "client total",
        "all",
    )
    results: dict[str, Any] = {}
    for label, row in rows.items():
        medians = {key: float(np.median(values)) for key, values in row.items()}
        client = medians["map"] + medians["touch"]
        results[label] = {**medians, "client_ms_per_gib": client, "samples": row}
        table.add_row(
            label, f"{medians['make']:.0f}", f"{medians['map']:.0f}", f"{medians['touch']:.0f}",
            f"{client:.0f}", f"{client + medians['make']:.0f}",
        )  # fmt: skip
    console.print(table)
    for kind, why in missing.items():
        if why:
            note(f"{kind}: not measured here: {why}")
    results["missing"] = missing
    report.sections["pages"] = results
    base = results["shm (default), client touches"]["client_ms_per_gib"]
    for label in results:
        if label in ("missing", "shm (default), client touches"):
            continue
        words = "".join(c if c.isalnum() else " " for c in label).split()
        key = "pages." + "_".join(words)  # the whole label: two rows share "shm (default)"
        report.ratio(
            key,
            safe_div(results[label]["client_ms_per_gib"], base),
            LOWER,
            f"client first-touch ms/GiB: {label} / shm (default), client touches",
        )


# -- section 8: Dask worker -> worker transfer -------------------------------------

DASK_SIZE = 256 * MiB
DASK_HINT = "pip install 'shmarena[dask]'"
DASK_ROWS = {  # section 8's table rows
    "dask": "no plugin (Dask's own path)",
    "dask_shm": "plugin, array made in the arena",
    "dask_shm_copy": "plugin, plain array (copied in on send)",
}
DASK_RELEASE_S = 60.0  # longest wait for the workers to forget a round's keys


# The task functions run in the Dask workers. Defined in this script, they
# travel there by value (cloudpickle), so they import what they use themselves.


def _dask_plain(n: int) -> Any:
    import numpy

    return numpy.ones(n, dtype=numpy.uint8)


def _dask_in_arena(n: int) -> Any:
    import shmarena.dask

    x = shmarena.dask.ndarray(n, "uint8")
    x[:] = 1
    return x


def _dask_checksum(x: Any) -> int:
    # One byte per 4 KiB page: the consumer reads the data it got without
    # making the benchmark about a 256 MiB sum.
    return int(x[::4096].sum())


def _dask_where(x: Any) -> dict[str, Any]:
    """Where the array a task received lies: in a mapped arena segment or not."""
    from shmarena.client import registry

    start = int(x.__array_interface__["data"][0])
    ranges = registry.mapping_ranges()
    inside = any(lo <= start and start + x.nbytes <= hi for lo, hi in ranges)
    return {"data": start, "nbytes": int(x.nbytes), "ranges": ranges, "in_arena": inside}


def _dask_transfers(dask_worker: Any, key: str) -> list[dict[str, Any]]:
    return [dict(e) for e in dask_worker.transfer_incoming_log if key in e["keys"]]


def _dask_holds(dask_worker: Any, keys: Sequence[str]) -> bool:
    return any(k in dask_worker.data or k in dask_worker.state.tasks for k in keys)


@dataclass
class DaskCluster:
    """One LocalCluster of this section: its client and the two workers, A
    (the producer's) and B (the consumer's)."""

    client: Any
    a: str
    b: str


def started_cluster(stack: contextlib.ExitStack, plugin: Any = None) -> DaskCluster:
    """A LocalCluster of two single-threaded worker processes, closed by
    `stack` (the client first, then the cluster); with `plugin` registered."""
    import distributed

    # Interrupted half-way, the workers would be orphans. The scheduler's HTTP
    # server (health routes, even without a dashboard) wants port 8787, which
    # the other cluster of this section has: it takes a free one, and warns.
    with signals_deferred(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Port 8787 is already in use", UserWarning)
        cluster = distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
        )
        stack.callback(cleanup(cluster.close))
        client = distributed.Client(cluster)
        stack.callback(cleanup(client.close))
    client.wait_for_workers(2, timeout=CHILD_TIMEOUT_S)
    if plugin is not None:
        client.register_plugin(plugin)
    a, b = sorted(client.scheduler_info()["workers"])
    return DaskCluster(client, a, b)


def dask_handoff(cluster: DaskCluster, produce: Callable[[int], Any]) -> tuple[float, float]:
    """One handoff A -> B; returns (transfer s, as B's incoming-transfer log
    has it; consumer end to end s, submit -> result in this process). The
    producer has finished before the clock starts; the keys are forgotten by
    both workers before this returns, so no round's arrays pile up."""
    import distributed

    client = cluster.client
    source = client.submit(produce, DASK_SIZE, workers=[cluster.a], pure=False)
    distributed.wait(source, timeout=CHILD_TIMEOUT_S)
    t0 = time.perf_counter()
    sink = client.submit(_dask_checksum, source, workers=[cluster.b], pure=False)
    total = sink.result(timeout=CHILD_TIMEOUT_S)
    end_to_end = time.perf_counter() - t0
    if total != DASK_SIZE // 4096:
        raise RuntimeError(f"the consumer's checksum is {total}, not {DASK_SIZE // 4096}")
    keys = [source.key, sink.key]
    entries = client.run(_dask_transfers, key=source.key, workers=[cluster.b])[cluster.b]
    if len(entries) != 1:
        raise RuntimeError(
            f"worker B logged {len(entries)} incoming transfers of {source.key}, not one: "
            "the consumer did not fetch the array from A"
        )
    # stop - start, not "duration": Dask rounds that up to 1 ms.
    transfer = float(entries[0]["stop"] - entries[0]["start"])
    del source, sink
    deadline = time.monotonic() + DASK_RELEASE_S
    while any(client.run(_dask_holds, keys=keys).values()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the workers still hold {keys} after {DASK_RELEASE_S:g} s")
        time.sleep(0.01)
    return transfer, end_to_end


def dask_check_path(cluster: DaskCluster, produce: Callable[[int], Any], in_arena: bool) -> None:
    """Fail unless the array B receives lies in the arena exactly when it
    should: a benchmark of the wrong path is worse than none."""
    client = cluster.client
    source = client.submit(produce, DASK_SIZE, workers=[cluster.a], pure=False)
    where = client.submit(_dask_where, source, workers=[cluster.b], pure=False)
    found = where.result(timeout=CHILD_TIMEOUT_S)
    del source, where
    if found["in_arena"] != in_arena:
        ranges = ", ".join(f"{lo:#x}-{hi:#x}" for lo, hi in found["ranges"]) or "none"
        raise RuntimeError(
            f"dask section: worker B received the {produce.__name__} array at "
            f"{found['data']:#x} ({found['nbytes']} bytes), expected it "
            f"{'inside' if in_arena else 'outside'} the arena; B's mapped segments: {ranges}. "
            "The plugin did not take the path this section measures: check that "
            "ShmarenaPlugin registered on both workers (worker logs)"
        )


def pooled(rounds: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Samples in seconds, by round -> Variant.summary()'s figures, in µs."""
    samples = [s * 1e6 for chunk in rounds for s in chunk]
    medians = [float(np.median(chunk)) * 1e6 for chunk in rounds if chunk]
    return {**summarize(samples), "ops_per_sample": 1, "round_medians": medians}


def section_dask(plan: Plan, report: Report) -> None:
    """A 256 MiB uint8 array made by a task on worker A and consumed by a task
    on worker B of a two-process LocalCluster: the transfer A -> B (from B's
    incoming-transfer log) and the consumer's end-to-end time, without the
    plugin (Dask's own path: serialised, sent over TCP, deserialised) and
    with it (a handle: the array made in the arena, or a plain array that
    the plugin copies into the arena on send)."""
    note(f"8/8 dask: a {size_label(DASK_SIZE)} array from worker A to worker B, plugin or not")
    try:
        import distributed  # noqa: F401

        import shmarena.dask
    except ImportError as exc:
        why = f"{exc} ({DASK_HINT})"
        console.print(f"[yellow]dask: skipped: {escape(why)}[/yellow]")  # [dask] is no markup
        report.sections["dask"] = {"skipped": why}
        return
    kinds: dict[str, Callable[[int], Any]] = {
        "dask": _dask_plain,
        "dask_shm": _dask_in_arena,
        "dask_shm_copy": _dask_plain,
    }
    transfers: dict[str, list[list[float]]] = {name: [] for name in kinds}
    ends: dict[str, list[list[float]]] = {name: [] for name in kinds}
    with contextlib.ExitStack() as stack:
        # Room for the array and a plain array's copy at once, with margin.
        daemon = started_daemon(stack, "1G", "4K")
        # Two clusters side by side (they share nothing: the plugin lives in
        # the worker processes it is registered with), so that every round has
        # every variant, as in the other sections.
        plain = started_cluster(stack)
        plugin = shmarena.dask.ShmarenaPlugin(
            daemon=daemon.name, runtime_dir=daemon.run_dir, start=False
        )
        shm = started_cluster(stack, plugin)
        clusters = {"dask": plain, "dask_shm": shm, "dask_shm_copy": shm}
        watcher = connected(stack, daemon, cache=False)
        baseline = int(watcher.stats()["used_bytes"])  # the workers' registrations
        for name, produce in kinds.items():  # the first transfers open connections,
            for _ in range(2):  # and grow the workers' heaps
                dask_handoff(clusters[name], produce)
        dask_check_path(plain, _dask_plain, in_arena=False)
        dask_check_path(shm, _dask_in_arena, in_arena=True)
        dask_check_path(shm, _dask_plain, in_arena=True)
        names = list(kinds)
        for r in range(plan.rounds):
            shift = r * len(names) // max(1, plan.rounds)
            for name in [*names[shift:], *names[:shift]]:
                transfers[name].append([])
                ends[name].append([])
                for _ in range(plan.dask_samples):
                    transfer, end_to_end = dask_handoff(clusters[name], kinds[name])
                    transfers[name][-1].append(transfer)
                    ends[name][-1].append(end_to_end)
        deadline = time.monotonic() + DASK_RELEASE_S
        while (used := int(watcher.stats()["used_bytes"])) > baseline:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"dask section: the arena still has {used - baseline} bytes in use "
                    f"{DASK_RELEASE_S:g} s after the last round (the workers forgot every key)"
                )
            time.sleep(0.05)

    results: dict[str, Any] = {"size_bytes": DASK_SIZE, "variants": {}}
    for name in kinds:
        results["variants"][name] = {
            "transfer": pooled(transfers[name]),
            "end_to_end": pooled(ends[name]),
        }
    figures = results["variants"]
    label = size_label(DASK_SIZE)
    shown: dict[str, str] = {"dask": ""}
    for name in ("dask_shm", "dask_shm_copy"):
        texts = []
        for what, words in (("transfer", "transfer"), ("end_to_end", "end to end")):
            prefix = "" if what == "transfer" else "end_to_end_"
            ratio = report.ratio(
                f"dask.{prefix}dask_over_{name.removeprefix('dask_')}@{label}",
                safe_div(figures["dask"][what]["median_us"], figures[name][what]["median_us"]),
                HIGHER,
                f"x times faster: {words} median without the plugin / {DASK_ROWS[name]}",
                round_ratios(figures["dask"][what], figures[name][what]),
            )
            texts.append(fmt_ratio(ratio))
        shown[name] = " / ".join(texts)
    table = new_table(
        f"8. Dask: {label} uint8 array, task on worker A -> task on worker B "
        f"({plan.rounds} interleaved rounds)",
        "<variant",
        "samples",
        "transfer median µs",
        "max µs",
        "end to end median µs",
        "max µs",
        "<x faster: transfer / end to end",
    )
    for name in kinds:
        row = figures[name]
        table.add_row(
            DASK_ROWS[name],
            str(row["transfer"]["samples"]),
            fmt_us(row["transfer"]["median_us"]),
            fmt_us(max(s for chunk in transfers[name] for s in chunk) * 1e6),
            fmt_us(row["end_to_end"]["median_us"]),
            fmt_us(max(s for chunk in ends[name] for s in chunk) * 1e6),
            shown[name],
        )
    console.print(table)
    note(
        "transfer: B's transfer_incoming_log (stop - start); end to end: the consumer task, "
        "submit -> result in this process, the producer done before"
    )
    report.sections["dask"] = results
    report.target(
        f"dask transfer {label.replace('MiB', ' MiB')}: no plugin over plugin",
        report.ratios[f"dask.dask_over_shm@{label}"]["value"],
        ">=",
        20,
        "×",
    )


# -- targets and comparison -----------------------------------------------------------------


def print_targets(report: Report) -> None:
    table = new_table("targets", "<target", "measured", "goal", "<status")
    for target in report.targets:
        table.add_row(
            target.name,
            target.shown(target.value),
            f"{target.op} {target.shown(target.limit)}",
            "[green]met[/green]" if target.met else "[red]missed[/red]",
        )
    console.print(table)


def as_float(value: Any) -> float:
    """A figure from JSON: null (a NaN when it was written) back to NaN."""
    return math.nan if value is None else float(value)


def compare(old: dict[str, Any], new: dict[str, Any], threshold: float) -> bool:
    """Print every ratio of `old` next to `new`; True when one got worse by
    more than `threshold` percent (in the direction the ratio says is worse)."""
    if old.get("options", {}).get("quick") != new["options"]["quick"]:
        note("note: the baseline and this run differ in --quick")
    table = new_table(
        f"ratios vs baseline (worse by more than {threshold:g} % fails)",
        "<ratio",
        "<better",
        "old",
        "new",
        "change",
        "<verdict",
    )
    regressed = False
    old_ratios: dict[str, Any] = old.get("ratios", {})
    for key in sorted(set(old_ratios) | set(new["ratios"])):
        if key not in new["ratios"]:
            gone = as_float(old_ratios[key]["value"])
            table.add_row(key, old_ratios[key]["better"], f"{gone:.4g}", "-", "", "gone")
            continue
        entry = new["ratios"][key]
        if key not in old_ratios:
            table.add_row(key, entry["better"], "-", f"{entry['value']:.4g}", "", "new")
            continue
        before, after = as_float(old_ratios[key]["value"]), as_float(entry["value"])
        if math.isnan(before) or math.isnan(after) or before == 0:
            table.add_row(key, entry["better"], f"{before:.4g}", f"{after:.4g}", "", "n/a")
            continue
        change = (after - before) / abs(before) * 100
        worse = change < -threshold if entry["better"] == HIGHER else change > threshold
        improved = change > threshold if entry["better"] == HIGHER else change < -threshold
        verdict = "[green]better[/green]" if improved else "ok"
        if worse and within_noise(old_ratios[key], entry):
            worse, verdict = False, "[yellow]noise[/yellow]"
        elif worse:
            verdict = "[red]WORSE[/red]"
        regressed |= worse
        table.add_row(
            key, entry["better"], f"{before:.4g}", f"{after:.4g}", f"{change:+.1f} %", verdict
        )
    console.print(table)
    return regressed


def within_noise(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a ratio's change is inside the runs' own noise: the ranges of
    its per-round values in the two runs overlap. A real regression moves the
    whole range; noise on a busy machine moves single rounds."""
    old_rounds = [as_float(v) for v in old.get("rounds") or ()]
    new_rounds = [as_float(v) for v in new.get("rounds") or ()]
    old_rounds = [v for v in old_rounds if math.isfinite(v)]
    new_rounds = [v for v in new_rounds if math.isfinite(v)]
    if len(old_rounds) < 2 or len(new_rounds) < 2:
        return False  # no spread known: the threshold alone decides
    if new["better"] == HIGHER:
        return max(new_rounds) >= min(old_rounds)
    return min(new_rounds) <= max(old_rounds)


def jsonable(value: Any) -> Any:
    """The document with NaN / infinity as null, so any JSON reader takes it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def leftovers(names: Sequence[str]) -> list[str]:
    """Entries of /dev/shm this run may have made that are still there."""
    try:
        present = os.listdir("/dev/shm")
    except OSError:
        return []
    return [entry for entry in present if any(entry.startswith(n) for n in names)]


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        epilog="exit status: 0 done, 1 a ratio regressed (--compare), 2 failed, 130 interrupted",
    )
    parser.add_argument("--quick", action="store_true", help="under a minute: fewer samples")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5, --quick 3)")
    parser.add_argument("--json", metavar="FILE", help="write every figure as JSON to FILE")
    parser.add_argument("--save-baseline", metavar="FILE", help="write the JSON to FILE too")
    parser.add_argument("--compare", metavar="FILE", help="compare ratios with a saved run")
    parser.add_argument(
        "--threshold",
        type=float,
        default=10.0,
        help="percent by which a ratio may get worse before --compare fails (default 10)",
    )
    parser.add_argument(
        "--only",
        metavar="SECTIONS",
        help=f"run only these sections, comma-separated: {', '.join(SECTIONS)} "
        "(targets of the others are not reported)",
    )
    args = parser.parse_args(argv)
    args.sections = SECTIONS if not args.only else tuple(args.only.split(","))
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; pick from {SECTIONS}")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.compare:  # fail now, not after minutes of benchmarking
        try:
            with open(args.compare) as f:
                args.baseline = json.load(f)
        except (OSError, ValueError) as exc:
            parser.error(f"cannot read the baseline {args.compare}: {exc}")
        if not isinstance(args.baseline, dict) or "ratios" not in args.baseline:
            parser.error(f"{args.compare} is not a saved run of this benchmark (no ratios)")
    return args


SECTIONS = ("latency", "throughput", "handoff", "memory", "scale", "persist", "pages", "dask")


def run_all(plan: Plan, report: Report, sections: Sequence[str] = SECTIONS) -> None:
    ctx = mp.get_context("spawn")
    if {"latency", "throughput", "handoff"} & set(sections):
        with contextlib.ExitStack() as stack:
            scratch = tempfile.mkdtemp(prefix="shmb-")
            stack.callback(cleanup(shutil.rmtree, scratch, True))
            main_daemon = started_daemon(stack, "1G", "4K")
            if "latency" in sections:
                section_latency(plan, main_daemon, ctx, scratch, report)
            if "throughput" in sections:
                section_throughput(plan, main_daemon, ctx, report)
            if "handoff" in sections:
                section_handoff(plan, main_daemon, ctx, report)
    if "memory" in sections:
        section_memory(plan, report)
    if "scale" in sections:
        section_scale(plan, report)
    if "persist" in sections:
        section_persist(plan, report)
    if "pages" in sections:
        section_pages(plan, report)
    if "dask" in sections:
        section_dask(plan, report)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.make(args.quick, args.rounds)
    signal.signal(signal.SIGTERM, _on_sigterm)
    report = Report()
    machine = machine_info()
    started = time.monotonic()
    status = 0
    console.print(
        f"shmarena bench: {'--quick, ' if plan.quick else ''}{plan.rounds} rounds, "
        f"{machine['cpu_count']} CPUs, Python {machine['python']}, kernel {machine['kernel']}"
    )
    try:
        run_all(plan, report, args.sections)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        status = 130
    except Terminated:
        console.print("[red]terminated[/red]")
        status = 143
    except Exception:
        traceback.print_exc()
        console.print("[red]the benchmark failed[/red]")
        status = 2
    elapsed = time.monotonic() - started

    left = leftovers([f"shmarena-bench-{os.getpid()}-", f"shmb-backing-{os.getpid()}-"])
    for problem in CLEANUP_PROBLEMS + [f"left in /dev/shm: {e}" for e in left]:
        console.print(f"[red]cleanup: {problem}[/red]")
    if status:
        return status
    if CLEANUP_PROBLEMS or left:
        return 2

    print_targets(report)
    console.print(f"total time {elapsed:.1f} s")
    document = {
        "benchmark": "shmarena scripts/bench.py",
        "schema": 1,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": round(elapsed, 3),
        "machine": machine,
        "options": {
            "quick": plan.quick,
            "rounds": plan.rounds,
            "threshold_pct": args.threshold,
            "seed": SEED,
            "plan": {key: value for key, value in vars(plan).items()},
        },
        "sections": report.sections,
        "ratios": report.ratios,
        "targets": [
            {
                "name": t.name,
                "value": t.value,
                "op": t.op,
                "limit": t.limit,
                "unit": t.unit,
                "met": t.met,
            }
            for t in report.targets
        ],
    }
    for path in filter(None, (args.json, args.save_baseline)):
        with open(path, "w") as f:
            json.dump(jsonable(document), f, indent=2, sort_keys=True)
            f.write("\n")
        note(f"wrote {path}")
    if args.compare and compare(args.baseline, document, args.threshold):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
