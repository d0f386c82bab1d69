"""Targets and --compare: print the goals met and judge ratios against a saved run."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from benchmarks.common import HIGHER, console, new_table, note
from benchmarks.measure import Report


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
