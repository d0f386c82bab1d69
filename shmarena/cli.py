"""The `shmarena` command: the daemon, the admin commands and the demo.

Every admin command goes through the client library (one way to do a thing).
Exit codes: 0 ok, 1 refused by the daemon or check failed, 2 usage,
3 daemon unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from shmarena import __version__, views
from shmarena.client.client import Client
from shmarena.config import (
    DEFAULT_LEASE_S,
    DEFAULT_MIN_BLOCK_BYTES,
    DEFAULT_SIZE_BYTES,
    check_arena_size,
    check_min_block,
    format_age,
    format_pct,
    format_size,
    parse_size,
    resolve_name,
    runtime_dir,
    socket_path,
)
from shmarena.daemon.service import ALLOCATORS, OP_NAMES
from shmarena.errors import DaemonStartError, DaemonUnavailable, ShmArenaError
from shmarena.rundir import open_in_run_dir, prepare_runtime_dir
from shmarena.shm.arena import shm_path
from shmarena.shm.journal import CRASH_POINTS, CrashPoints
from shmarena.spawn import shmarena_command

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fraction_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # --name and --runtime-dir are accepted before or after the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--name",
        default=argparse.SUPPRESS,
        help="daemon name (default: $SHMARENA_NAME, else 'default')",
    )
    common.add_argument(
        "--runtime-dir",
        default=argparse.SUPPRESS,
        help="directory of the socket and lock (default: $SHMARENA_RUNTIME_DIR, "
        "else $XDG_RUNTIME_DIR/shmarena, else /tmp/shmarena-UID)",
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS,
        help="seconds to wait for the daemon (default 5)",
    )
    parser = argparse.ArgumentParser(
        prog="shmarena",
        description="A shared-memory allocator service for Python processes on one host.",
        epilog="exit codes: 0 ok, 1 refused by the daemon or check failed, 2 usage, "
        "3 daemon unreachable",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"shmarena {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_text, description=help_text)

    daemon = add(
        "daemon",
        "run the daemon in the foreground (Ctrl-C or SIGTERM stop it cleanly)",
    )
    daemon.add_argument(
        "--size",
        type=_size_arg,
        default=None,
        help="arena size (default 1G; with an existing --backing file, the file's)",
    )
    daemon.add_argument(
        "--min-block",
        type=_size_arg,
        default=None,
        help="smallest block, a power of two from 64 bytes (default 4K; with an existing "
        "--backing file, the file's)",
    )
    daemon.add_argument(
        "--allocator",
        choices=tuple(ALLOCATORS),
        default=None,
        help="how the arena is carved: 'extents' (default: any free run, neighbours "
        "joined at once; 99%% of the arena usable under churn) or 'buddy' "
        "(power-of-two aligned blocks)",
    )
    daemon.add_argument(
        "--quota-per-session",
        type=_size_arg,
        default=0,
        metavar="SIZE",
        help="most a session may hold in its own owners and its cache (default: no quota); "
        "`shmarena quota --per-session` changes it while running",
    )
    daemon.add_argument(
        "--lease",
        type=float,
        default=DEFAULT_LEASE_S,
        help="seconds of silence after which a client that cannot be watched by "
        f"pidfd is reclaimed (default {DEFAULT_LEASE_S:g})",
    )
    daemon.add_argument(
        "--group",
        metavar="G",
        help="let members of group G (name or gid) use the daemon: runtime dir 0750, "
        "socket and arena 0660, all owned by G (default: this user only, 0700/0600)",
    )
    daemon.add_argument(
        "--backing",
        metavar="PATH",
        help="keep the arena in this file (any file system; a DAX mount for persistent "
        "memory): it and its allocation table (PATH.table) survive restarts and crashes. "
        "Made with --size if missing; never removed by the daemon",
    )
    daemon.add_argument(
        "--durability",
        choices=("none", "batch", "sync"),
        default=None,
        help="with --backing: 'batch' (default) writes and syncs each loop wake-up's changes "
        "before its replies go out; 'sync' does so for each request; 'none' writes the "
        "table only at a clean stop (after a crash the arena starts empty)",
    )
    daemon.add_argument(
        "--grace",
        type=float,
        default=15.0,
        metavar="S",
        help="with --backing: seconds the sessions recovered after a restart wait for "
        "their clients to come back before they are reclaimed (default 15)",
    )
    daemon.add_argument(
        "--numa-node",
        type=int,
        metavar="N",
        help="bind the arena's pages to NUMA node N before any is touched, pre-fault them, "
        "and run the daemon on N's CPUs; `stats` shows where the pages are, read back from "
        "the kernel",
    )
    daemon.add_argument(
        "--numa-interleave",
        action="store_true",
        help="spread the arena's pages over every NUMA node with memory",
    )
    daemon.add_argument(
        "--hugepages",
        action="store_true",
        help="back the arena with huge pages: a hugetlbfs mount with enough free pages, "
        "else transparent huge pages where the kernel allows them for shared memory; "
        "refuses to start, saying what to change, when neither is possible",
    )
    daemon.add_argument(
        "--max-size",
        type=_size_arg,
        default=None,
        metavar="SIZE",
        help="let the arena grow past --size, by segments, up to SIZE in all: when a request "
        "finds no room, a segment as large as the arena is added (larger if the request "
        "needs it), and clients map it when they first meet it",
    )
    daemon.add_argument(
        "--shrink-after",
        type=float,
        default=30.0,
        metavar="S",
        help="with --max-size: release an added segment once it has been empty for S "
        "seconds (default 30; 0 keeps them)",
    )
    daemon.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="P",
        help="serve Prometheus metrics at http://ADDR:P/metrics (0: any free port, logged and "
        "shown in `stats` as metrics.port); needs pip install 'shmarena[metrics]'",
    )
    daemon.add_argument(
        "--metrics-bind",
        default="127.0.0.1",
        metavar="ADDR",
        help="address of the metrics endpoint (default 127.0.0.1, this host only)",
    )
    daemon.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="how the daemon logs to stderr: 'text' (default: one line per event, for people) "
        "or 'json' (one object per line with ts, level, event, msg and the event's fields, "
        "for journald, Docker and log shippers)",
    )
    daemon.add_argument(
        "--detach",
        action="store_true",
        help="start in the background and return once the daemon answers",
    )
    debug = daemon.add_argument_group("fault injection (for testing clients; never in production)")
    debug.add_argument(
        "--debug-drop-replies",
        type=_fraction_arg,
        default=0.0,
        metavar="P",
        help="drop this fraction (0..1) of replies; clients resend after retry_s "
        "(shmarena.connect(retry_s=...)) and are answered from the reply cache",
    )
    debug.add_argument(
        "--debug-delay-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="hold each reply back by a random 0..MS milliseconds",
    )
    debug.add_argument(
        "--debug-seed", type=int, default=None, help="seed for the two options above"
    )
    debug.add_argument(
        "--debug-crash-at",
        metavar="POINT[#N]",
        help="SIGKILL the daemon the Nth time (default 1st) it reaches POINT of the "
        "table's persistence path: " + ", ".join(CRASH_POINTS),
    )
    debug.add_argument(
        "--debug-fail",
        action="append",
        default=[],
        metavar="OP",
        help="make every request of OP (an op name: alloc, free, qput, ...) raise inside the "
        "daemon, with 'wake' every kept request as it is answered, with 'commit' every write "
        "of a --backing table after it took the changes; it must answer internal_error, "
        "keep the table whole and go on (repeatable)",
    )
    debug.add_argument(
        "--debug-compact-bytes",
        type=_size_arg,
        default=None,
        metavar="SIZE",
        help="rewrite the table's journal once it grows past SIZE (default 8M)",
    )

    for command, text in (
        ("status", "one screen: pid, uptime, size, used, free, largest free, owners, clients"),
        ("stats", "everything, including free blocks per order (like /proc/buddyinfo)"),
        ("owners", "per owner: name, scope, session/pid, blocks, bytes, quota, age, sites"),
        ("clients", "connected sessions: pid, since, blocks, bytes"),
        ("names", "published names: name, owner, session, bytes, sealed, age"),
    ):
        cmd = add(command, text)
        cmd.add_argument("--json", action="store_true", help="print JSON for scripts")
        if command == "owners":
            cmd.add_argument(
                "--older-than",
                type=_duration_arg,
                default=None,
                metavar="AGE",
                help="only owners at least this old: 90s, 10m, 2h, 1d (leak hunting)",
            )
            cmd.add_argument(
                "--sort",
                choices=("bytes", "age", "name"),
                default=None,
                help="order by bytes held or age (largest/oldest first), or name",
            )
        if command == "names":
            cmd.add_argument("--prefix", default="", help="only names that start with this")
    quota = add(
        "quota",
        "show quotas, or set an owner's (SIZE, or none) or the per-session one "
        "(an allocation over a quota is refused with QuotaExceeded)",
    )
    quota.add_argument("owner", nargs="?", help="owner name (see `shmarena owners`)")
    quota.add_argument("size", nargs="?", help="the owner's new quota: a size like 64M, or none")
    quota.add_argument(
        "--per-session", metavar="SIZE", help="set the per-session quota (a size, or none)"
    )
    quota.add_argument("--json", action="store_true", help="print JSON for scripts")
    recycle = add("recycle", "recycle one owner: free every block it holds")
    recycle.add_argument("owner", help="owner name (see `shmarena owners`)")
    add("check", "verify the allocator's invariants in the running daemon; exit 1 if broken")
    add("shutdown", "stop the daemon cleanly")
    inspect = add(
        "inspect",
        "read a --backing file and its table without a daemon: header, owners, blocks; "
        "verify the table and the allocator's invariants; exit 1 on any inconsistency",
    )
    inspect.add_argument("path", help="the backing file (its table is PATH.table)")
    inspect.add_argument("--json", action="store_true", help="print JSON for scripts")
    inspect.add_argument(
        "--blocks",
        action="store_true",
        help="list every block (default: only when there are at most 100)",
    )

    views.add_commands(add)  # top, map

    demo = add(
        "demo",
        "run a small producer/consumer pipeline through the arena and report "
        "throughput, latency and leaks (starts a temporary daemon if none runs)",
    )
    demo.add_argument("--producers", type=int, default=3, help="producer processes (default 3)")
    demo.add_argument("--batches", type=int, default=20, help="batches per producer (default 20)")
    demo.add_argument("--frames", type=int, default=8, help="frames per batch (default 8)")
    demo.add_argument(
        "--frame-size", type=_size_arg, default=1 << 20, help="bytes per frame (default 1M)"
    )
    demo.add_argument(
        "--size",
        type=_size_arg,
        default=256 << 20,
        help="arena size of the temporary daemon (default 256M)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.name = getattr(args, "name", None)
    args.runtime_dir = getattr(args, "runtime_dir", None)
    args.timeout = getattr(args, "timeout", 5.0)
    try:
        args.name = resolve_name(args.name, os.environ)
    except ValueError as exc:
        parser.error(str(exc))
    args.run_dir = args.runtime_dir or runtime_dir(os.environ, os.getuid())
    handler = COMMANDS[args.command]
    try:
        return handler(args)
    except DaemonUnavailable as exc:
        print(f"shmarena: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ShmArenaError as exc:
        print(f"shmarena: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130


# -- daemon -------------------------------------------------------------------


def cmd_daemon(args: argparse.Namespace) -> int:
    if args.backing is None and args.durability is not None:
        print(
            f"shmarena daemon: --durability {args.durability} needs --backing PATH: a shm arena "
            "keeps no table (it is gone when the daemon stops)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    args.durability = args.durability or "batch"
    if args.backing is None:  # a backing file that exists has its own
        args.size = DEFAULT_SIZE_BYTES if args.size is None else args.size
        args.min_block = DEFAULT_MIN_BLOCK_BYTES if args.min_block is None else args.min_block
        args.allocator = args.allocator or "extents"
    refused = _daemon_combination(args) or _metrics_refusal(args)
    if refused:
        print(f"shmarena daemon: {refused}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.min_block is not None:
            check_min_block(args.min_block)
        if args.size is not None:
            check_arena_size(args.size, args.min_block or DEFAULT_MIN_BLOCK_BYTES)
        CrashPoints(args.debug_crash_at)
        _check_fault_names(args.debug_fail)
    except ValueError as exc:
        print(f"shmarena daemon: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.detach:
        return _detach(args)
    from shmarena.daemon.server import DaemonOptions, run_daemon

    options = DaemonOptions(
        name=args.name,
        run_dir=args.run_dir,
        size_bytes=args.size,
        min_block_bytes=args.min_block,
        lease_s=args.lease,
        quota_per_session=args.quota_per_session,
        allocator=args.allocator,
        group=args.group,
        backing=args.backing,
        durability=args.durability,
        grace_s=args.grace,
        numa_node=args.numa_node,
        numa_interleave=args.numa_interleave,
        hugepages=args.hugepages,
        max_size_bytes=args.max_size,
        shrink_after_s=args.shrink_after,
        debug_drop_replies=args.debug_drop_replies,
        debug_delay_ms=args.debug_delay_ms,
        debug_seed=args.debug_seed,
        debug_crash_at=args.debug_crash_at,
        debug_fail=tuple(args.debug_fail),
        metrics_port=args.metrics_port,
        metrics_bind=args.metrics_bind,
        log_format=args.log_format,
    )
    if args.debug_compact_bytes is not None:
        options.compact_bytes = args.debug_compact_bytes
    try:
        run_daemon(options)
    except DaemonStartError as exc:
        if args.log_format == "json":  # a log shipper reads this line too
            from shmarena.daemon.logs import LogEvent, render_json

            event = LogEvent("start_failed", str(exc), "error", {"name": args.name})
            print(render_json(event, time.time()), file=sys.stderr)
        else:
            print(f"shmarena daemon: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


def _check_fault_names(names: list[str]) -> None:
    """--debug-fail takes op names, 'wake' and 'commit'; ValueError names the others."""
    known = sorted(OP_NAMES.values()) + ["wake", "commit"]
    for name in names:
        if name not in known:
            raise ValueError(f"--debug-fail {name!r}: not an op; pick one of {', '.join(known)}")


def _daemon_combination(args: argparse.Namespace) -> str:
    """Why these daemon options cannot go together ("" when they can)."""
    if args.numa_node is not None and args.numa_interleave:
        return "--numa-node and --numa-interleave exclude each other: bind to one node or spread"
    if args.backing is not None:
        for given, option in (
            (args.numa_node is not None or args.numa_interleave, "--numa-node/--numa-interleave"),
            (args.hugepages, "--hugepages"),
            (args.max_size is not None, "--max-size"),
        ):
            if given:
                return (
                    f"{option} applies to shm arenas, not to a --backing file: its pages are "
                    "the file system's (a DAX file's node is its device's), and it keeps its "
                    "size; leave the option out, or drop --backing"
                )
    if args.max_size is not None and args.max_size < (args.size or 0):
        return (
            f"--max-size {format_size(args.max_size)} is below --size {format_size(args.size)}; "
            "the arena starts at --size and grows up to --max-size"
        )
    if args.max_size is not None and (args.size or 0) > 1 << 40:
        return "--max-size needs a --size of at most 1 TiB (the largest segment)"
    if args.shrink_after < 0:
        return f"--shrink-after must be 0 or more seconds, got {args.shrink_after:g}"
    return ""


def _metrics_refusal(args: argparse.Namespace) -> str:
    """Why --metrics-port cannot be served ("" when it can, or is not asked for)."""
    if args.metrics_port is None:
        return ""
    if not 0 <= args.metrics_port <= 65535:
        return f"--metrics-port must be 0..65535 (0: any free port), got {args.metrics_port}"
    from shmarena.daemon.metrics import missing_package

    return missing_package()


def _detach(args: argparse.Namespace) -> int:
    """Start the daemon as a new session leader and wait until it answers."""
    command = shmarena_command(
        "daemon",
        "--name",
        args.name,
        "--runtime-dir",
        args.run_dir,
        "--lease",
        str(args.lease),
        "--log-format",
        args.log_format,
    )
    if args.quota_per_session:
        command += ["--quota-per-session", str(args.quota_per_session)]
    if args.min_block is not None:
        command += ["--min-block", str(args.min_block)]
    if args.allocator is not None:
        command += ["--allocator", args.allocator]
    if args.size is not None:
        command += ["--size", str(args.size)]
    if args.group is not None:
        command += ["--group", args.group]
    if args.numa_node is not None:
        command += ["--numa-node", str(args.numa_node)]
    if args.numa_interleave:
        command += ["--numa-interleave"]
    if args.hugepages:
        command += ["--hugepages"]
    if args.max_size is not None:
        command += ["--max-size", str(args.max_size), "--shrink-after", str(args.shrink_after)]
    if args.metrics_port is not None:
        command += ["--metrics-port", str(args.metrics_port), "--metrics-bind", args.metrics_bind]
    if args.backing is not None:
        command += ["--backing", os.path.abspath(args.backing)]
        command += ["--durability", args.durability, "--grace", str(args.grace)]
    if args.debug_drop_replies or args.debug_delay_ms:
        command += [
            "--debug-drop-replies",
            str(args.debug_drop_replies),
            "--debug-delay-ms",
            str(args.debug_delay_ms),
        ]
        if args.debug_seed is not None:
            command += ["--debug-seed", str(args.debug_seed)]
    for op in args.debug_fail:
        command += ["--debug-fail", op]
    # The runtime dir as the daemon would make or accept it, before the log
    # is opened in it (never through a link someone left there).
    from shmarena.daemon.server import resolve_group

    prepare_runtime_dir(args.run_dir, None if args.group is None else resolve_group(args.group))
    log_path = os.path.join(args.run_dir, f"{args.name}.log")
    log_fd = open_in_run_dir(log_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, "log file")
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            start_new_session=True,
        )
        return _wait_detached(args, process, log_fd, log_path)
    finally:
        os.close(log_fd)


def _wait_detached(
    args: argparse.Namespace, process: subprocess.Popen[bytes], log_fd: int, log_path: str
) -> int:
    deadline = time.monotonic() + max(args.timeout, 10.0)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            size = os.fstat(log_fd).st_size
            tail = os.pread(log_fd, 2000, max(0, size - 2000)).decode(errors="replace")
            print(f"shmarena daemon failed to start:\n{tail}", file=sys.stderr)
            return EXIT_REFUSED
        try:
            with Client(args.name, runtime_dir=args.run_dir, timeout_s=1.0) as client:
                client.ping()
        except DaemonUnavailable:
            time.sleep(0.05)
            continue
        print(f"shmarena daemon {args.name!r} running, pid {process.pid}, log {log_path}")
        return EXIT_OK
    print(
        f"shmarena daemon (pid {process.pid}) did not answer within "
        f"{max(args.timeout, 10.0):g} s; see {log_path}",
        file=sys.stderr,
    )
    return EXIT_UNREACHABLE


# -- admin --------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    return Client(args.name, runtime_dir=args.run_dir, timeout_s=args.timeout, label="cli")


def _query(args: argparse.Namespace, ask: Callable[[Client], Any]) -> Any:
    """Ask the daemon through the client library; with --json print the
    answer and return None, else return it for a table."""
    with _client(args) as client:
        data = ask(client)
    if args.json:
        _print_json(data)
        return None
    return data


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def cmd_status(args: argparse.Namespace) -> int:
    stats = _query(args, Client.stats)
    if stats is None:
        return EXIT_OK
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
            else f"{format_size(size)} at {_where(stats['segments'][0]['where'])}",
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
    _console().print(table)
    return EXIT_OK


def _where(where: str) -> str:
    """A segment's place for people: /dev/shm/NAME for a shm name."""
    return shm_path(where) if where.startswith("/") and where.count("/") == 1 else where


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


