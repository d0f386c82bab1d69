"""The soak's figures: what a run measured, as JSON, and the printed summary."""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from soaking.run import Soak


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def latency_figures(samples: list[float]) -> dict[str, float | int]:
    ordered = sorted(samples)
    return {
        "count": len(ordered),
        "p50_ms": round(percentile(ordered, 0.50) * 1e3, 3),
        "p99_ms": round(percentile(ordered, 0.99) * 1e3, 3),
        "max_ms": round(ordered[-1] * 1e3, 3) if ordered else 0.0,
    }


def print_summary(figures: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    config = figures["config"]
    reclaim = figures["reclaim_ms"]
    hand = figures["handoffs"]
    lines = [
        f"soak: {config['procs']} workers for {figures['elapsed_s']:.1f} s, "
        f"arena {config['size_bytes'] >> 20} MiB, daemon {figures['daemon']['name']}",
        f"ops        {figures['ops']} ({figures['ops_per_s']:.0f}/s): "
        f"{figures['allocs']} allocs, {figures['frees']} frees, {figures['recycles']} recycles, "
        f"{figures['oom']} OutOfMemory",
        f"verified   {figures['verified_buffers']} buffer stamps in the workers; handed off "
        f"{hand['sent']}, checked by the checker {hand['checked']} "
        f"({hand['verified']} verified, {hand['stale']} freed before the check)",
        f"kills      {figures['kills']} SIGKILLs, {figures['incarnations']} worker incarnations; "
        f"reclaim (SIGKILL to session gone) median {reclaim['median']} ms, "
        f"p90 {reclaim['p90']} ms, worst {reclaim['max']} ms; the process itself was seen "
        f"dead after median {figures['exit_ms']['median']} ms, "
        f"worst {figures['exit_ms']['max']} ms",
        f"errors     {figures['errors']}",
        f"corrupted  {figures['corrupted']}",
        f"check      {figures['check_runs']} runs, "
        + ("all clean" if figures["check_clean"] else "NOT clean"),
    ]
    for line in lines:
        print(line)
    accounting = figures["accounting"]
    if accounting.get("reached"):
        for phase in ("with_survivors", "after_close"):
            shown = ", ".join(
                f"{key} {v['daemon']}"
                + ("" if v["daemon"] == v["expected"] else f" != {v['expected']}")
                for key, v in accounting[phase].items()
            )
            print(f"accounting {phase.replace('_', ' ')}: {shown}")
    table = Table(title="admin latency (ms)")
    for column in ("command", "count", "p50", "p99", "max"):
        table.add_column(column, justify="left" if column == "command" else "right")
    for command, lat in figures["admin"].items():
        table.add_row(
            command,
            str(lat["count"]),
            f"{lat['p50_ms']:.2f}",
            f"{lat['p99_ms']:.2f}",
            f"{lat['max_ms']:.2f}",
        )
    console.print(table)
    for text in figures["error_messages"] + figures["corruption_messages"]:
        print(f"  ! {text}")
    print("PASS" if figures["ok"] else "FAIL: " + "; ".join(figures["reasons"]), flush=True)


def soak_figures(soak: Soak) -> dict[str, Any]:
    """Every figure of a soak run, and whether it passed (`ok`, `reasons`)."""
    totals = soak.totals()
    ops = totals["allocs"] + totals["frees"] + totals["recycles"]
    reclaim = sorted(soak.reclaim_s)
    exits = sorted(soak.exit_s)
    checker = soak.checker_final or soak.checker_counts
    check_clean = not soak.check_failures and soak.check_runs > 0
    figures: dict[str, Any] = {
        "config": {
            "procs": soak.args.procs,
            "duration_s": soak.args.duration,
            "kill_every_s": soak.args.kill_every,
            "size_bytes": soak.size_bytes,
            "live_bytes_per_worker": soak.live_bytes,
            "seed": soak.args.seed,
            "verify_every_s": soak.args.verify_every,
            "handoff_every_s": soak.args.handoff_every,
            "admin_every_s": soak.args.admin_every,
            "cli_every_s": soak.args.cli_every,
        },
        "daemon": {
            "name": soak.name,
            "pid": soak.daemon_pid,
            "shm_path": soak.shm_path,
            "run_dir": soak.run_dir,
        },
        "processes": {
            "checker": soak.checker.pid if soak.checker is not None else None,
            "workers": [i.pid for i in soak.incarnations],
        },
        "elapsed_s": round(soak.elapsed, 3),
        "ops": ops,
        "ops_per_s": round(ops / soak.elapsed, 1) if soak.elapsed else 0.0,
        "allocs": totals["allocs"],
        "frees": totals["frees"],
        "recycles": totals["recycles"],
        "oom": totals["oom"],
        "verified_buffers": totals["verified"],
        "arena": soak.arena_peaks,
        "incarnations": len(soak.incarnations),
        "handoffs": {
            "sent": totals["handoffs"],
            "checked": checker.get("checked", 0),
            "verified": checker.get("verified", 0),
            "stale": checker.get("stale", 0),
        },
        "kills": soak.kills,
        "reclaim_ms": {
            "count": len(reclaim),
            "median": round(statistics.median(reclaim) * 1e3, 3) if reclaim else None,
            "p90": round(percentile(reclaim, 0.9) * 1e3, 3) if reclaim else None,
            "max": round(reclaim[-1] * 1e3, 3) if reclaim else None,
            "samples": [round(s * 1e3, 3) for s in soak.reclaim_s],
        },
        "exit_ms": {
            "median": round(statistics.median(exits) * 1e3, 3) if exits else None,
            "max": round(exits[-1] * 1e3, 3) if exits else None,
        },
        "errors": len(soak.errors),
        "error_messages": soak.errors[:20],
        "corrupted": len(soak.corruptions),
        "corruption_messages": soak.corruptions[:20],
        "admin": {c: latency_figures(s) for c, s in soak.latency.items()},
        "check_runs": soak.check_runs,
        "check_clean": check_clean,
        "check_failures": soak.check_failures[:20],
        "accounting": soak.accounting,
        "daemon_counters": soak.daemon_counters,
        "cleanup": soak.cleanup_figures,
    }
    reasons = []
    if figures["errors"]:
        reasons.append(f"{figures['errors']} error(s)")
    if figures["corrupted"]:
        reasons.append(f"{figures['corrupted']} corrupted buffer(s)")
    if not check_clean:
        reasons.append("check() was not clean every time")
    if not soak.accounting.get("reached"):
        reasons.append("the run did not get as far as the accounting check")
    elif not soak.accounting.get("ok"):
        reasons.append("the accounting did not hold")
    figures["ok"] = not reasons
    figures["reasons"] = reasons
    return figures
