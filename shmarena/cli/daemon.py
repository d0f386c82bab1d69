"""The `daemon` command: check the options, then run the daemon in this
process, or (--detach) start it in a new session and return once it answers.

The daemon's own code (shmarena.daemon.server) is imported only here, when
the command runs, so admin commands like `shmarena stats` start fast.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from shmarena.cli.parser import (
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    add_daemon_options,
)
from shmarena.client.client import Client
from shmarena.config import (
    DEFAULT_MIN_BLOCK_BYTES,
    DEFAULT_SIZE_BYTES,
    check_min_block,
    fit_arena_size,
    format_size,
    rounding_note,
)
from shmarena.daemon.service import OP_NAMES
from shmarena.errors import DaemonStartError, DaemonUnavailable
from shmarena.rundir import open_in_run_dir, prepare_runtime_dir
from shmarena.shm.journal import CrashPoints
from shmarena.spawn import shmarena_command


def cmd_daemon(args: argparse.Namespace) -> int:
    """`shmarena daemon`: run the daemon until it is stopped, or start it
    detached (--detach); exit 2 for options that cannot go together."""
    if args.backing is None and args.durability is not None:
        print(
            f"shmarena daemon: --durability {args.durability} needs --backing PATH: a shm arena "
            "keeps no table (it is gone when the daemon stops)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    options = _with_defaults(args)
    refused = _bad_value(options) or _daemon_combination(options) or _metrics_refusal(options)
    if refused:
        print(f"shmarena daemon: {refused}", file=sys.stderr)
        return EXIT_USAGE
    for note in options.size_notes:  # the detached daemon logs them too
        _say(options, "size_rounded", note)
    if args.detach:  # the child gets the options as given and applies the same defaults
        return _detach(args)
    return _run(options)


def _with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """The options with the defaults that depend on others filled in."""
    options = argparse.Namespace(**vars(args))
    options.durability = args.durability or "batch"
    if args.backing is None:  # a backing file that exists has its own
        options.size = DEFAULT_SIZE_BYTES if args.size is None else args.size
        options.min_block = DEFAULT_MIN_BLOCK_BYTES if args.min_block is None else args.min_block
        options.allocator = args.allocator or "extents"
    return options


def _bad_value(options: argparse.Namespace) -> str:
    """What is wrong with a size, crash point or fault name ("" when nothing).
    --size and --max-size are rounded up to whole minimum blocks here, each
    rounding noted in `options.size_notes`."""
    options.size_notes = []
    try:
        if options.min_block is not None:
            check_min_block(options.min_block)
        block = options.min_block or DEFAULT_MIN_BLOCK_BYTES
        for option, dest in (("--size", "size"), ("--max-size", "max_size")):
            given = getattr(options, dest)
            if given is not None:
                setattr(options, dest, fit_arena_size(given, block, option))
                if getattr(options, dest) != given:
                    note = rounding_note(option, given, getattr(options, dest), block)
                    options.size_notes.append(note)
        CrashPoints(options.debug_crash_at)
        _check_fault_names(options.debug_fail)
    except ValueError as exc:
        return str(exc)
    return ""


def _run(options: argparse.Namespace) -> int:
    """Run the daemon in this process until it stops."""
    from shmarena.daemon.server import DaemonOptions, run_daemon

    daemon = DaemonOptions(
        name=options.name,
        run_dir=options.run_dir,
        size_bytes=options.size,
        min_block_bytes=options.min_block,
        lease_s=options.lease,
        quota_per_session=options.quota_per_session,
        allocator=options.allocator,
        group=options.group,
        backing=options.backing,
        durability=options.durability,
        grace_s=options.grace,
        numa_node=options.numa_node,
        numa_interleave=options.numa_interleave,
        hugepages=options.hugepages,
        max_size_bytes=options.max_size,
        shrink_after_s=options.shrink_after,
        debug_drop_replies=options.debug_drop_replies,
        debug_delay_ms=options.debug_delay_ms,
        debug_seed=options.debug_seed,
        debug_crash_at=options.debug_crash_at,
        debug_fail=tuple(options.debug_fail),
        metrics_port=options.metrics_port,
        metrics_bind=options.metrics_bind,
        log_format=options.log_format,
        warn_used=options.warn_used,
    )
    if options.debug_compact_bytes is not None:
        daemon.compact_bytes = options.debug_compact_bytes
    try:
        run_daemon(daemon)
    except DaemonStartError as exc:
        if options.log_format == "json":  # a log shipper reads this line too
            from shmarena.daemon.logs import LogEvent, render_json

            event = LogEvent("start_failed", str(exc), "error", {"name": options.name})
            print(render_json(event, time.time()), file=sys.stderr)
        else:
            print(f"shmarena daemon: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


def _say(options: argparse.Namespace, event: str, message: str) -> None:
    """One line on stderr, where the daemon logs: as JSON with --log-format json."""
    if options.log_format == "json":  # a log shipper reads this line too
        from shmarena.daemon.logs import LogEvent, render_json

        print(render_json(LogEvent(event, message, "info", {}), time.time()), file=sys.stderr)
    else:
        print(f"shmarena daemon: {message}", file=sys.stderr)


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


def daemon_argv(args: argparse.Namespace) -> list[str]:
    """`daemon` and the options it was given, as the detached child's command
    line. The options are read off the parser itself, so one added there is
    never left behind here; one left at its default is left out."""
    argv = ["daemon", "--name", args.name, "--runtime-dir", args.run_dir]
    parser = argparse.ArgumentParser(add_help=False)
    add_daemon_options(parser)
    for action in parser._actions:
        value = getattr(args, action.dest)
        if action.dest == "detach" or value == action.default:
            continue
        flag = action.option_strings[0]
        if action.nargs == 0:  # a switch
            argv.append(flag)
        elif isinstance(value, list):  # repeatable
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def _detach(args: argparse.Namespace) -> int:
    """Start the daemon as a new session leader and wait until it answers."""
    command = shmarena_command(*daemon_argv(args))
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
