"""The command line's grammar: every command, flag and help text, and the
argument types that turn text into values (sizes, fractions, ages).

It decides nothing and does no I/O; `shmarena.cli.daemon` and
`shmarena.cli.admin` run what it parsed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from shmarena._version import __version__
from shmarena.config import DEFAULT_LEASE_S, parse_size
from shmarena.daemon.service import ALLOCATORS
from shmarena.daemon.usage import parse_warn_used
from shmarena.shm.journal import CRASH_POINTS
from shmarena.views import add_commands as add_view_commands

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

# A subcommand's parser, made with the common options and its help text.
AddCommand = Callable[[str, str], argparse.ArgumentParser]


def size_arg(text: str) -> int:
    """A size like 64M (argparse type)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def fraction_arg(text: str) -> float:
    """A fraction from 0 to 1 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to 1, got {text!r}")
    return value


def duration_arg(text: str) -> float:
    """An age in seconds, or with a unit: 90s, 10m, 2h, 1d (argparse type)."""
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


def warn_used_arg(text: str) -> str:
    """A --warn-used threshold: 90%, 0.9 or 900M (argparse type; kept as
    text, which the daemon parses again, so --detach hands it on as given)."""
    try:
        parse_warn_used(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def quota_arg(text: str) -> int:
    """A quota: a size, or none (0)."""
    return 0 if text.lower() in ("none", "0") else size_arg(text)


def build_parser() -> argparse.ArgumentParser:
    """The `shmarena` parser: the common options, then one subcommand."""
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
        "3 daemon unreachable, 141 the reader of the output went away (| head), as for grep",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"shmarena {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_text, description=help_text)

    add_daemon_options(
        add("daemon", "run the daemon in the foreground (Ctrl-C or SIGTERM stop it cleanly)")
    )
    _add_admin_commands(add)
    add_view_commands(add)  # top, map
    _add_demo(add)
    return parser


def add_daemon_options(daemon: argparse.ArgumentParser) -> None:
    """The `daemon` command's own options (`--detach` hands them on to the
    daemon it starts, so each is parsed back from its value's str())."""
    daemon.add_argument(
        "--size",
        type=size_arg,
        default=None,
        help="arena size: 1G, 512M, 1.5G, 1 GiB, 1_000_000 (binary units; default 1G; with an "
        "existing --backing file, the file's); rounded up to whole --min-block blocks",
    )
    daemon.add_argument(
        "--min-block",
        type=size_arg,
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
        type=size_arg,
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
        type=size_arg,
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
        "--warn-used",
        type=warn_used_arg,
        default=None,
        metavar="LEVEL",
        help="log one warning (event used_high) when used bytes reach LEVEL: a percentage "
        "(90%%) or fraction (0.9) of the arena's size (with --max-size, of that cap), or a "
        "size (900M); and one used_normal when they fall back 5 points of the size below "
        "it. Each rise is counted (counters.used_warnings, shmarena_used_warnings_total); "
        "`stats` shows used_warning while it lasts",
    )
    daemon.add_argument(
        "--detach",
        action="store_true",
        help="start in the background and return once the daemon answers",
    )
    debug = daemon.add_argument_group("fault injection (for testing clients; never in production)")
    debug.add_argument(
        "--debug-drop-replies",
        type=fraction_arg,
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
        type=size_arg,
        default=None,
        metavar="SIZE",
        help="rewrite the table's journal once it grows past SIZE (default 8M)",
    )


def _add_admin_commands(add: AddCommand) -> None:
    for command, text in (
        ("status", "one screen: pid, uptime, size, used, free, largest free, owners, clients"),
        ("stats", "everything, including free blocks per order (like /proc/buddyinfo)"),
        ("owners", "per owner: name, scope, session/pid, blocks, bytes, quota, age, sites"),
        ("clients", "connected sessions: pid, since, blocks, bytes"),
        ("names", "published names: name, owner, session, bytes, sealed, age"),
    ):
        cmd = add(command, text)
        cmd.add_argument("--json", action="store_true", help="print JSON for scripts")
        if command == "stats":
            cmd.add_argument(
                "--reset-peak",
                action="store_true",
                help="set peak_used_bytes to the used bytes now and print the peak before "
                "and after (the daemon's own user and root only)",
            )
        if command == "owners":
            cmd.add_argument(
                "--older-than",
                type=duration_arg,
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
    _add_recycle(add)
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


def _add_recycle(add: AddCommand) -> None:
    recycle = add(
        "recycle",
        "recycle owners: free every block they hold. Name one OWNER, or select owners with "
        "--prefix and/or --older-than (both given: both must hold); one line per owner "
        "recycled, then the total",
    )
    recycle.add_argument("owner", nargs="?", help="owner name (see `shmarena owners`)")
    recycle.add_argument(
        "--prefix",
        metavar="P",
        default=None,
        help="every owner whose name starts with P, like pickle- or batch-; a live "
        "session's implicit owner (session-N) only when P itself starts with 'session'; "
        "an empty P (every owner) only together with --older-than",
    )
    recycle.add_argument(
        "--older-than",
        type=duration_arg,
        default=None,
        metavar="AGE",
        help="every owner at least AGE old: 90s, 10m, 2h, 1d, 0.5s (live sessions' implicit "
        "owners left out, as above)",
    )
    recycle.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be recycled and change nothing",
    )
    recycle.add_argument("--json", action="store_true", help="print JSON for scripts")


def _add_demo(add: AddCommand) -> None:
    demo = add(
        "demo",
        "run a small producer/consumer pipeline through the arena and report "
        "throughput and leaks, then time one alloc+free as a cache hit, as a round trip "
        "through the daemon, and as multiprocessing.shared_memory create+unlink "
        "(starts a temporary daemon if none runs)",
    )
    demo.add_argument("--producers", type=int, default=3, help="producer processes (default 3)")
    demo.add_argument("--batches", type=int, default=20, help="batches per producer (default 20)")
    demo.add_argument("--frames", type=int, default=8, help="frames per batch (default 8)")
    demo.add_argument(
        "--frame-size",
        type=size_arg,
        default=1 << 20,
        help="bytes per frame, and the buffer size timed at the end, up to the largest size "
        "a client caches (default 1M)",
    )
    demo.add_argument(
        "--size",
        type=size_arg,
        default=256 << 20,
        help="arena size of the temporary daemon (default 256M)",
    )
