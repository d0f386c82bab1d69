"""Section 3: handing an array to a consumer process by handle, segment name, Queue or token."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

import shmarena
from benchmarks.common import (
    ACK,
    CHILD_TIMEOUT_S,
    HANDOFF_SIZES,
    HIGHER,
    LOWER,
    NACK,
    QUEUE_ROWS,
    TOKEN,
    Plan,
    cleanup,
    console,
    fmt_ratio,
    fmt_us,
    ignore_sigint,
    new_table,
    note,
    safe_div,
    signals_deferred,
    size_label,
    tell,
)
from benchmarks.harness import Daemon, connected, started_process
from benchmarks.measure import Report, Variant, divide_each, interleave, round_ratios


def _pipe_consumer(conn: Connection, name: str, run_dir: str) -> None:
    """The consumer of the Pipe handoffs: turn what arrives into a numpy array
    over the data, read its last element, ack with one byte."""
    ignore_sigint()
    client = shmarena.connect(name, runtime_dir=run_dir, cache=True)
    try:
        conn.send_bytes(ACK)
        while True:
            kind, payload, count, expected = conn.recv()
            if kind == "stop":
                break
            if kind == "shmarena":
                array = client.attach(shmarena.Handle(*payload)).ndarray((count,), np.float64)
                ok = bool(array[-1] == expected)
                del array
            elif kind == "shared_memory":
                segment = SharedMemory(name=payload)
                array = np.ndarray((count,), dtype=np.float64, buffer=segment.buf)
                ok = bool(array[-1] == expected)
                del array  # the array holds an export of segment.buf: drop it first
                segment.close()
            else:  # the token floor
                ok = payload == TOKEN
            conn.send_bytes(ACK if ok else NACK)
    finally:
        client.close()


def _queue_consumer(inbox: Any, outbox: Any) -> None:
    """The consumer of the Queue handoffs: the array (or the token) arrives
    pickled; read the last element, ack with one byte."""
    ignore_sigint()
    outbox.put(ACK)
    while True:
        kind, payload, expected = inbox.get()
        if kind == "stop":
            break
        ok = payload == TOKEN if kind == "token" else bool(payload[-1] == expected)
        del payload
        outbox.put(ACK if ok else NACK)


def pipe_handoff(conn: Connection, message: tuple[Any, ...]) -> Callable[[int], None]:
    def run(count: int) -> None:
        send, recv_bytes = conn.send, conn.recv_bytes
        for _ in range(count):
            send(message)
            if recv_bytes() != ACK:
                raise RuntimeError(f"the consumer could not read {message[0]} data")

    return run


def queue_handoff(inbox: Any, outbox: Any, message: tuple[Any, ...]) -> Callable[[int], None]:
    def run(count: int) -> None:
        put, get = inbox.put, outbox.get
        for _ in range(count):
            put(message)
            if get(timeout=CHILD_TIMEOUT_S) != ACK:
                raise RuntimeError(f"the consumer could not read the queued {message[0]}")

    return run


def section_handoff(plan: Plan, daemon: Daemon, ctx: SpawnContext, report: Report) -> None:
    note("3/8 producer -> consumer handoff of 1, 16, 256 MiB numpy arrays")
    with contextlib.ExitStack() as stack:
        # The consumers: one on a duplex Pipe, one on a pair of Queues. Cleanup
        # runs last-registered first: stop message, then join, then close.
        conn, child = ctx.Pipe()
        started_process(
            stack, ctx, _pipe_consumer, (child, daemon.name, daemon.run_dir), "bench-pipe-consumer"
        )
        child.close()
        stack.callback(cleanup(tell, conn.send, ("stop", None, 0, 0.0)))
        inbox, outbox = ctx.Queue(), ctx.Queue()

        def close_queues() -> None:
            # The consumer is gone by now: nothing still queued is wanted, so do
            # not wait for the feeder threads to push it into the pipes.
            for queue in (inbox, outbox):
                queue.cancel_join_thread()
                queue.close()

        stack.callback(cleanup(close_queues))
        started_process(stack, ctx, _queue_consumer, (inbox, outbox), "bench-queue-consumer")
        stack.callback(cleanup(tell, inbox.put, ("stop", None, 0.0)))
        producer = connected(stack, daemon, cache=True)
        # The same consumer on a pair of shmarena.Queues (they travel by name).
        sinbox, soutbox = shmarena.Queue(client=producer), shmarena.Queue(client=producer)
        stack.callback(cleanup(soutbox.close))
        stack.callback(cleanup(sinbox.close))
        started_process(stack, ctx, _queue_consumer, (sinbox, soutbox), "bench-squeue-consumer")
        stack.callback(cleanup(tell, sinbox.put, ("stop", None, 0.0)))
        if not conn.poll(CHILD_TIMEOUT_S) or conn.recv_bytes() != ACK:
            raise RuntimeError("the pipe consumer did not start")
        if outbox.get(timeout=CHILD_TIMEOUT_S) != ACK:
            raise RuntimeError("the queue consumer did not start")
        if soutbox.get(timeout=CHILD_TIMEOUT_S) != ACK:
            raise RuntimeError("the shmarena.Queue consumer did not start")

        variants: list[Variant] = [
            Variant(
                "pipe_token",
                pipe_handoff(conn, ("token", TOKEN, 0, 0.0)),
                per_chunk=plan.handoff_samples,
                warmup=plan.warmup,
            ),
            Variant(
                "queue_token",
                queue_handoff(inbox, outbox, ("token", TOKEN, 0.0)),
                per_chunk=plan.handoff_samples,
                warmup=plan.warmup,
            ),
        ]
        for size in HANDOFF_SIZES:
            label = size_label(size)
            count = size // 8
            expected = float(count - 1)  # the last element of arange(count)
            # Every array is created and filled once, outside the timing.
            buf = producer.alloc(size)
            stack.callback(cleanup(buf.free))
            resident = buf.ndarray((count,), np.float64)
            resident[:] = np.arange(count, dtype=np.float64)
            with signals_deferred():  # no Ctrl-C between creating and registering
                segment = SharedMemory(create=True, size=size)
                stack.callback(cleanup(segment.unlink))
                stack.callback(cleanup(segment.close))
            view = np.ndarray((count,), dtype=np.float64, buffer=segment.buf)
            view[:] = np.arange(count, dtype=np.float64)
            del view  # segment.close() needs every export of segment.buf gone
            plain = np.arange(count, dtype=np.float64)
            variants += [
                Variant(
                    f"shmarena@{label}",
                    pipe_handoff(conn, ("shmarena", tuple(buf.handle), count, expected)),
                    per_chunk=plan.handoff_samples,
                    warmup=plan.warmup,
                ),
                Variant(
                    f"shared_memory@{label}",
                    pipe_handoff(conn, ("shared_memory", segment.name, count, expected)),
                    per_chunk=plan.handoff_samples,
                    warmup=plan.warmup,
                ),
                Variant(
                    f"queue@{label}",
                    queue_handoff(inbox, outbox, ("array", plain, expected)),
                    per_chunk=plan.queue_samples[size],
                    warmup=1,
                ),
                Variant(
                    f"squeue@{label}",
                    queue_handoff(sinbox, soutbox, ("array", resident, expected)),
                    per_chunk=plan.handoff_samples,
                    warmup=plan.warmup,
                ),
                Variant(
                    f"squeue_copy@{label}",
                    queue_handoff(sinbox, soutbox, ("array", plain, expected)),
                    per_chunk=plan.queue_samples[size],
                    warmup=1,
                ),
            ]
        interleave(variants, plan.rounds, plan.chunk_budget_s)

    by_key = {v.key: v.summary() for v in variants}
    floors = {"pipe": by_key["pipe_token"], "queue": by_key["queue_token"]}
    table = new_table(
        f"3. handoff producer -> consumer, round trip ({plan.rounds} interleaved rounds)",
        "size",
        "<variant",
        "samples",
        "median µs",
        "p99 µs",
        "over token floor",
    )
    results: dict[str, Any] = {
        "floor_pipe_token": floors["pipe"],
        "floor_queue_token": floors["queue"],
        "sizes": {},
    }
    for size in HANDOFF_SIZES:
        label = size_label(size)
        row: dict[str, Any] = {}
        for name, floor_kind in (
            ("shmarena", "pipe"),
            ("shared_memory", "pipe"),
            ("queue", "queue"),
            ("squeue", "queue"),
            ("squeue_copy", "queue"),
        ):
            figures = dict(by_key[f"{name}@{label}"])
            figures["over_floor"] = report.ratio(
                f"handoff.{name}_over_floor@{label}",
                safe_div(figures["median_us"], floors[floor_kind]["median_us"]),
                LOWER,
                f"multiple of the token floor: {name} median / {floor_kind} token median",
                round_ratios(figures, floors[floor_kind]),
            )
            row[name] = figures
            table.add_row(
                label,
                QUEUE_ROWS.get(name, name),
                str(figures["samples"]),
                fmt_us(figures["median_us"]),
                fmt_us(figures["p99_us"]),
                fmt_ratio(figures["over_floor"]),
            )
        report.ratio(
            f"handoff.queue_vs_shmarena@{label}",
            safe_div(row["queue"]["median_us"], row["shmarena"]["median_us"]),
            HIGHER,
            "x times faster: Queue median / shmarena median",
            round_ratios(row["queue"], row["shmarena"]),
        )
        for name in ("squeue", "squeue_copy"):
            report.ratio(
                f"handoff.queue_vs_{name}@{label}",
                safe_div(row["queue"]["median_us"], row[name]["median_us"]),
                HIGHER,
                f"x times faster: multiprocessing.Queue median / {QUEUE_ROWS[name]} median",
                round_ratios(row["queue"], row[name]),
            )
        results["sizes"][label] = row
        table.add_section()
    for kind, text in (
        ("pipe", "token floor: 8 B via Pipe"),
        ("queue", "token floor: 8 B via Queue"),
    ):
        table.add_row(
            "8 B",
            text,
            str(floors[kind]["samples"]),
            fmt_us(floors[kind]["median_us"]),
            fmt_us(floors[kind]["p99_us"]),
            "1×",
        )
    console.print(table)
    big, small = size_label(HANDOFF_SIZES[-1]), size_label(HANDOFF_SIZES[0])
    flat = report.ratio(
        "handoff.shmarena_256MiB_over_1MiB",
        safe_div(
            report.ratios[f"handoff.shmarena_over_floor@{big}"]["value"],
            report.ratios[f"handoff.shmarena_over_floor@{small}"]["value"],
        ),
        LOWER,
        "shmarena's over-floor ratio at 256 MiB / at 1 MiB (1.0: size does not matter)",
        divide_each(
            report.ratios[f"handoff.shmarena_over_floor@{big}"].get("rounds", ()),
            report.ratios[f"handoff.shmarena_over_floor@{small}"].get("rounds", ()),
        ),
    )
    versus_queue = report.ratios[f"handoff.queue_vs_shmarena@{big}"]["value"]
    console.print(
        f"shmarena handoff, over-floor ratio 256 MiB / 1 MiB: {fmt_ratio(flat)}; "
        f"Queue time / shmarena time at 256 MiB: {fmt_ratio(versus_queue)}"
    )
    squeue = report.ratios[f"handoff.queue_vs_squeue@{big}"]["value"]
    console.print(
        f"multiprocessing.Queue time / shmarena.Queue time at 256 MiB: {fmt_ratio(squeue)} "
        f"(array in the arena), "
        f"{fmt_ratio(report.ratios[f'handoff.queue_vs_squeue_copy@{big}']['value'])} "
        "(a plain array, copied into the arena once)"
    )
    report.sections["handoff"] = results
    report.target("shmarena.Queue vs multiprocessing.Queue at 256 MiB", squeue, ">=", 500, "×")
    report.target("handoff 256 MiB over 1 MiB (over the token floor)", flat, "<=", 1.2, "×")
    report.target("shmarena vs Queue at 256 MiB (x faster)", versus_queue, ">=", 1000, "×")
