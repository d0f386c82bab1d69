"""The `shmarena` command: the daemon, the admin commands and the demo.

Every admin command goes through the client library (one way to do a thing).
Exit codes: 0 ok, 1 refused by the daemon or check failed, 2 usage,
3 daemon unreachable, 141 stdout's reader went away (`| head`), as for grep.

`parser` holds the grammar, `daemon` the daemon command, `admin` the commands
that ask a running daemon, `render` how answers are printed; `main` here
parses, resolves the daemon's name and runtime dir, and maps errors to exit
codes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from shmarena.cli import admin
from shmarena.cli.daemon import cmd_daemon
from shmarena.cli.parser import EXIT_REFUSED, EXIT_UNREACHABLE, build_parser
from shmarena.config import resolve_name, runtime_dir
from shmarena.errors import DaemonUnavailable, ShmArenaError
from shmarena.views import COMMANDS as VIEW_COMMANDS

# What a shell reports for a process ended by SIGPIPE (128 + 13).
EXIT_SIGPIPE = 141


def cmd_demo(args: argparse.Namespace) -> int:
    """`shmarena demo`: a small pipeline through the arena."""
    from shmarena.demo import run_demo

    return run_demo(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "daemon": cmd_daemon,
    "status": admin.cmd_status,
    "stats": admin.cmd_stats,
    "owners": admin.cmd_owners,
    "clients": admin.cmd_clients,
    "names": admin.cmd_names,
    "quota": admin.cmd_quota,
    "recycle": admin.cmd_recycle,
    "check": admin.cmd_check,
    "shutdown": admin.cmd_shutdown,
    "demo": cmd_demo,
    "inspect": admin.cmd_inspect,
    **VIEW_COMMANDS,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run `shmarena ARGV...` (sys.argv[1:] when None); return the exit code."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
    except SystemExit:  # --help, --version, a usage error: argparse printed and exits
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            return _reader_gone()
        raise
    except BrokenPipeError:
        return _reader_gone()
    return code


def _main(argv: Sequence[str] | None) -> int:
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


def _reader_gone() -> int:
    """stdout's reader went away (`shmarena owners | head -1`): end quietly, as
    grep does, with the status of a process ended by SIGPIPE. stdout is pointed
    at /dev/null first so the interpreter's final flush cannot raise again
    (Python's own advice; the SIGPIPE disposition stays as it is, so
    `shmarena daemon` never dies of a closed stdout)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_SIGPIPE


__all__ = ["main", "build_parser"]
