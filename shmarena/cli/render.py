"""How the admin commands show what they were told: rich tables for people,
indented JSON for scripts.

Functions here take data already fetched (a stats snapshot, an inspect report)
and print it; they never ask the daemon anything themselves.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from shmarena.config import format_age, format_pct, format_size
from shmarena.console import make_console as console
from shmarena.shm.arena import shm_path

INSPECT_BLOCKS = 100  # blocks inspect lists without --blocks


def print_json(data: Any) -> None:
    """Print `data` as JSON for scripts: indented, keys sorted."""
    print(json.dumps(data, indent=2, sort_keys=True))


def print_table(
    title: str, columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[str]]
) -> None:
    """Print a titled table; `columns` are (name, justify) pairs. Figures (the
    right-justified columns) are never split across lines."""
    table = Table(title=title)
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=justify == "right")  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*row)
    console().print(table)


def where(place: str) -> str:
    """A segment's place for people: /dev/shm/NAME for a shm name."""
    return shm_path(place) if place.startswith("/") and place.count("/") == 1 else place


# -- status ---------------------------------------------------------------------


def print_status(stats: dict[str, Any]) -> None:
    """`shmarena status`: one screen from a stats snapshot."""
    size = stats["size_bytes"]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("daemon", f"{stats['name']!r}, pid {stats['pid']}, up {format_age(stats['uptime_s'])}"),
        (
            "arena",
            f"{format_size(size)} in {stats['backing']} ({stats['backing_fs']}"
            f"{', DAX' if stats['dax'] else ''}), durability {stats['durability']}"
            if stats.get("backing")
            else f"{format_size(size)} at {where(stats['segments'][0]['where'])}",
        ),
        (
            "used",
            f"{format_size(stats['used_bytes'])} ({format_pct(stats['used_bytes'], size)})"
            f" in {stats['live_blocks']} blocks",
        ),
        (
            "cached",
            f"{format_size(stats['cached_bytes'])} ({format_pct(stats['cached_bytes'], size)})"
            f" in {stats['cached_blocks']} blocks held by client caches",
        ),
        (
            "free",
            f"{format_size(stats['free_bytes'])} ({format_pct(stats['free_bytes'], size)})",
        ),
        ("largest free", format_size(stats["largest_free_bytes"])),
        *_page_rows(stats),
        ("owners", str(stats["owners"])),
        ("clients", f"{stats['sessions'] - 1} (not counting this command)"),
    ]
    if stats.get("retained_only_blocks"):
        rows.append(
            (
                "held by readers",
                f"{format_size(stats['retained_only_bytes'])} in "
                f"{stats['retained_only_blocks']} freed but retained blocks",
            )
        )
    if stats.get("pinned_blocks"):
        rows.append(
            (
                "pinned by views",
                f"{format_size(stats['pinned_bytes'])} in {stats['pinned_blocks']} freed blocks "
                "a process still has views of (`shmarena clients` shows which)",
            )
        )
    for key, value in rows:
        table.add_row(key, value)
    console().print(table)


def _page_rows(stats: dict[str, Any]) -> list[tuple[str, str]]:
    """Status lines for segments (a growing arena), pages and NUMA placement."""
    rows = []
    segments = stats.get("segments", [])
    if len(segments) > 1 or stats.get("max_size_bytes", 0) > stats.get("initial_size_bytes", 0):
        sizes = ", ".join(format_size(r["size_bytes"]) for r in segments)
        rows.append(
            (
                "segments",
                f"{len(segments)} ({sizes}), growing up to {format_size(stats['max_size_bytes'])}",
            )  # fmt: skip
        )
    pages = stats.get("pages")
    if pages:
        huge = f", {format_size(pages['huge_bytes'])} on huge pages" if pages["huge_bytes"] else ""
        rows.append(("pages", f"{format_size(pages['page_bytes'])} ({pages['kind']}){huge}"))
    placement = stats.get("numa") or {}
    if placement.get("requested"):
        nodes = ", ".join(
            f"{format_size(b)} on node {n}" for n, b in sorted(placement["bytes_by_node"].items())
        )
        rows.append(("numa", f"{placement['policy']}: {nodes or 'no page mapped'}"))
    return rows


# -- stats ----------------------------------------------------------------------


def print_stats(stats: dict[str, Any]) -> None:
    """`shmarena stats`: every figure, then free blocks per order, segments
    and (when the daemon reads them back from the kernel) pages."""
    out = console()
    out.print(_figures_table(stats))
    out.print(_orders_table(stats))
    out.print(_segments_table(stats))
    if stats.get("pages"):
        _print_pages(out, stats)


def _figures_table(stats: dict[str, Any]) -> Table:
    table = Table(title=f"arena {stats['name']!r}", show_header=True)
    table.add_column("stat")
    table.add_column("value", justify="right")
    for key in sorted(stats):
        value = stats[key]
        if isinstance(value, (dict, list)):
            continue
        shown = format_size(value) if key.endswith("_bytes") else str(value)
        table.add_row(key, shown)
    for key, value in sorted(stats.get("counters", {}).items()):
        if isinstance(value, dict):  # ops, errors_by_code: one row each
            value = ", ".join(f"{k} {v}" for k, v in sorted(value.items())) or "-"
        table.add_row(f"counters.{key}", str(value))
    return table