def cmd_stats(args: argparse.Namespace) -> int:
    stats = _query(args, Client.stats)
    if stats is None:
        return EXIT_OK
    console = _console()
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
    console.print(table)
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
    console.print(orders)
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
            _where(row["where"]),
        )
    console.print(segments)
    pages = stats.get("pages")
    if pages:
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
        console.print(table)
        if placement.get("requested"):
            requested = placement["requested"]
            console.print(
                f"NUMA: asked {requested['policy']} to node(s) {requested['nodes']} "
                f"(via {requested['via']}; {placement['resident_pages_at_bind']} pages existed "
                f"when bound); the daemon runs on CPUs {placement['daemon_cpus']}"
            )
    return EXIT_OK


def _print_table(
    title: str, columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[str]]
) -> None:
    table = Table(title=title)
    for name, justify in columns:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*row)
    _console().print(table)


def _duration_arg(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an age: give seconds or a number with s, m, h or d (10m)"
        )
    return value


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
    _print_table(f"owners of {args.name!r}", columns, cells)
    return EXIT_OK


def cmd_clients(args: argparse.Namespace) -> int:
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
            f"{datetime.fromtimestamp(row['since']):%H:%M:%S} ({format_age(row['age_s'])})",
            row["watch"],
            str(row["owners"]),
            str(row["blocks"]),
            format_size(row["bytes"]),
            format_size(row.get("cached_bytes", 0)),
        )
        for row in rows
    )
    _print_table(f"clients of {args.name!r}", [(n, "left") for n in names], cells)
    return EXIT_OK


