"""The admin commands: ask the running daemon through the client library
(one way to do a thing), then print what it answered (`shmarena.cli.render`).

Each `cmd_*` takes the parsed arguments and returns the exit code; the
daemon's refusals (ShmArenaError) and its absence (DaemonUnavailable) are
turned into exit codes by `shmarena.cli.main`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from shmarena.cli.parser import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, quota_arg
from shmarena.cli.render import (
    print_inspect,
    print_json,
    print_stats,
    print_status,
    print_table,
    since,
)
from shmarena.client.client import Client
from shmarena.config import format_age, format_size
from shmarena.errors import UnknownOwner


def _client(args: argparse.Namespace) -> Client:
    return Client(args.name, runtime_dir=args.run_dir, timeout_s=args.timeout, label="cli")


def _query(args: argparse.Namespace, ask: Callable[[Client], Any]) -> Any:
    """Ask the daemon through the client library; with --json print the
    answer and return None, else return it for a table."""
    with _client(args) as client:
        data = ask(client)
    if args.json:
        print_json(data)
        return None
    return data


def cmd_status(args: argparse.Namespace) -> int:
    """`shmarena status`: one screen."""
    stats = _query(args, Client.stats)
    if stats is not None:
        print_status(stats)
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    """`shmarena stats`: everything; with --reset-peak, reset the peak instead."""
    if args.reset_peak:
        return _reset_peak(args)
    stats = _query(args, Client.stats)
    if stats is not None:
        print_stats(stats)
    return EXIT_OK


def _reset_peak(args: argparse.Namespace) -> int:
    """`shmarena stats --reset-peak`: the peak of used bytes before and after."""
    reset = _query(args, Client.reset_peak)
    if reset is not None:
        print(
            f"peak_used_bytes reset: was {format_size(reset['previous_peak_used_bytes'])} "
            f"(reached {_utc(reset['previous_peak_at'])}), now "
            f"{format_size(reset['peak_used_bytes'])} (the used bytes at {_utc(reset['peak_at'])})"
        )
    return EXIT_OK


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _owner_rows(client: Client, older_than: float | None, sort: str | None) -> list[Any]:
    rows = client.list_owners()
    if older_than is not None:
        rows = [r for r in rows if r["age_s"] >= older_than]
    if sort == "bytes":
        rows.sort(key=lambda r: (-r["bytes"], r["name"]))
    elif sort == "age":
        rows.sort(key=lambda r: (-r["age_s"], r["name"]))
    elif sort == "name":
        rows.sort(key=lambda r: r["name"])
    return rows


def _sites_cell(row: dict[str, Any]) -> str:
    sites = row.get("sites") or []
    return "; ".join(f"{s['site']} ({format_size(s['bytes'])})" for s in sites[:2]) or "-"


def cmd_owners(args: argparse.Namespace) -> int:
    """`shmarena owners`: per owner, what it holds and where it was allocated."""
    rows = _query(args, lambda client: _owner_rows(client, args.older_than, args.sort))
    if rows is None:
        return EXIT_OK
    columns = [("name", "left"), ("scope", "left")] + [
        (name, "right") for name in ("session", "pid", "blocks", "bytes", "quota", "age")
    ]
    columns.append(("sites", "left"))
    cells = (
        (
            row["name"],
            row["scope"],
            str(row["session"]),
            str(row["pid"]) + ("" if row.get("alive", True) else " (gone)"),
            str(row["blocks"]),
            format_size(row["bytes"]),
            format_size(row["quota"]) if row.get("quota") else "-",
            format_age(row["age_s"]),
            _sites_cell(row),
        )
        for row in rows
    )
    print_table(f"owners of {args.name!r}", columns, cells)
    return EXIT_OK


def cmd_clients(args: argparse.Namespace) -> int:
    """`shmarena clients`: the connected sessions, this command not counted."""
    rows = _query(
        args, lambda client: [r for r in client.list_clients() if r["session"] != client.session]
    )
    if rows is None:
        return EXIT_OK
    names = ("session", "pid", "label", "since", "watch", "owners", "blocks", "bytes", "cached")
    cells = (
        (
            str(row["session"]),
            str(row["pid"]),
            row["label"],
            since(row["since"], row["age_s"]),
            row["watch"],
            str(row["owners"]),
            str(row["blocks"]),
            format_size(row["bytes"]),
            format_size(row.get("cached_bytes", 0)),
        )
        for row in rows
    )
    print_table(f"clients of {args.name!r}", [(n, "left") for n in names], cells)
    return EXIT_OK


def cmd_names(args: argparse.Namespace) -> int:
    """`shmarena names`: the published names."""
    rows = _query(args, lambda client: client.names(args.prefix))
    if rows is None:
        return EXIT_OK
    columns = [("name", "left"), ("owner", "left")] + [
        (name, "right") for name in ("session", "bytes", "sealed", "age")
    ]
    cells = (
        (
            row["name"],
            row["owner"],
            str(row["session"]),
            format_size(row["bytes"]),
            "yes" if row["sealed"] else "no",
            format_age(row["age_s"]),
        )
        for row in rows
    )
    print_table(f"names in {args.name!r}", columns, cells)
    return EXIT_OK


def cmd_quota(args: argparse.Namespace) -> int:
    """`shmarena quota`: show the quotas, or set an owner's or the per-session one."""
    try:
        per_session = None if args.per_session is None else quota_arg(args.per_session)
        size = None if args.size is None else quota_arg(args.size)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        print(f"shmarena quota: {exc}; give a size like 64M, or none", file=sys.stderr)
        return EXIT_USAGE
    with _client(args) as client:
        if per_session is not None:
            client.set_quota("", per_session)
        if args.owner is not None and size is not None:
            client.set_quota(args.owner, size)
        stats = client.stats()
        owners = [r for r in client.list_owners() if r.get("quota") or r["name"] == args.owner]
    if args.owner is not None and not any(r["name"] == args.owner for r in owners):
        print(f"shmarena quota: no owner named {args.owner!r}; see `shmarena owners`")
        return EXIT_REFUSED
    data = {
        "per_session_bytes": stats["quota_per_session_bytes"],
        "owners": [{k: r[k] for k in ("name", "scope", "bytes", "quota")} for r in owners],
    }
    if args.json:
        print_json(data)
        return EXIT_OK
    shown = format_size(data["per_session_bytes"]) if data["per_session_bytes"] else "none"
    print(f"per-session quota: {shown}")
    if not data["owners"]:
        print("no owner has a quota of its own (set one: shmarena quota OWNER SIZE)")
        return EXIT_OK
    cells = (
        (
            r["name"],
            r["scope"],
            format_size(r["bytes"]),
            format_size(r["quota"]) if r["quota"] else "none",
        )
        for r in data["owners"]
    )
    columns = [("owner", "left"), ("scope", "left"), ("bytes", "right"), ("quota", "right")]
    print_table(f"owner quotas of {args.name!r}", columns, cells)
    return EXIT_OK


