"""Section 5: alloc+free latency and daemon RSS with 1 000 and with many live blocks."""

from __future__ import annotations

import contextlib
from typing import Any

import shmarena
from benchmarks.common import (
    CHEAP_BATCH,
    LOWER,
    MAX_BATCH,
    SCALE_SIZE,
    SCALE_SMALL,
    MiB,
    Plan,
    cleanup,
    console,
    count_label,
    fmt_ratio,
    fmt_us,
    gc_paused,
    new_table,
    note,
    safe_div,
)
from benchmarks.harness import connected, started_daemon
from benchmarks.measure import Report, Variant, alloc_free, interleave, round_ratios


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
