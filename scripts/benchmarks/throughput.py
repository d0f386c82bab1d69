"""Section 2: cached alloc+free throughput with one and two client processes."""

from __future__ import annotations

import contextlib
import gc
import os
import time
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from multiprocessing.synchronize import Barrier
from typing import Any

import numpy as np

import shmarena
from benchmarks.common import (
    CHILD_TIMEOUT_S,
    HIGHER,
    THROUGHPUT_SIZE,
    Plan,
    cleanup,
    console,
    fmt_ratio,
    fmt_us,
    ignore_sigint,
    new_table,
    note,
    recv_within,
    safe_div,
    tell,
)
from benchmarks.harness import Daemon, started_process
from benchmarks.measure import Report


def _throughput_worker(
    conn: Connection,
    name: str,
    run_dir: str,
    size: int,
    barriers: dict[int, Barrier],
) -> None:
    """One client process of section 2: warm up on request, then run timed
    trials of N cached alloc+free pairs, started together through a barrier."""
    ignore_sigint()
    gc.disable()
    clock = time.perf_counter_ns
    client = shmarena.connect(name, runtime_dir=run_dir, cache=True)
    alloc = client.alloc
    try:
        conn.send(("ready", os.getpid()))
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            if message[0] == "warm":  # ("warm", seconds) -> pairs per second
                start = clock()
                end = start + int(message[1] * 1e9)
                pairs = 0
                while clock() < end:
                    for _ in range(10):
                        alloc(size).free()
                    pairs += 10
                client.sync()
                conn.send(pairs / ((clock() - start) / 1e9))
            elif message[0] == "run":  # ("run", clients, pairs) -> (start_ns, end_ns)
                _, clients, pairs = message
                barriers[clients].wait(timeout=CHILD_TIMEOUT_S)
                start = clock()
                for _ in range(pairs):
                    alloc(size).free()
                client.sync()  # "all done" includes the daemon applying every free
                conn.send((start, clock()))
    finally:
        client.close()


def section_throughput(plan: Plan, daemon: Daemon, ctx: SpawnContext, report: Report) -> None:
    note("2/8 cached alloc+free throughput with 1 and 2 client processes")
    barriers = {1: ctx.Barrier(1), 2: ctx.Barrier(2)}
    trials: dict[int, list[float]] = {1: [], 2: []}
    with contextlib.ExitStack() as stack:
        conns: list[Connection] = []
        for index in range(2):
            parent, child = ctx.Pipe()
            started_process(
                stack,
                ctx,
                _throughput_worker,
                (child, daemon.name, daemon.run_dir, THROUGHPUT_SIZE, barriers),
                f"bench-worker-{index}",
            )
            child.close()
            stack.callback(cleanup(tell, parent.send, ("stop",)))
            conns.append(parent)
        for index, conn in enumerate(conns):
            recv_within(conn, CHILD_TIMEOUT_S, f"throughput worker {index}")
        # Warm up one worker at a time; the first one's rate sizes the trials so a
        # single-client trial lasts about plan.throughput_trial_s.
        rates = []
        for index, conn in enumerate(conns):
            conn.send(("warm", 0.2 if plan.quick else 0.5))
            rates.append(float(recv_within(conn, CHILD_TIMEOUT_S, f"worker {index} warm-up")))
        pairs = max(50, int(rates[0] * plan.throughput_trial_s))

        for r in range(plan.rounds):
            for _ in range(plan.throughput_trials):
                for clients in (1, 2) if r % 2 == 0 else (2, 1):
                    for conn in conns[:clients]:
                        conn.send(("run", clients, pairs))
                    spans = [
                        recv_within(conn, CHILD_TIMEOUT_S, "throughput worker")
                        for conn in conns[:clients]
                    ]
                    start = min(s for s, _ in spans)
                    end = max(e for _, e in spans)
                    trials[clients].append(clients * pairs / ((end - start) / 1e9))

    table = new_table(
        f"2. cached alloc+free throughput at 64 KiB ({pairs} pairs per client per trial)",
        "clients",
        "trials",
        "median ops/s",
        "min ops/s",
        "max ops/s",
        "µs per op",
        "<ratio",
    )
    results: dict[str, Any] = {"pairs_per_client": pairs, "warmup_rates": rates}
    medians = {c: float(np.median(trials[c])) for c in trials}
    ratio = report.ratio(
        "throughput.2_clients_over_1",
        safe_div(medians[2], medians[1]),
        HIGHER,
        "x aggregate throughput: 2 client processes / 1 (median ops/s)",
    )
    for clients in (1, 2):
        values = trials[clients]
        results[f"{clients}_clients"] = {
            "median_ops_per_s": medians[clients],
            "min_ops_per_s": min(values),
            "max_ops_per_s": max(values),
            "trials": len(values),
            "ops_per_s": values,
        }
        table.add_row(
            str(clients),
            str(len(values)),
            f"{medians[clients]:,.0f}",
            f"{min(values):,.0f}",
            f"{max(values):,.0f}",
            fmt_us(1e6 / medians[clients]),
            f"{fmt_ratio(ratio)} one client" if clients == 2 else "",
        )
    console.print(table)
    report.sections["throughput"] = results
    report.target("2 clients over 1 client (aggregate)", ratio, ">=", 1.7, "×")