def _orders_table(stats: dict[str, Any]) -> Table:
    orders = Table(
        title="free blocks per order (like /proc/buddyinfo; order k: at least k's size, "
        "under twice that)"
    )
    orders.add_column("order", justify="right")
    orders.add_column("block size", justify="right")
    orders.add_column("free blocks", justify="right")
    orders.add_column("extfrag index", justify="right")
    extfrag = stats.get("extfrag_index_by_order", {})
    for order, count in sorted(stats["free_blocks_by_order"].items(), key=lambda i: int(i[0])):
        index = extfrag.get(order, -1.0)
        orders.add_row(
            order,
            format_size(stats["min_block_bytes"] << int(order)),
            str(count),
            "-" if index < 0 else f"{index:.3f}",
        )
    return orders


def _segments_table(stats: dict[str, Any]) -> Table:
    segments = Table(title="segments (an arena grows by segments up to max_size_bytes)")
    for name in ("index", "size", "used", "blocks", "largest free", "where"):
        segments.add_column(name, justify="left" if name == "where" else "right")
    for row in stats.get("segments", []):
        segments.add_row(
            str(row["index"]),
            format_size(row["size_bytes"]),
            format_size(row["used_bytes"]),
            str(row["blocks"]),
            format_size(row["largest_free_bytes"]),
            where(row["where"]),
        )
    return segments


def _print_pages(out: Console, stats: dict[str, Any]) -> None:
    pages = stats["pages"]
    placement = stats.get("numa") or {}
    table = Table(title="pages, as the kernel reports them (smaps, numa_maps)")
    for name in ("segment", "page size", "on huge pages", "mapped", "policy", "by node"):
        table.add_column(name, justify="right")
    for row in pages["segments"]:
        by_node = ", ".join(
            f"{n}: {format_size(b)}" for n, b in sorted(row.get("bytes_by_node", {}).items())
        )
        table.add_row(
            str(row["index"]),
            format_size(row.get("page_bytes", 0)),
            format_size(row.get("huge_bytes", 0)),
            format_size(row.get("mapped_bytes", 0)),
            str(row.get("policy", "-")),
            by_node or "-",
        )
    out.print(table)
    if placement.get("requested"):
        requested = placement["requested"]
        out.print(
            f"NUMA: asked {requested['policy']} to node(s) {requested['nodes']} "
            f"(via {requested['via']}; {placement['resident_pages_at_bind']} pages existed "
            f"when bound); the daemon runs on CPUs {placement['daemon_cpus']}"
        )


# -- inspect --------------------------------------------------------------------


def print_inspect(report: dict[str, Any], problems: list[str], all_blocks: bool) -> None:
    """`shmarena inspect`: a backing file's header, table, owners and blocks
    (every block with `all_blocks`, else up to INSPECT_BLOCKS), then the problems."""
    out = console()
    header = report.get("header")
    if header:
        out.print(
            f"arena file {report['path']}: format {header['format']}, "
            f"{format_size(header['size_bytes'])} from byte {header['data_offset']}, "
            f"min block {format_size(header['min_block_bytes'])}, {header['allocator']}, "
            f"identity {header['identity']}, made for {header['name']!r} "
            f"{datetime.fromtimestamp(header['created_at']):%Y-%m-%d %H:%M:%S}"
        )
    if "epoch" in report:
        out.print(
            f"table: epoch {report['epoch']}, generation {report['generation']}, "
            f"{report['records']} records in {format_size(report['journal_bytes'])}, last "
            f"written by a daemon with durability {report['durability'] or '?'}"
            f"{', stopped cleanly' if report['clean'] else ''}"
        )
    if "used_bytes" in report:
        _print_table_contents(out, report, all_blocks)
    for note in report.get("notes", []):
        out.print(f"note: {note}")
    for problem in problems:
        out.print(f"PROBLEM: {problem}")
    out.print("inspect: " + (f"{len(problems)} problem(s)" if problems else "ok"))


def _print_table_contents(out: Console, report: dict[str, Any], all_blocks: bool) -> None:
    header = report.get("header")
    size = header["size_bytes"] if header else 0
    out.print(
        f"used {format_size(report['used_bytes'])} ({format_pct(report['used_bytes'], size)}), "
        f"cached {format_size(report['cached_bytes'])}, free "
        f"{format_size(report['free_bytes'])}, largest free "
        f"{format_size(report['largest_free_bytes'])}; {len(report['blocks'])} blocks, "
        f"{len(report['owners'])} owners, {len(report['sessions'])} sessions"
    )
    print_table(
        "owners",
        [("name", "left"), ("scope", "left"), ("session", "right"), ("pid", "right"),
         ("blocks", "right"), ("bytes", "right")],
        [
            [o["name"], o["scope"], str(o["session"]), str(o["pid"]), str(o["blocks"]),
             format_size(o["bytes"])]
            for o in report["owners"]
        ],
    )  # fmt: skip
    if not (all_blocks or len(report["blocks"]) <= INSPECT_BLOCKS):
        out.print(f"({len(report['blocks'])} blocks; `--blocks` lists them all)")
        return
    print_table(
        "blocks",
        [("offset", "right"), ("size", "right"), ("generation", "right"), ("owner", "left")],
        [
            [f"{b['offset']:#x}", str(b["size"]), str(b["generation"]), _block_holder(b)]
            for b in report["blocks"]
        ],
    )


def _block_holder(block: dict[str, Any]) -> str:
    """Who keeps a block: its owner, else a client cache, a view or a reader."""
    if block["owner"]:
        return str(block["owner"])
    if block["cached"]:
        return "(cached)"
    return "(pinned)" if block.get("pinned_by") and not block["retainers"] else "(retained)"


# -- rows of the admin tables -----------------------------------------------------


def since(when_s: float, age_s: float) -> str:
    """A start time for people: its clock time and how long ago."""
    return f"{datetime.fromtimestamp(when_s):%H:%M:%S} ({format_age(age_s)})"
