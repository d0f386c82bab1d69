"""`shmarena top` and `shmarena map`: the operator's live view and a picture
of the arena.

`top` samples STATS, OWNERS and CLIENTS each interval and shows rates from the
difference of two samples (rich's Live; `--once` prints one frame). `map`
draws the BLOCKS layout along the address space, one row per segment, each
cell coloured by the holder of most of its bytes: as text, or with `--png` as
an image through Pillow (the optional `map` extra). Everything goes through
the client library, like the other admin commands in shmarena/cli/admin.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from shmarena.client.client import Client
from shmarena.config import format_age, format_pct, format_size
from shmarena.console import make_console

EXIT_OK, EXIT_USAGE = 0, 2

# Holder colours, in holder order (BLOCKS names holders in order of first
# appearance along the address space, so the same arena gets the same colours).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (255, 127, 14),
    (148, 103, 189),
    (23, 190, 207),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (60, 60, 60),
    (0, 90, 50),
    (120, 0, 60),
)
FREE_RGB = (235, 235, 235)
FREE_CHAR = "."
# One character per holder; holders beyond these share the last one.
CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
# Image layout (pixels); tests compute the expected size from these.
MARGIN = 8
STRIP_HEIGHT = 24
STRIP_GAP = 6
LEGEND_ROW = 16


def holder_rgb(index: int) -> tuple[int, int, int]:
    """The fixed colour of the holder at `index` of a BLOCKS reply."""
    return PALETTE[index % len(PALETTE)]


def holder_char(index: int) -> str:
    return CHARS[min(index, len(CHARS) - 1)]


def add_commands(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Register `top` and `map` with the CLI's subcommand factory."""
    top = add("top", "live view: usage bar, ops/s, latency, top owners and sessions, reclaims")
    top.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes"
    )
    top.add_argument(
        "--once", action="store_true", help="print one frame (rates over about 0.5 s) and exit"
    )
    top.add_argument("--rows", type=int, default=10, help="owners and sessions shown (default 10)")
    view = add(
        "map",
        "a picture of the arena: occupancy along the address space coloured by owner, "
        "fragmentation, free blocks by order",
    )
    view.add_argument("--width", type=int, default=64, help="cells per segment line (default 64)")
    view.add_argument(
        "--png",
        metavar="FILE",
        help="also write the picture as a PNG image (needs Pillow: pip install 'shmarena[map]')",
    )
    view.add_argument(
        "--png-width",
        type=int,
        default=1024,
        metavar="PX",
        help="pixels along each segment's strip in the image (default 1024)",
    )


def _client(args: argparse.Namespace) -> Client:
    return Client(args.name, runtime_dir=args.run_dir, timeout_s=args.timeout, label="cli")


def _usage(message: str) -> int:
    print(f"shmarena: {message}", file=sys.stderr)
    return EXIT_USAGE


# -- top ----------------------------------------------------------------------


@dataclass
class Sample:
    """One look at the daemon: its stats, owners and sessions, when, and how
    long the stats round trip took."""

    at: float
    stats: dict[str, Any]
    owners: list[dict[str, Any]]
    clients: list[dict[str, Any]]
    rtt_s: float


def take_sample(client: Client, rows: int) -> Sample:
    """Stats (timed), the `rows` biggest owners (one request, however many
    owners exist) and the clients, leaving out the asking session."""
    started = time.perf_counter()
    stats = client.stats()
    rtt = time.perf_counter() - started
    owners = client.top_owners(max(1, rows))
    clients = [row for row in client.list_clients() if row["session"] != client.session]
    return Sample(time.monotonic(), stats, owners, clients, rtt)


@dataclass
class TopState:
    """What `top` remembers between frames: the last sample and the recent
    reclaims it saw (as counter deltas)."""

    last: Sample | None = None
    reclaims: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=5))


RATES = (("requests", "requests"), ("allocs", "allocs"), ("frees", "frees"), ("errors", "errors"))


