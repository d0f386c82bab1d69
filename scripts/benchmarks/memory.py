"""Section 4: memory efficiency of a fresh arena filled until OutOfMemory, then churned:
one uncached client, and default clients (cache on) in four processes with warm caches."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import random
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from typing import Any

import shmarena
from benchmarks.common import (
    ACK,
    CHILD_TIMEOUT_S,
    CHURN_ROUNDS,
    EFFICIENCY_CHUNK,
    HIGHER,
    MAX_BATCH,
    SEED,
    KiB,
    MiB,
    Plan,
    cleanup,
    console,
    gc_paused,
    ignore_sigint,
    new_table,
    note,
    recv_within,
    size_label,
    tell,
)
from benchmarks.harness import connected, started_daemon, started_process
from benchmarks.measure import Report


class SizeStream:
    """Request sizes, log-uniform between 4 KiB and 4 MiB, from a fixed seed.
    Sizes drawn for a batch but not used are given back, so the sequence of
    requests is exactly the one a one-at-a-time loop would make."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.pending: deque[int] = deque()

    def take(self, count: int) -> list[int]:
        out = [self.pending.popleft() for _ in range(min(count, len(self.pending)))]
        out += [int(2 ** self.rng.uniform(12, 22)) for _ in range(count - len(out))]
        return out

    def give_back(self, sizes: Sequence[int]) -> None:
        self.pending.extendleft(reversed(sizes))


def _alloc_or_none(client: shmarena.Client, size: int) -> shmarena.Buffer | None:
    """client.alloc(size), or None when the arena is full."""
    try:
        return client.alloc(size)
    except shmarena.OutOfMemory:
        return None


def fill_until_oom(client: shmarena.Client, stream: SizeStream, live: list[shmarena.Buffer]) -> int:
    """Allocate the stream's sizes until the first OutOfMemory; returns the
    size that failed. alloc_many is all-or-none, so when a batch fails its
    sizes are retried one at a time up to the first failure."""
    while True:
        sizes = stream.take(EFFICIENCY_CHUNK)
        try:
            live.extend(client.alloc_many(sizes))
            continue
        except shmarena.OutOfMemory:
            pass
        for index, size in enumerate(sizes):
            buf = _alloc_or_none(client, size)
            if buf is None:
                stream.give_back(sizes[index + 1 :])
                return size
            live.append(buf)
        # The batch failed but every single alloc succeeded (the batch's rollback
        # may leave free blocks in another order): keep filling.


WARM_PROCESSES = 4  # the default-client case: this process and three idle ones
WARM_SIZES = 64  # sizes each of them allocs (all held at once) and frees before the fill


def warm_up(client: shmarena.Client, seed: int) -> None:
    """Alloc a spread of sizes (log-uniform 4 KiB .. 4 MiB), hold them all,
    free them all: what the client's cache keeps of them stays with it."""
    buffers = [client.alloc(size) for size in SizeStream(seed).take(WARM_SIZES)]
    for buf in buffers:
        buf.free()
    client.sync()


def _idle_warm_client(conn: Connection, name: str, run_dir: str, seed: int) -> None:
    """One of the idle processes of the default-client case: warm a default
    client's cache, say so, then hold it (making no calls) until told to stop."""
    ignore_sigint()
    client = shmarena.connect(name, runtime_dir=run_dir)
    try:
        warm_up(client, seed)
        conn.send(ACK)
        conn.poll(None)  # blocks without touching the client: its cache just sits there
    finally:
        client.close()


