"""Section 4: memory efficiency of a fresh arena filled until OutOfMemory, then churned."""

from __future__ import annotations

import contextlib
import random
from collections import deque
from collections.abc import Sequence
from typing import Any

import shmarena
from benchmarks.common import (
    CHURN_ROUNDS,
    EFFICIENCY_CHUNK,
    HIGHER,
    MAX_BATCH,
    SEED,
    KiB,
    MiB,
    Plan,
    console,
    gc_paused,
    new_table,
    note,
    size_label,
)
from benchmarks.harness import connected, started_daemon
from benchmarks.measure import Report


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


def _alloc_or_none(client: shmarena.Client, size: int) -> shmarena.Buffer | None:
    """client.alloc(size), or None when the arena is full."""
    try:
        return client.alloc(size)
    except shmarena.OutOfMemory:
        return None


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
            buf = _alloc_or_none(client, size)
            if buf is None:
                stream.give_back(sizes[index + 1 :])
                return size
            live.append(buf)
        # The batch failed but every single alloc succeeded (the batch's rollback
        # may leave free blocks in another order): keep filling.


def section_memory(_plan: Plan, report: Report) -> None:
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