def render_top(now: Sample, before: Sample | None, state: TopState, rows: int) -> Group:
    """One frame of `top` from two samples (`before` None: rates n/a)."""
    stats = now.stats
    size = stats["size_bytes"] or 1
    parts: list[Any] = []
    head = Text.assemble(
        ("shmarena top ", "bold"),
        f"{stats['name']!r} pid {stats['pid']} up {format_age(stats['uptime_s'])}, "
        f"{format_size(stats['size_bytes'])} {stats['allocator']}, "
        f"{len(stats.get('segments', [])) or 1} segment(s), {stats['owners']} owners, "
        f"{len(now.clients)} clients",
    )
    parts.append(head)
    parts.append(usage_bar(stats, size))
    counters = stats.get("counters", {})
    if before is not None and now.at > before.at:
        span = now.at - before.at
        old = before.stats.get("counters", {})
        rates = "  ".join(
            f"{label} {max(0, counters.get(key, 0) - old.get(key, 0)) / span:,.0f}/s"
            for key, label in RATES
        )
        gone = counters.get("sessions_reclaimed", 0) - old.get("sessions_reclaimed", 0)
        freed = counters.get("reclaimed_bytes", 0) - old.get("reclaimed_bytes", 0)
        if gone > 0 or freed > 0:
            state.reclaims.append((time.time(), gone, freed))
    else:
        rates = "  ".join(f"{label} n/a" for _, label in RATES)
    parts.append(Text.assemble(("ops   ", "bold"), rates))
    parts.append(Text.assemble(("latency ", "bold"), _latency(now, counters)))
    parts.append(_owners_table(now.owners, rows, stats["owners"]))
    parts.append(_sessions_table(now.clients, rows))
    recent = ", ".join(
        f"{time.strftime('%H:%M:%S', time.localtime(when))}: {count} session(s), "
        f"{format_size(freed)}"
        for when, count, freed in reversed(state.reclaims)
    )
    parts.append(
        Text.assemble(
            ("reclaims ", "bold"),
            f"{counters.get('sessions_reclaimed', 0)} sessions, "
            f"{format_size(counters.get('reclaimed_bytes', 0))} since start; recent: "
            f"{recent or 'none'}",
        )
    )
    return Group(*parts)


def usage_bar(stats: dict[str, Any], size: int, width: int = 50) -> Text:
    """used | cached | retained (pinned included) | free, as a bar of `width`
    cells and figures."""
    used = stats["used_bytes"]
    cached = stats.get("cached_bytes", 0)
    retained = stats.get("retained_only_bytes", 0) + stats.get("pinned_bytes", 0)
    free = stats["free_bytes"]
    bar = Text("usage [", style="bold")
    shown = 0
    for amount, char, style in (
        (used, "#", "red"),
        (cached, "=", "yellow"),
        (retained, "~", "magenta"),
    ):
        cells = round(width * amount / size)
        cells = min(cells, width - shown)
        bar.append(char * cells, style=style)
        shown += cells
    bar.append(FREE_CHAR * (width - shown), style="green")
    bar.append("] ", style="bold")
    bar.append(
        f"used {format_size(used)} ({format_pct(used, size)}), cached {format_size(cached)}, "
        f"retained {format_size(retained)}, free {format_size(free)} ({format_pct(free, size)}), "
        f"largest free {format_size(stats['largest_free_bytes'])}"
    )
    return bar


def _latency(sample: Sample, counters: dict[str, Any]) -> str:
    text = f"stats round trip {sample.rtt_s * 1000:.2f} ms"
    daemon = counters.get("latency")
    if isinstance(daemon, dict) and daemon:
        text += "; daemon: " + ", ".join(f"{k} {v}" for k, v in sorted(daemon.items())[:6])
    elif daemon is not None:
        text += f"; daemon: {daemon}"
    return text


def _owners_table(owners: list[dict[str, Any]], rows: int, total: int) -> Table:
    table = Table(title=f"top owners by bytes ({total} in all)", title_justify="left")
    for name, justify in (("owner", "left"), ("scope", "left"), ("session", "right"),
                          ("blocks", "right"), ("bytes", "right"), ("age", "right")):  # fmt: skip
        table.add_column(name, justify=justify, no_wrap=justify == "right")  # type: ignore[arg-type]
    for row in sorted(owners, key=lambda r: (-r["bytes"], r["name"]))[:rows]:
        table.add_row(
            row["name"],
            row["scope"],
            str(row["session"]) + ("" if row.get("alive", True) else " (gone)"),
            str(row["blocks"]),
            format_size(row["bytes"]),
            format_age(row["age_s"]),
        )
    return table