def fill_and_churn(client: shmarena.Client) -> tuple[int, list[dict[str, Any]]]:
    """Fill the arena until the first OutOfMemory, then CHURN_ROUNDS rounds of
    "free a random half, refill"; the arena's size and one record per phase."""
    phases: list[dict[str, Any]] = []
    stream = SizeStream(SEED)
    churn = random.Random(SEED + 1)
    live: list[shmarena.Buffer] = []
    arena = int(client.info["size_bytes"])

    def record(phase: str, failed: int) -> None:
        client.sync()  # the cache's frees and allocs reach the daemon's accounting
        stats = client.stats()
        requested = sum(b.size for b in live)
        if requested != stats["requested_bytes"]:
            raise RuntimeError(
                f"the daemon counts {stats['requested_bytes']} requested bytes, "
                f"the benchmark holds {requested}"
            )
        phases.append(
            {
                "phase": phase,
                "live_buffers": len(live),
                "requested_bytes": requested,
                "efficiency": requested / arena,
                "used_bytes": stats["used_bytes"],
                "cached_bytes": stats.get("cached_bytes", 0),
                "largest_free_bytes": stats["largest_free_bytes"],
                "free_bytes": stats["free_bytes"],
                "failed_request_bytes": failed,
            }
        )

    with gc_paused():
        record("first failure", fill_until_oom(client, stream, live))
        for round_index in range(1, CHURN_ROUNDS + 1):
            victims = set(churn.sample(range(len(live)), len(live) // 2))
            freeing = [b for i, b in enumerate(live) if i in victims]
            live = [b for i, b in enumerate(live) if i not in victims]
            for start in range(0, len(freeing), MAX_BATCH):  # one request in practice
                client.free(freeing[start : start + MAX_BATCH])
            record(f"churn {round_index}", fill_until_oom(client, stream, live))
    return arena, phases


def uncached_case() -> tuple[int, list[dict[str, Any]]]:
    with contextlib.ExitStack() as stack:
        daemon = started_daemon(stack, "1G", "4K")
        return fill_and_churn(connected(stack, daemon, cache=False))


def default_client_case(ctx: SpawnContext) -> tuple[int, list[dict[str, Any]]]:
    """WARM_PROCESSES default clients (cache on), every one warmed up; the
    idle ones hold their caches while this one fills and churns."""
    with contextlib.ExitStack() as stack:
        daemon = started_daemon(stack, "1G", "4K")
        conns = []
        for index in range(1, WARM_PROCESSES):
            conn, child = ctx.Pipe()
            started_process(
                stack,
                ctx,
                _idle_warm_client,
                (child, daemon.name, daemon.run_dir, SEED + 10 + index),
                f"bench-memory-idle-{index}",
            )
            child.close()
            stack.callback(cleanup(tell, conn.send_bytes, ACK))  # stop: any message
            conns.append(conn)
        client = connected(stack, daemon, cache=True)
        warm_up(client, SEED + 10)
        for conn in conns:
            recv_within(conn, CHILD_TIMEOUT_S, "an idle memory-section client")
        return fill_and_churn(client)


def section_memory(_plan: Plan, report: Report) -> None:
    note(
        "4/8 memory efficiency of a fresh 1 GiB arena, then 10 rounds of churn: uncached, and "
        f"default clients (cache on) in {WARM_PROCESSES} processes with warm caches"
    )
    ctx = mp.get_context("spawn")
    cases = {"uncached": uncached_case(), "default": default_client_case(ctx)}
    results: dict[str, Any] = {"seed": SEED, "warm_processes": WARM_PROCESSES}
    for case, (arena, phases) in cases.items():
        results[case] = summarize_case(case, arena, phases, report)
    # The uncached case keeps the keys of the runs before the default case existed.
    report.sections["memory"] = {**results, **results["uncached"]}
    first = results["uncached"]["first_failure"]
    report.target("memory efficiency at first failure", first, ">=", 0.98, "")
    report.target(
        "memory efficiency after churn (minimum of 10 rounds)",
        results["uncached"]["churn_min"],
        ">=",
        0.90,
        "",
    )
    default = results["default"]
    report.target(
        f"memory efficiency, default client, {WARM_PROCESSES} warm caches, at first failure",
        default["first_failure"],
        ">=",
        0.98,
        "",
    )
    report.target(
        f"memory efficiency, default client, {WARM_PROCESSES} warm caches, after churn (min)",
        default["churn_min"],
        ">=",
        0.95,
        "",
    )


def summarize_case(
    case: str, arena: int, phases: list[dict[str, Any]], report: Report
) -> dict[str, Any]:
    title = {
        "uncached": "one uncached client",
        "default": f"default clients in {WARM_PROCESSES} processes, warm caches",
    }[case]
    table = new_table(
        f"4. memory efficiency, {title}: bytes requested and obtained / arena size "
        "(1 GiB, min block 4 KiB)",
        "<phase",
        "live buffers",
        "requested MiB",
        "efficiency",
        "carved MiB",
        "cached MiB",
        "largest free",
        "failed request",
    )
    for phase in phases:
        table.add_row(
            phase["phase"],
            str(phase["live_buffers"]),
            f"{phase['requested_bytes'] / MiB:,.1f}",
            f"{phase['efficiency']:.4f}",
            f"{phase['used_bytes'] / MiB:,.1f}",
            f"{phase['cached_bytes'] / MiB:,.1f}",
            size_label(phase["largest_free_bytes"]) if phase["largest_free_bytes"] else "0",
            f"{phase['failed_request_bytes'] / KiB:,.0f} KiB",
        )
    console.print(table)
    first = phases[0]["efficiency"]
    after = [p["efficiency"] for p in phases[1:]]
    prefix = "memory." if case == "uncached" else f"memory.{case}_"
    for name, value in (
        ("efficiency_first_failure", first),
        ("efficiency_churn_min", min(after)),
        ("efficiency_churn_last", after[-1]),
    ):
        report.ratio(f"{prefix}{name}", value, HIGHER, f"fraction of the arena ({title})")
    console.print(
        f"{title}: efficiency at first failure {first:.4f}; after churn: "
        f"min {min(after):.4f}, last {after[-1]:.4f}"
    )
    return {
        "arena_bytes": arena,
        "phases": phases,
        "first_failure": first,
        "churn_min": min(after),
        "churn_last": after[-1],
    }
