"""Section 1: alloc+free latency against shared_memory and the ZeroMQ transport floor."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from typing import Any

import zmq

from benchmarks import iox
from benchmarks.common import (
    ACK,
    CHEAP_BATCH,
    CHILD_TIMEOUT_S,
    FLOOR_MESSAGE,
    HIGHER,
    LATENCY_SIZES,
    LOWER,
    KiB,
    Plan,
    cleanup,
    console,
    fmt_ratio,
    fmt_us,
    ignore_sigint,
    new_table,
    note,
    safe_div,
    size_label,
)
from benchmarks.harness import Daemon, connected, started_process
from benchmarks.measure import (
    Report,
    Variant,
    alloc_free,
    alloc_view_free,
    attach_only,
    interleave,
    round_ratios,
    shm_create_unlink,
)


def _echo_server(endpoint: str, ready: Connection) -> None:
    """The transport floor's server: a ROUTER that echoes each message back,
    handling the two frames (peer id, message) by hand."""
    ignore_sigint()
    context = zmq.Context()
    s = context.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    s.bind(endpoint)
    ready.send_bytes(ACK)
    try:
        while True:
            ident = s.recv()
            m = s.recv()
            s.send(ident, zmq.SNDMORE)
            s.send(m)
            if m == b"stop":
                break
    finally:
        s.close(linger=0)
        context.term()


def zmq_round_trip(dealer: zmq.Socket[Any]) -> Callable[[int], None]:
    def run(count: int) -> None:
        send, recv = dealer.send, dealer.recv
        for _ in range(count):
            send(FLOOR_MESSAGE)
            recv()

    return run


def section_latency(
    plan: Plan, daemon: Daemon, ctx: SpawnContext, scratch: str, report: Report
) -> None:
    note("1/8 alloc+free latency: cached, uncached, shared_memory, transport floor")
    with contextlib.ExitStack() as stack:
        cached = connected(stack, daemon, cache=True)
        uncached = connected(stack, daemon, cache=False)

        # The transport floor: an echo ROUTER in its own process, our DEALER.
        endpoint = f"ipc://{scratch}/echo.sock"
        ready_parent, ready_child = ctx.Pipe(duplex=False)
        echo = started_process(stack, ctx, _echo_server, (endpoint, ready_child), "bench-echo")
        ready_child.close()
        if not ready_parent.poll(CHILD_TIMEOUT_S):
            raise RuntimeError("the echo server did not start")
        ready_parent.recv_bytes()
        zctx: zmq.Context[Any] = zmq.Context()
        stack.callback(cleanup(zctx.term))  # runs after the socket is closed
        dealer = zctx.socket(zmq.DEALER)
        stack.callback(cleanup(dealer.close, 0))
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVTIMEO, int(CHILD_TIMEOUT_S * 1000))
        dealer.connect(endpoint)

        def stop_echo() -> None:
            if echo.is_alive():
                dealer.send(b"stop", zmq.NOBLOCK)
                if dealer.poll(2000):
                    dealer.recv()

        stack.callback(cleanup(stop_echo))

        def variant(
            key: str, run: Callable[[int], None], batch: int, after: Callable[[], None] | None
        ) -> Variant:
            return Variant(key, run, batch, plan.latency_samples, plan.warmup, after)

        variants: list[Variant] = []
        for size in LATENCY_SIZES:
            label = size_label(size)
            variants += [
                variant(f"cached@{label}", alloc_free(cached, size), CHEAP_BATCH, cached.sync),
                variant(
                    f"cached+view@{label}", alloc_view_free(cached, size), CHEAP_BATCH, cached.sync
                ),
                variant(f"uncached@{label}", alloc_free(uncached, size), 1, uncached.sync),
                variant(f"shared_memory@{label}", shm_create_unlink(size), CHEAP_BATCH, None),
            ]
        if iox.available():  # iceoryx2's loan+release, from one pool of 16 MiB buckets
            node = iox.Node()
            stack.callback(cleanup(node.close))
            publisher = node.publisher(iox.service_name("latency"), max(LATENCY_SIZES))
            variants += [
                variant(
                    f"iceoryx2@{size_label(size)}",
                    iox.loan_release(publisher, size),
                    CHEAP_BATCH,
                    None,
                )
                for size in LATENCY_SIZES
            ]
        else:
            note(iox.MISSING)
        variants.append(variant("floor", zmq_round_trip(dealer), 1, None))
        held = uncached.alloc(64 * KiB)  # another session's block, as a reader meets it
        stack.callback(cleanup(held.free))
        variants.append(variant("attach", attach_only(cached, held.handle), CHEAP_BATCH, None))
        interleave(variants, plan.rounds, plan.chunk_budget_s)

    summarize_latency({v.key: v.summary() for v in variants}, plan, report)


def summarize_latency(by_key: dict[str, Any], plan: Plan, report: Report) -> None:
    floor = by_key["floor"]
    table = new_table(
        f"1. alloc+free latency per pair ({plan.rounds} interleaved rounds)",
        "size",
        "<variant",
        "pairs/sample",
        "samples",
        "median µs",
        "p99 µs",
        "<ratio",
    )
    results: dict[str, Any] = {"floor": floor, "sizes": {}}
    for size in LATENCY_SIZES:
        label = size_label(size)
        row = {
            name: by_key[key]
            for name in ("cached", "cached+view", "uncached", "shared_memory", "iceoryx2")
            if (key := f"{name}@{label}") in by_key
        }
        results["sizes"][label] = row
        faster = report.ratio(
            f"latency.cached_vs_shared_memory@{label}",
            safe_div(row["shared_memory"]["median_us"], row["cached"]["median_us"]),
            HIGHER,
            "x times faster: shared_memory median / cached median",
            round_ratios(row["shared_memory"], row["cached"]),
        )
        over_floor = report.ratio(
            f"latency.uncached_over_floor@{label}",
            safe_div(row["uncached"]["median_us"], floor["median_us"]),
            LOWER,
            "multiple of the floor: uncached median / ZeroMQ round-trip median",
            round_ratios(row["uncached"], floor),
        )
        ratios = {
            "cached": f"{fmt_ratio(faster)} faster than shared_memory",
            "cached+view": "writes one byte through view",
            "uncached": f"{fmt_ratio(over_floor)} floor",
            "shared_memory": "",
        }
        if "iceoryx2" in row:
            over = report.ratio(
                f"latency.cached_over_iceoryx2@{label}",
                safe_div(row["cached"]["median_us"], row["iceoryx2"]["median_us"]),
                LOWER,
                "multiple of iceoryx2: cached alloc+free median / iceoryx2 loan+release median",
                round_ratios(row["cached"], row["iceoryx2"]),
            )
            ratios["iceoryx2"] = f"loan+release; cached: {fmt_ratio(over)}"
        for name, figures in row.items():
            table.add_row(
                label,
                name,
                str(figures["ops_per_sample"]),
                str(figures["samples"]),
                fmt_us(figures["median_us"]),
                fmt_us(figures["p99_us"]),
                ratios[name],
            )
        table.add_section()
    results["attach"] = by_key["attach"]
    table.add_row(
        "64 KiB",
        "attach (plain, no round trip)",
        str(by_key["attach"]["ops_per_sample"]),
        str(by_key["attach"]["samples"]),
        fmt_us(by_key["attach"]["median_us"]),
        fmt_us(by_key["attach"]["p99_us"]),
        "",
    )
    table.add_row(
        "30 B",
        "transport floor (ZeroMQ round trip)",
        "1",
        str(floor["samples"]),
        fmt_us(floor["median_us"]),
        fmt_us(floor["p99_us"]),
        "",
    )
    console.print(table)
    report.sections["latency"] = results

    at64 = results["sizes"]["64KiB"]
    report.target("cached 64 KiB alloc+free median", at64["cached"]["median_us"], "<=", 3, "µs")
    report.target(
        "cached vs shared_memory at 64 KiB (x faster)",
        report.ratios["latency.cached_vs_shared_memory@64KiB"]["value"],
        ">=",
        30,
        "×",
    )
    for label in ("4KiB", "64KiB"):
        report.target(
            f"uncached over the floor at {label.replace('KiB', ' KiB')}",
            report.ratios[f"latency.uncached_over_floor@{label}"]["value"],
            "<=",
            1.3,
            "×",
        )
    report.target(
        "alloc+free 16 MiB (cached client) vs shared_memory (x faster)",
        report.ratios["latency.cached_vs_shared_memory@16MiB"]["value"],
        ">=",
        10,
        "×",
    )
    for label in ("4KiB", "64KiB", "1MiB"):
        key = f"latency.cached_over_iceoryx2@{label}"
        if key in report.ratios:
            report.target(
                f"cached alloc+free over iceoryx2 loan+release at {spaced(label)}",
                report.ratios[key]["value"],
                "<=",
                1.6,
                "×",
            )


def spaced(label: str) -> str:
    """64KiB -> 64 KiB, for the targets table."""
    return label.replace("KiB", " KiB").replace("MiB", " MiB")