def _sessions_table(clients: list[dict[str, Any]], rows: int) -> Table:
    table = Table(title=f"top sessions by bytes ({len(clients)} in all)", title_justify="left")
    for name in ("session", "pid", "label", "owners", "blocks", "bytes", "cached", "age"):
        table.add_column(
            name, justify="left" if name == "label" else "right", no_wrap=name != "label"
        )
    ranked = sorted(clients, key=lambda r: (-(r["bytes"] + r.get("cached_bytes", 0)), r["session"]))
    for row in ranked[:rows]:
        table.add_row(
            str(row["session"]),
            str(row["pid"]),
            row["label"],
            str(row["owners"]),
            str(row["blocks"]),
            format_size(row["bytes"]),
            format_size(row.get("cached_bytes", 0)),
            format_age(row["age_s"]),
        )
    return table


def cmd_top(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        return _usage(f"top: --interval must be more than 0 seconds, got {args.interval:g}")
    state = TopState()
    with _client(args) as client:
        if args.once:
            first = take_sample(client, args.rows)
            time.sleep(min(0.5, args.interval))  # the rates' window, not a synchronisation
            second = take_sample(client, args.rows)
            make_console(soft_wrap=False).print(render_top(second, first, state, args.rows))
            return EXIT_OK
        from rich.live import Live

        sample = take_sample(client, args.rows)
        try:
            with Live(
                render_top(sample, None, state, args.rows),
                console=make_console(soft_wrap=False),
                refresh_per_second=4,
                screen=False,
            ) as live:
                while True:
                    time.sleep(args.interval)
                    newer = take_sample(client, args.rows)
                    live.update(render_top(newer, sample, state, args.rows))
                    sample = newer
        except KeyboardInterrupt:
            return EXIT_OK


# -- map ----------------------------------------------------------------------


def cells(segment: dict[str, Any], count: int) -> list[int]:
    """The segment cut into `count` equal cells along its addresses: per cell
    the index of the holder of most of its bytes, or -1 where free bytes are
    the most (ties go to the holder: a cell with any use shows it)."""
    size = segment["size_bytes"]
    count = max(1, min(count, size))
    weights: list[dict[int, int]] = [{} for _ in range(count)]
    flat = segment["blocks"]
    for i in range(0, len(flat), 3):
        start, length, holder = flat[i], flat[i + 1], flat[i + 2]
        end = start + length
        for cell in range(start * count // size, (end - 1) * count // size + 1):
            low, high = cell * size // count, (cell + 1) * size // count
            part = min(end, high) - max(start, low)
            if part > 0:
                weights[cell][holder] = weights[cell].get(holder, 0) + part
    result = []
    for cell, held in enumerate(weights):
        cell_bytes = (cell + 1) * size // count - cell * size // count
        if not held:
            result.append(-1)
            continue
        holder, most = max(held.items(), key=lambda item: (item[1], -item[0]))
        free = cell_bytes - sum(held.values())
        result.append(-1 if free > most else holder)
    return result


def render_map(layout: dict[str, Any], stats: dict[str, Any], width: int) -> Group:
    """The text picture: one line per segment, the legend, fragmentation and
    free blocks per order."""
    holders = layout["holders"]
    parts: list[Any] = [
        Text.assemble(
            ("shmarena map ", "bold"),
            f"{stats['name']!r}: {format_size(stats['size_bytes'])}, {width} cells per "
            "segment line, each cell shows who holds most of its bytes ('.' free)",
        )
    ]
    for segment in layout["segments"]:
        line = Text(f"seg {segment['index']:>2} ")
        for holder in cells(segment, width):
            if holder < 0:
                line.append(FREE_CHAR, style="rgb(150,150,150)")
            else:
                line.append(holder_char(holder), style="rgb({},{},{})".format(*holder_rgb(holder)))
        used = sum(segment["blocks"][1::3])
        line.append(
            f" {format_size(segment['size_bytes'])}, {len(segment['blocks']) // 3} blocks, "
            f"{format_size(used)} used, {len(segment['free']) // 2} free runs"
            + ("" if segment["complete"] else " (listing truncated)")
        )
        parts.append(line)
    legend = Text("legend: ")
    for index, name in enumerate(holders):
        legend.append(holder_char(index), style="bold rgb({},{},{})".format(*holder_rgb(index)))
        legend.append(f" {name}  ")
    legend.append(f"{FREE_CHAR} free")
    parts.append(legend)
    if layout.get("truncated"):
        parts.append(Text("(more blocks than one reply lists: the picture shows the first ones)"))
    parts.append(
        Text(
            f"fragmentation {stats['fragmentation']:.3f} (1 - largest free / free: largest free "
            f"{format_size(stats['largest_free_bytes'])} of {format_size(stats['free_bytes'])} "
            "free)"
        )
    )
    by_order = sorted(stats["free_blocks_by_order"].items(), key=lambda i: int(i[0]))
    parts.append(
        Text(
            "free blocks by order (like /proc/buddyinfo; order k: "
            f"{format_size(stats['min_block_bytes'])} << k): "
            + " ".join(str(count) for _, count in by_order)
        )
    )
    orders = Table(title="free blocks (orders with some)", title_justify="left")
    orders.add_column("order", justify="right")
    orders.add_column("block size", justify="right")
    orders.add_column("free blocks", justify="right")
    for order, count in by_order:
        if count:
            orders.add_row(order, format_size(stats["min_block_bytes"] << int(order)), str(count))
    parts.append(orders)
    return Group(*parts)


def image_size(segments: int, holders: int, strip_px: int) -> tuple[int, int]:
    """(width, height) of the PNG for this many segments and holders."""
    legend_rows = holders + 1  # and the free colour
    height = MARGIN + segments * (STRIP_HEIGHT + STRIP_GAP) + legend_rows * LEGEND_ROW + MARGIN
    return strip_px + 2 * MARGIN, height


def write_png(layout: dict[str, Any], path: str, strip_px: int) -> tuple[int, int]:
    """Draw the layout into a PNG at `path`: one strip of `strip_px` pixels per
    segment along its addresses, then the legend; its (width, height).
    ImportError when Pillow is missing."""
    from PIL import Image, ImageDraw

    holders = layout["holders"]
    segments = layout["segments"]
    size = image_size(len(segments), len(holders), strip_px)
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    top = MARGIN
    for segment in segments:
        for x, holder in enumerate(cells(segment, strip_px)):
            colour = FREE_RGB if holder < 0 else holder_rgb(holder)
            draw.line([(MARGIN + x, top), (MARGIN + x, top + STRIP_HEIGHT - 1)], fill=colour)
        top += STRIP_HEIGHT + STRIP_GAP
    entries = [(name, holder_rgb(i)) for i, name in enumerate(holders)] + [("free", FREE_RGB)]
    for name, colour in entries:
        draw.rectangle(
            [MARGIN, top + 2, MARGIN + LEGEND_ROW - 5, top + LEGEND_ROW - 3],
            fill=colour,
            outline=(0, 0, 0),
        )
        draw.text((MARGIN + LEGEND_ROW + 2, top + 2), name[:120], fill=(0, 0, 0))
        top += LEGEND_ROW
    image.save(path, format="PNG")
    return size


def cmd_map(args: argparse.Namespace) -> int:
    if not 1 <= args.width <= 4096:
        return _usage(f"map: --width must be from 1 to 4096 cells, got {args.width}")
    if not 16 <= args.png_width <= 16384:
        return _usage(f"map: --png-width must be from 16 to 16384 pixels, got {args.png_width}")
    if args.png:
        try:
            import PIL  # noqa: F401
        except ImportError:
            return _usage(
                f"map: --png {args.png} needs Pillow, which is not installed; "
                "install it with: pip install 'shmarena[map]'"
            )
    with _client(args) as client:
        layout = client.blocks()
        stats = client.stats()
    make_console(soft_wrap=False).print(render_map(layout, stats, args.width))
    if args.png:
        width, height = write_png(layout, args.png, args.png_width)
        print(f"wrote {args.png} ({width} x {height} pixels)")
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"top": cmd_top, "map": cmd_map}


__all__: Sequence[str] = ["add_commands", "COMMANDS", "cells", "write_png", "image_size"]