def cmd_recycle(args: argparse.Namespace) -> int:
    """`shmarena recycle OWNER`, or every owner `--prefix` and/or `--older-than`
    select (`--dry-run`: only say which); one line per owner, then the total."""
    refused = _recycle_usage(args)
    if refused:
        print(f"shmarena recycle: {refused}", file=sys.stderr)
        return EXIT_USAGE
    with _client(args) as client:
        if args.owner is not None and not args.dry_run:
            result = client.recycle(args.owner)  # UnknownOwner: exit 1, naming it
            done = [_outcome({"name": args.owner}, "recycled", result.blocks, result.bytes)]
            listed = 1
        else:
            listing = client.list_owners()
            listed = len(listing)
            if args.owner is not None:
                chosen = [row for row in listing if row["name"] == args.owner]
                if not chosen:
                    print(f"shmarena recycle: no owner named {args.owner!r}; see `shmarena owners`",
                          file=sys.stderr)  # fmt: skip
                    return EXIT_REFUSED
            else:
                chosen = select_owners(listing, args.prefix, args.older_than)
            done = [_recycle_row(client, row, args.dry_run) for row in chosen]
    if args.json:
        print_json(done)
    elif args.owner is not None:
        print(_recycled_line(done[0]))
    else:
        _print_recycled(done, _selection(args), listed)
    return EXIT_OK


def _recycle_usage(args: argparse.Namespace) -> str:
    """Why these recycle arguments cannot go together ("" when they can)."""
    selecting = args.prefix is not None or args.older_than is not None
    if args.owner is not None and selecting:
        return (
            f"give an OWNER ({args.owner!r}) or select owners with --prefix/--older-than, not both"
        )
    if args.owner is None and not selecting:
        return "name an OWNER, or select owners with --prefix P and/or --older-than AGE"
    if args.prefix == "" and args.older_than is None:
        return (
            '--prefix "" matches every owner: add --older-than AGE to recycle every owner '
            "that old, or give the prefix of the owners you mean (like pickle-)"
        )
    return ""