def cmd_names(args: argparse.Namespace) -> int:
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
    _print_table(f"names in {args.name!r}", columns, cells)
    return EXIT_OK


def _quota_arg(text: str) -> int:
    return 0 if text.lower() in ("none", "0") else _size_arg(text)


def cmd_quota(args: argparse.Namespace) -> int:
    try:
        per_session = None if args.per_session is None else _quota_arg(args.per_session)
        size = None if args.size is None else _quota_arg(args.size)
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
        _print_json(data)
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
    _print_table(f"owner quotas of {args.name!r}", columns, cells)
    return EXIT_OK


def cmd_recycle(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.recycle(args.owner)
    print(f"recycled {args.owner!r}: {result.blocks} blocks, {format_size(result.bytes)}")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    with _client(args) as client:
        problems = client.check()
    if problems:
        for problem in problems:
            print(f"BROKEN: {problem}")
        return EXIT_REFUSED
    print("ok: allocator and ledger invariants hold")
    return EXIT_OK


def cmd_shutdown(args: argparse.Namespace) -> int:
    client = _client(args)
    pid = client.info.get("pid")
    client.shutdown()
    print(f"shmarena daemon {args.name!r} (pid {pid}) is stopping")
    return EXIT_OK


INSPECT_BLOCKS = 100  # blocks inspect lists without --blocks


def cmd_inspect(args: argparse.Namespace) -> int:
    from shmarena.daemon.store import inspect_file

    report, problems = inspect_file(args.path)
    if args.json:
        _print_json({**report, "problems": problems})
        return EXIT_REFUSED if problems else EXIT_OK
    console = _console()
    header = report.get("header")
    if header:
        console.print(
            f"arena file {report['path']}: format {header['format']}, "
            f"{format_size(header['size_bytes'])} from byte {header['data_offset']}, "
            f"min block {format_size(header['min_block_bytes'])}, {header['allocator']}, "
            f"identity {header['identity']}, made for {header['name']!r} "
            f"{datetime.fromtimestamp(header['created_at']):%Y-%m-%d %H:%M:%S}"
        )
    if "epoch" in report:
        console.print(
            f"table: epoch {report['epoch']}, generation {report['generation']}, "
            f"{report['records']} records in {format_size(report['journal_bytes'])}, last "
            f"written by a daemon with durability {report['durability'] or '?'}"
            f"{', stopped cleanly' if report['clean'] else ''}"
        )
    if "used_bytes" in report:
        size = header["size_bytes"] if header else 0
        console.print(
            f"used {format_size(report['used_bytes'])} ({format_pct(report['used_bytes'], size)}), "
            f"cached {format_size(report['cached_bytes'])}, free "
            f"{format_size(report['free_bytes'])}, largest free "
            f"{format_size(report['largest_free_bytes'])}; {len(report['blocks'])} blocks, "
            f"{len(report['owners'])} owners, {len(report['sessions'])} sessions"
        )
        _print_table(
            "owners",
            [("name", "left"), ("scope", "left"), ("session", "right"), ("pid", "right"),
             ("blocks", "right"), ("bytes", "right")],
            [
                [o["name"], o["scope"], str(o["session"]), str(o["pid"]), str(o["blocks"]),
                 format_size(o["bytes"])]
                for o in report["owners"]
            ],
        )  # fmt: skip
        blocks_shown = args.blocks or len(report["blocks"]) <= INSPECT_BLOCKS
        if not blocks_shown:
            console.print(f"({len(report['blocks'])} blocks; `--blocks` lists them all)")
        if blocks_shown:
            _print_table(
                "blocks",
                [("offset", "right"), ("size", "right"), ("generation", "right"),
                 ("owner", "left")],
                [
                    [f"{b['offset']:#x}", str(b["size"]), str(b["generation"]),
                     b["owner"] or ("(cached)" if b["cached"] else
                                    "(pinned)" if b.get("pinned_by") and not b["retainers"]
                                    else "(retained)")]
                    for b in report["blocks"]
                ],
            )  # fmt: skip
    for note in report.get("notes", []):
        console.print(f"note: {note}")
    for problem in problems:
        console.print(f"PROBLEM: {problem}")
    console.print("inspect: " + (f"{len(problems)} problem(s)" if problems else "ok"))
    return EXIT_REFUSED if problems else EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from shmarena.demo import run_demo

    return run_demo(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "daemon": cmd_daemon,
    "status": cmd_status,
    "stats": cmd_stats,
    "owners": cmd_owners,
    "clients": cmd_clients,
    "names": cmd_names,
    "quota": cmd_quota,
    "recycle": cmd_recycle,
    "check": cmd_check,
    "shutdown": cmd_shutdown,
    "demo": cmd_demo,
    "inspect": cmd_inspect,
    **views.COMMANDS,
}

__all__ = ["main", "build_parser", "socket_path"]
