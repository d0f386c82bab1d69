"""Shared pieces of the benchmark: constants, the plan, formatting, signal-safe cleanup."""

from __future__ import annotations

import contextlib
import gc
import math
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

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

    def hold(signum: int, _frame: object) -> None:
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
            except Exception as exc:  # noqa: BLE001 reported at the end; other cleanups still run
                CLEANUP_PROBLEMS.append(f"{getattr(step, '__qualname__', step)}: {exc!r}")

    return run


class Terminated(BaseException):
    """SIGTERM, turned into an exception so every finally block runs."""


def on_sigterm(_signum: int, _frame: object) -> None:
    """The SIGTERM handler of a run: unwind like Ctrl-C does."""
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