def select_owners(
    rows: list[dict[str, Any]], prefix: str | None, older_than: float | None
) -> list[dict[str, Any]]:
    """The owners of a listing that `recycle --prefix/--older-than` selects:
    name starting with `prefix`, at least `older_than` seconds old (a None
    selector lets every owner pass). A live session's implicit owner
    (session-N) is selected only when the prefix itself starts with 'session':
    recycling it pulls the blocks from under a running process."""
    names_sessions = prefix is not None and prefix.startswith("session")
    return [
        row
        for row in rows
        if (prefix is None or row["name"].startswith(prefix))
        and (older_than is None or row["age_s"] >= older_than)
        and (names_sessions or not _live_implicit(row))
    ]


def _live_implicit(row: dict[str, Any]) -> bool:
    return row["name"] == f"session-{row['session']}" and bool(row.get("alive", True))


def _outcome(row: dict[str, Any], status: str, blocks: int, size: int) -> dict[str, Any]:
    return {"name": row["name"], "status": status, "blocks": blocks, "bytes": size}


def _recycle_row(client: Client, row: dict[str, Any], dry_run: bool) -> dict[str, Any]:
    """Recycle one selected owner (or, dry run, say what it holds). One gone
    since the listing (its process recycled it, its session ended) is skipped."""
    if dry_run:
        return _outcome(row, "would recycle", row["blocks"], row["bytes"])
    try:
        result = client.recycle(row["name"])
    except UnknownOwner:
        return _outcome(row, "skipped", 0, 0)
    return _outcome(row, "recycled", result.blocks, result.bytes)


def _recycled_line(outcome: dict[str, Any]) -> str:
    name, status = outcome["name"], outcome["status"]
    if status == "skipped":
        return f"skipped {name!r}: gone since the listing (recycled or its session ended)"
    return f"{status} {name!r}: {outcome['blocks']} blocks, {format_size(outcome['bytes'])}"


def _selection(args: argparse.Namespace) -> str:
    words = [] if args.prefix is None else [f"--prefix {args.prefix!r}"]
    if args.older_than is not None:
        words.append(f"--older-than {args.older_than:g}s")
    return " ".join(words)


def _print_recycled(done: list[dict[str, Any]], selection: str, listed: int) -> None:
    if not done:
        print(f"no owner matches {selection} ({listed} owners in all); nothing recycled")
        return
    for outcome in done:
        print(_recycled_line(outcome))
    taken = [o for o in done if o["status"] != "skipped"]
    blocks, size = sum(o["blocks"] for o in taken), sum(o["bytes"] for o in taken)
    verb = (
        "would be recycled (dry run: nothing changed)"
        if done[0]["status"] == "would recycle"
        else "recycled"
    )
    skipped = len(done) - len(taken)
    print(
        f"total: {_count(len(taken), 'owner')}, {_count(blocks, 'block')}, "
        f"{format_size(size)} {verb}" + (f"; {skipped} skipped" if skipped else "")
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def cmd_check(args: argparse.Namespace) -> int:
    """`shmarena check`: the daemon verifies its invariants; exit 1 if one is broken."""
    with _client(args) as client:
        problems = client.check()
    if problems:
        for problem in problems:
            print(f"BROKEN: {problem}")
        return EXIT_REFUSED
    print("ok: allocator and ledger invariants hold")
    return EXIT_OK


def cmd_shutdown(args: argparse.Namespace) -> int:
    """`shmarena shutdown`: ask the daemon to stop cleanly."""
    client = _client(args)
    pid = client.info.get("pid")
    client.shutdown()
    print(f"shmarena daemon {args.name!r} (pid {pid}) is stopping")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    """`shmarena inspect PATH`: a backing file and its table, without a daemon."""
    from shmarena.daemon.store import inspect_file  # the daemon's code, only here

    report, problems = inspect_file(args.path)
    if args.json:
        print_json({**report, "problems": problems})
    else:
        print_inspect(report, problems, args.blocks)
    return EXIT_REFUSED if problems else EXIT_OK
