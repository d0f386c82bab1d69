"""Section 6: the cost of a persistent table, by --durability."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any

import shmarena
from benchmarks.common import (
    CHEAP_BATCH,
    LOWER,
    KiB,
    Plan,
    cleanup,
    console,
    fmt_ratio,
    fmt_us,
    new_table,
    note,
    safe_div,
    size_label,
)
from benchmarks.harness import connected, started_daemon
from benchmarks.measure import Report, Variant, alloc_free, interleave, round_ratios

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
