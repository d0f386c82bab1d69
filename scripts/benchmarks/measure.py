"""Interleaved measurement (variants timed in rotating rounds), what the
variants run, and the report."""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

import shmarena
from benchmarks.common import (
    MIN_SAMPLES_PER_CHUNK,
    fmt_ratio,
    fmt_us,
    gc_paused,
    safe_div,
    summarize,
)


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


@dataclass
class Target:
    """A goal of the benchmark and the figure measured for it (met or missed)."""

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
