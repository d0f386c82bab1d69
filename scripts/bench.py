"""Benchmark shmarena against its alternatives and its own floors, side by side.

What it measures (one run, nine sections):

1. alloc+free latency per pair at 4 KiB, 64 KiB, 1 MiB and 16 MiB for a cached
   client (cache=True), an uncached client (cache=False: every call is a round
   trip to the daemon), multiprocessing.shared_memory (create, close, unlink),
   iceoryx2's loan+release of an unsent sample (where it is installed), and
   the transport floor: one raw ZeroMQ DEALER -> ROUTER round trip of a
   30-byte message to an echo process.
2. aggregate cached alloc+free throughput at 64 KiB with one and with two
   client processes started together (each its own client).
3. handing a numpy array of 1, 16 and 256 MiB from this process (the producer)
   to a consumer process, which makes an array over the data, reads one element
   and acks with one byte: a shmarena handle, a shared_memory segment name, the
   array itself through a multiprocessing.Queue (a pickled copy), the array
   through a shmarena.Queue (one already in the arena: named, not copied; and a
   plain one: copied into the arena once), and the token floor (8 bytes
   through the same Pipe / multiprocessing.Queue, plus the ack).
   pipeline (listed here, run right after 3): frames of 1 and 16 MiB from a
   producer to a reader process: alloc, write every byte, hand over, the
   reader reads every page (one byte per 4 KiB) and answers, free; shmarena
   (default client, plain attach), shared_memory (a segment per frame, and
   one reused), multiprocessing.Queue, iceoryx2 where installed.
4. memory efficiency of a fresh 1 GiB arena: log-uniform requests of
   4 KiB .. 4 MiB (fixed seed) until the first OutOfMemory, then ten rounds of
   "free a random half of the live buffers, refill until OutOfMemory"; by one
   uncached client, and by a default client (cache on) while three more
   processes hold warm caches (each allocated and freed a spread of sizes).
5. scale: 64 KiB alloc+free latency (cached and uncached) with 1 000 and with
   1 000 000 live blocks (100 000 with --quick) in the daemon, and the daemon's
   RSS at both. Two daemons started alike (256 MiB, min block 64 B) hold the
   two states side by side, so that both are measured interleaved.
6. persist: 64 KiB alloc+free (cached and uncached) against daemons whose
   arena is a backing file, by --durability: none, batch and sync on tmpfs,
   and batch on the disk of the temp dir ("batch-disk", where fdatasync waits
   for the device); ratios to none.
7. pages: first-touch cost per GiB of a fresh segment: what the daemon pays
   making it (fallocate, or a pre-fault as --numa-node does) and what a fresh
   client process pays mapping it and writing one byte per 4 KiB page, lazily
   or with populate=True; against a bare ftruncate'd segment, and on huge
   pages (hugetlbfs, shmem THP) where available. As root it reserves huge
   pages, mounts hugetlbfs and sets shmem_enabled for the section, and puts
   all three back.
8. dask: in a distributed.LocalCluster of two worker processes, a task on
   worker A makes a 256 MiB uint8 array and a task on worker B reads it: the
   transfer A -> B (from B's transfer_incoming_log) and the consumer's end to
   end time, without shmarena.dask.ShmarenaPlugin (Dask's own path) and with
   it (the array made in the arena; a plain array, copied in on send). Two
   clusters side by side, interleaved. Skipped, saying so, when distributed
   is not installed (pip install 'shmarena[dask]').

How to run it (from the repository root, in a venv with shmarena installed):

    python scripts/bench.py                       # full run: about a minute
    python scripts/bench.py --quick               # under a minute, every section
    python scripts/bench.py --rounds 8            # more rounds, less noise
    python scripts/bench.py --json run.json       # every figure as one JSON object
    python scripts/bench.py --save-baseline base.json
    python scripts/bench.py --compare base.json --threshold 10

The script starts its own daemons (shmarena.testing: `python -m shmarena
daemon` in a session of its own, names `bench-<pid>-<n>`, runtime dirs from
mkdtemp) and stops them at the end, also on errors and Ctrl-C; afterwards
nothing of it is left in /dev/shm. The sections live in scripts/benchmarks/,
one module each; this file is the harness: options, order, JSON, --compare.

How to read it:

- The machine it runs on may be noisy (absolute latencies can move 2-5x
  between runs), so every measurement is interleaved: R rounds, and in every
  round a chunk of every variant, so that noise hits all variants alike; the
  samples of a variant are pooled over the rounds. Trust ratios between
  variants of one run more than absolute microseconds.
- "median" is the typical cost, "p99" the tail, both in microseconds of the
  pooled samples. The cheap variants (cached, shared_memory) are timed 20
  pairs per sample and divided, so the clock's own cost does not dominate;
  their p99 is therefore the p99 of 20-pair means (a smoothed tail).
- "x faster" ratios: higher is better. "x floor" ratios: lower is better, 1.0
  means as cheap as the bare transport. Every ratio in the JSON says which way
  is better.
- Every chunk also stops after a time budget (at least 5 samples), so a slow
  variant gets fewer samples; the tables and the JSON give the counts.
- The "targets" table says met / missed for each goal; a missed target does
  not change the exit status.
- --compare FILE compares only ratio figures (never absolute times) with a
  saved run and exits 1 when one got worse by more than --threshold percent
  and beyond the noise of the two runs: a ratio measured round by round is a
  regression only if the ranges of its per-round values no longer overlap
  (shown as "noise" otherwise). Deterministic figures (memory efficiency,
  RSS) and single-trial ones are judged by the threshold alone.
  Compare full runs: --quick ratios of an unchanged tree can move by tens of
  percent on a noisy machine.

Exit status: 0 done, 1 a ratio regressed (--compare), 2 the benchmark failed
or could not clean up after itself, 130 interrupted (143 on SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import zmq

# Benchmark the working copy this script belongs to, even without an install;
# the sections are the package next to this file (scripts/benchmarks).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    CLEANUP_PROBLEMS,
    SEED,
    Plan,
    Terminated,
    cleanup,
    console,
    note,
    on_sigterm,
)
from benchmarks.compare import compare, jsonable, leftovers, print_targets  # noqa: E402
from benchmarks.daemoncpu import section_daemoncpu  # noqa: E402
from benchmarks.dask import section_dask  # noqa: E402
from benchmarks.handoff import section_handoff  # noqa: E402
from benchmarks.harness import started_daemon  # noqa: E402
from benchmarks.latency import section_latency  # noqa: E402
from benchmarks.measure import Report  # noqa: E402
from benchmarks.memory import section_memory  # noqa: E402
from benchmarks.pages import section_pages  # noqa: E402
from benchmarks.persist import section_persist  # noqa: E402
from benchmarks.pipeline import section_pipeline  # noqa: E402
from benchmarks.queueing import section_queueing  # noqa: E402
from benchmarks.scale import section_scale  # noqa: E402
from benchmarks.throughput import section_throughput  # noqa: E402

import shmarena  # noqa: E402


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "loadavg_at_start": list(os.getloadavg()),
        "versions": {
            "shmarena": shmarena.__version__,
            "numpy": np.__version__,
            "pyzmq": zmq.pyzmq_version(),
            "libzmq": zmq.zmq_version(),
            "msgpack": ".".join(map(str, msgpack.version)),
        },
    }
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        info["mem_total_bytes"] = int(f.readline().split()[1]) * 1024
    # GIT_OPTIONAL_LOCKS=0: a read-only look, never touching the index.
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )
        if done.returncode == 0:
            info["git"] = done.stdout.strip()
    return info


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        epilog="exit status: 0 done, 1 a ratio regressed (--compare), 2 failed, 130 interrupted",
    )
    parser.add_argument("--quick", action="store_true", help="under a minute: fewer samples")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5, --quick 3)")
    parser.add_argument("--json", metavar="FILE", help="write every figure as JSON to FILE")
    parser.add_argument("--save-baseline", metavar="FILE", help="write the JSON to FILE too")
    parser.add_argument("--compare", metavar="FILE", help="compare ratios with a saved run")
    parser.add_argument(
        "--threshold",
        type=float,
        default=10.0,
        help="percent by which a ratio may get worse before --compare fails (default 10)",
    )
    parser.add_argument(
        "--only",
        metavar="SECTIONS",
        help=f"run only these sections, comma-separated: {', '.join(SECTIONS)} "
        "(targets of the others are not reported)",
    )
    args = parser.parse_args(argv)
    args.sections = SECTIONS if not args.only else tuple(args.only.split(","))
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; pick from {SECTIONS}")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.compare:  # fail now, not after minutes of benchmarking
        try:
            with open(args.compare) as f:
                args.baseline = json.load(f)
        except (OSError, ValueError) as exc:
            parser.error(f"cannot read the baseline {args.compare}: {exc}")
        if not isinstance(args.baseline, dict) or "ratios" not in args.baseline:
            parser.error(f"{args.compare} is not a saved run of this benchmark (no ratios)")
    return args


SECTIONS = (
    "latency",
    "throughput",
    "handoff",
    "pipeline",
    "memory",
    "scale",
    "persist",
    "pages",
    "dask",
    "daemoncpu",
    "queueing",
)


def run_all(plan: Plan, report: Report, sections: Sequence[str] = SECTIONS) -> None:
    ctx = mp.get_context("spawn")
    if {"latency", "throughput", "handoff", "pipeline"} & set(sections):
        with contextlib.ExitStack() as stack:
            scratch = tempfile.mkdtemp(prefix="shmb-")
            stack.callback(cleanup(shutil.rmtree, scratch, True))
            main_daemon = started_daemon(stack, "1G", "4K")
            if "latency" in sections:
                section_latency(plan, main_daemon, ctx, scratch, report)
            if "throughput" in sections:
                section_throughput(plan, main_daemon, ctx, report)
            if "handoff" in sections:
                section_handoff(plan, main_daemon, ctx, report)
            if "pipeline" in sections:
                section_pipeline(plan, main_daemon, ctx, report)
    if "memory" in sections:
        section_memory(plan, report)
    if "scale" in sections:
        section_scale(plan, report)
    if "persist" in sections:
        section_persist(plan, report)
    if "pages" in sections:
        section_pages(plan, report)
    if "dask" in sections:
        section_dask(plan, report)
    if "daemoncpu" in sections:
        section_daemoncpu(plan, report)
    if "queueing" in sections:
        section_queueing(plan, ctx, report)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.make(args.quick, args.rounds)
    signal.signal(signal.SIGTERM, on_sigterm)
    report = Report()
    machine = machine_info()
    started = time.monotonic()
    status = 0
    console.print(
        f"shmarena bench: {'--quick, ' if plan.quick else ''}{plan.rounds} rounds, "
        f"{machine['cpu_count']} CPUs, Python {machine['python']}, kernel {machine['kernel']}"
    )
    try:
        run_all(plan, report, args.sections)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        status = 130
    except Terminated:
        console.print("[red]terminated[/red]")
        status = 143
    except Exception:  # noqa: BLE001 any failure: exit 2, after the cleanup report below
        traceback.print_exc()
        console.print("[red]the benchmark failed[/red]")
        status = 2
    elapsed = time.monotonic() - started

    left = leftovers([f"shmarena-bench-{os.getpid()}-", f"shmb-backing-{os.getpid()}-"])
    for problem in CLEANUP_PROBLEMS + [f"left in /dev/shm: {e}" for e in left]:
        console.print(f"[red]cleanup: {problem}[/red]")
    if status:
        return status
    if CLEANUP_PROBLEMS or left:
        return 2

    print_targets(report)
    console.print(f"total time {elapsed:.1f} s")
    document = {
        "benchmark": "shmarena scripts/bench.py",
        "schema": 1,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": round(elapsed, 3),
        "machine": machine,
        "options": {
            "quick": plan.quick,
            "rounds": plan.rounds,
            "threshold_pct": args.threshold,
            "seed": SEED,
            "plan": {key: value for key, value in vars(plan).items()},
        },
        "sections": report.sections,
        "ratios": report.ratios,
        "targets": [
            {
                "name": t.name,
                "value": t.value,
                "op": t.op,
                "limit": t.limit,
                "unit": t.unit,
                "met": t.met,
            }
            for t in report.targets
        ],
    }
    for path in filter(None, (args.json, args.save_baseline)):
        with open(path, "w") as f:
            json.dump(jsonable(document), f, indent=2, sort_keys=True)
            f.write("\n")
        note(f"wrote {path}")
    if args.compare and compare(args.baseline, document, args.threshold):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
