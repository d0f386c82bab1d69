"""Soak test: many client processes churn one daemon while some are SIGKILLed.

What one run does:

- starts its own daemon (shmarena.testing: `python -m shmarena daemon`, name
  soak-<pid>-<rand>) with a private runtime dir (a fresh temporary directory);
- runs --procs worker processes for --duration seconds. Each allocates and
  frees buffers of 64 B .. 4 MiB (log-uniform: most are served by the
  per-process cache, sizes above 1 MiB go to the daemon), into a few
  session-scoped named owners and into its session's own owner, recycles a
  named owner now and then, stamps every buffer (a header with worker id,
  incarnation, sequence number, size and offset; a body derived from it),
  verifies the stamp before every free and recycle, and all its live buffers
  every --verify-every seconds; an OutOfMemory makes it free half of what it
  holds (counted, not an error);
- every --handoff-every seconds a worker hands the handle of one live buffer
  to a checker process, which attaches it from its own session and verifies
  the stamp (see `checker_main` for why this check cannot raise a false
  alarm);
- every --kill-every seconds SIGKILLs a random worker, measures how long the
  daemon takes to drop the killed session (polling `list_clients`), checks
  that its owners went with it, and starts a new incarnation of that worker;
- meanwhile a thread polls `stats`, `owners`, `clients` and `check` through a
  client and another runs the `shmarena status` command now and then, timing
  each; `check` must return [] every time, and every `stats` must satisfy
  size = used + cached + retained-only + free (the extremes of used, cached
  and free bytes go into the figures);
- at the end the workers stop, verify their stamps one last time, `sync()`
  and report what they hold. The daemon's `requested_bytes` must then equal
  the sum of the sizes they hold, and `used_bytes` the sum of those blocks'
  carved sizes (the size class for cached sizes, else the size rounded up to
  the minimum block). After the workers close: nothing used, nothing cached,
  one session (this script's own), `check` clean. Then the daemon is stopped
  with SIGTERM and its socket and arena must be gone.

Run it from the repository root with shmarena installed:

    python scripts/soak.py                          # 8 workers, 2 minutes
    python scripts/soak.py --procs 4 --duration 10 --kill-every 1 --json soak.json

Counters of a killed worker are its last report (sent every 0.25 s), so the
op counts slightly undercount; errors and corruptions are sent at once.

Exit status: 0 when no error, no corrupted byte, `check` always clean and the
accounting held; 1 otherwise (the reasons are printed); 130 on Ctrl-C, 143
on SIGTERM. Everything it started is stopped and removed in every case.

The parts live in scripts/soaking/ (stamps, worker, checker, run, figures);
this file is the command line.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import traceback

from soaking.figures import print_summary, soak_figures
from soaking.run import Soak, Terminated, on_sigterm


def size_arg(text: str) -> int:
    from shmarena.config import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Soak test: worker processes allocate, stamp, verify, free and recycle "
        "buffers of 64 B .. 4 MiB in a daemon of their own while random workers are "
        "SIGKILLed and admin commands are timed; then the daemon's accounting is checked.",
        epilog="exit status: 0 passed; 1 an error, a corrupted byte, an unclean check or "
        "wrong accounting (reasons printed); 130 Ctrl-C; 143 SIGTERM",
    )
    parser.add_argument("--procs", type=int, default=8, help="worker processes (default 8)")
    parser.add_argument(
        "--duration", type=float, default=120.0, help="seconds of load (default 120)"
    )
    parser.add_argument(
        "--kill-every",
        type=float,
        default=2.0,
        help="SIGKILL a random worker (and start a new one) every this many seconds; "
        "0: never (default 2)",
    )
    parser.add_argument(
        "--size",
        type=size_arg,
        default="384M",
        help="arena size of the daemon (default 384M: the workers' live buffers take a "
        "quarter of it, their caches most of the rest, so OutOfMemory is rare but happens)",
    )
    parser.add_argument(
        "--max-size",
        type=size_arg,
        default=None,
        help="let the arena grow by segments up to this (the daemon's --max-size, with "
        "--shrink-after 1); the workers' live bytes are then a quarter of it",
    )
    parser.add_argument(
        "--live-bytes",
        type=size_arg,
        default=None,
        help="live bytes above which a worker only frees (default: arena size / (4 x procs))",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument(
        "--verify-every",
        type=float,
        default=0.5,
        help="seconds between a worker's checks of all its live buffers (default 0.5)",
    )
    parser.add_argument(
        "--handoff-every",
        type=float,
        default=0.1,
        help="seconds between a worker's hand-offs of a live buffer to the checker (default 0.1)",
    )
    parser.add_argument(
        "--admin-every",
        type=float,
        default=0.05,
        help="pause between rounds of stats/owners/clients/check (default 0.05 s)",
    )
    parser.add_argument(
        "--cli-every",
        type=float,
        default=15.0,
        help="seconds between runs of the `shmarena status` command, the first at the "
        "start (default 15)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH as JSON")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (there is none anyway when stdout is not a terminal)",
    )
    args = parser.parse_args(argv)
    if args.procs < 1:
        parser.error("--procs must be at least 1")
    if args.duration <= 0 or args.kill_every < 0:
        parser.error("--duration must be positive and --kill-every not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    soak = Soak(args)
    status = 1
    failure = ""
    try:
        soak.run()
    except KeyboardInterrupt:
        failure, status = "interrupted (Ctrl-C)", 130
    except Terminated:
        failure, status = "terminated (SIGTERM)", 143
    except Exception:  # noqa: BLE001 any failure: reported with the figures, after the cleanup
        failure = f"the soak itself failed:\n{traceback.format_exc()}"
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        soak.cleanup()
    figures = soak_figures(soak)
    if failure:
        figures["ok"] = False
        figures["reasons"].insert(0, failure.splitlines()[0])
        figures["failure"] = failure
    print_summary(figures)
    if failure:
        print(failure, file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    if status != 1:
        return status
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
