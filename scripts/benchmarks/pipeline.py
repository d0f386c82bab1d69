"""Section pipeline: the frame pipeline: a producer and a reader process pass frames.

One frame, the same cycle for every variant: the producer gets a frame of
memory, writes every byte of it (numpy fill of a uint8 array over it), hands
it over (a message on a duplex Pipe: a handle, a segment name, or "take the
next one"), the reader reads every page (one byte of every 4 KiB page, numpy
strided compare, plus the last byte) and answers one byte on the Pipe, and
the producer gives the frame back. The Pipe round trip is in every variant
alike, so the columns differ only by what the memory costs.

Variants, at 1 MiB and 16 MiB:
- shmarena: the default client (cache on) allocs, frees after the answer;
  the reader does a plain `attach` (no retain);
- shared_memory: a segment created per frame, opened and closed by the
  reader, closed and unlinked by the producer after the answer;
- shared_memory reused: one segment per size made up front (a floor: no
  allocation at all, the reader keeps it open);
- multiprocessing.Queue: the producer fills one numpy array and puts it (a
  pickled copy through a pipe);
- iceoryx2 (when installed): publisher loan, write, send; the subscriber
  receives, reads and releases the sample, which returns it to the
  publisher's pool for the next loan.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

import shmarena
from benchmarks import iox
from benchmarks.common import (
    ACK,
    CHILD_TIMEOUT_S,
    HIGHER,
    LOWER,
    MIN_SAMPLES_PER_CHUNK,
    NACK,
    KiB,
    MiB,
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
from benchmarks.measure import Report, Variant, interleave, round_ratios

PIPELINE_SIZES = (1 * MiB, 16 * MiB)
PAGE = 4 * KiB
IOX_POLLS = 1_000_000  # receive() polls before the reader gives up on a sample
ROWS = {
    "shmarena": "shmarena (default client; reader: plain attach)",
    "shared_memory": "shared_memory (create + unlink per frame)",
    "shm_reused": "shared_memory (one segment reused: no allocation)",
    "queue": "multiprocessing.Queue (the frame pickled through it)",
    "iceoryx2": "iceoryx2 (loan, write, send; receive, read, release)",
}


def fill(value: int) -> Callable[[memoryview], None]:
    """Write every byte of a frame."""

    def run(view: memoryview) -> None:
        np.frombuffer(view, np.uint8).fill(value)

    return run


def read_pages(view: memoryview, value: int) -> bool:
    """Read every page of a frame (one byte per 4 KiB page, and the last
    byte): True if all of them hold `value`."""
    frame = np.frombuffer(view, np.uint8)
    return bool((frame[::PAGE] == value).all() and frame[-1] == value)


def segment_view(segment: SharedMemory) -> memoryview:
    """A segment's memoryview (None only after close())."""
    view = segment.buf
    assert view is not None, f"{segment.name} is closed"
    return view


class Reader:
    """The reader process's side: one handler per variant."""

    def __init__(self, client: shmarena.Client, queue: Any) -> None:
        self.client = client
        self.queue = queue
        self.segments: dict[str, SharedMemory] = {}  # the reused ones, kept open
        self.node = iox.Node() if iox.available() else None
        self.subscribers: dict[str, Any] = {}

    def handle(self, kind: str, payload: Any, value: int) -> bool:
        if kind == "shmarena":
            buf = self.client.attach(shmarena.Handle(*payload))
            return read_pages(buf.view, value)
        if kind == "shared_memory":
            segment = SharedMemory(name=payload)
            ok = read_pages(segment_view(segment), value)
            segment.close()
            return ok
        if kind == "shm_reused":
            if payload not in self.segments:
                self.segments[payload] = SharedMemory(name=payload)
            return read_pages(segment_view(self.segments[payload]), value)
        if kind == "queue":
            frame = self.queue.get(timeout=CHILD_TIMEOUT_S)
            return read_pages(memoryview(frame), value)
        if kind == "subscribe" and self.node is not None:  # before the first send
            self.subscribers[payload] = self.node.subscriber(payload)
            return True
        if kind == "iceoryx2" and payload in self.subscribers:
            return iox.receive_frame(
                self.subscribers[payload], lambda v: read_pages(v, value), IOX_POLLS
            )
        return False

    def close(self) -> None:
        for segment in self.segments.values():
            segment.close()
        if self.node is not None:
            self.node.close()


def _reader(conn: Connection, queue: Any, name: str, run_dir: str) -> None:
    ignore_sigint()
    client = shmarena.connect(name, runtime_dir=run_dir)
    reader = Reader(client, queue)
    try:
        conn.send_bytes(ACK)
        while True:
            kind, payload, value = conn.recv()
            if kind == "stop":
                break
            conn.send_bytes(ACK if reader.handle(kind, payload, value) else NACK)
    finally:
        reader.close()
        client.close()


class Producer:
    """The producer's cycle per variant; `value` changes every frame so a
    reader that sees an old frame answers NACK."""

    def __init__(self, conn: Connection, queue: Any) -> None:
        self.conn = conn
        self.queue = queue
        self.value = 0

    def next_value(self) -> int:
        self.value = (self.value + 1) & 0xFF
        return self.value

    def answer(self, kind: str, payload: Any, value: int) -> None:
        self.conn.send((kind, payload, value))
        if self.conn.recv_bytes() != ACK:
            raise RuntimeError(f"the pipeline reader could not read the {kind} frame")

    def shmarena(self, client: shmarena.Client, size: int) -> Callable[[int], None]:
        def run(count: int) -> None:
            for _ in range(count):
                value = self.next_value()
                buf = client.alloc(size)
                fill(value)(buf.view)
                self.answer("shmarena", tuple(buf.handle), value)
                buf.free()

        return run

    def shared_memory(self, size: int) -> Callable[[int], None]:
        def run(count: int) -> None:
            for _ in range(count):
                value = self.next_value()
                with signals_deferred():  # never left behind in /dev/shm
                    segment = SharedMemory(create=True, size=size)
                try:
                    fill(value)(segment_view(segment))
                    self.answer("shared_memory", segment.name, value)
                finally:
                    with signals_deferred():
                        segment.close()
                        segment.unlink()

        return run

    def shm_reused(self, segment: SharedMemory) -> Callable[[int], None]:
        def run(count: int) -> None:
            for _ in range(count):
                value = self.next_value()
                fill(value)(segment_view(segment))
                self.answer("shm_reused", segment.name, value)

        return run

    def queue_frames(self, size: int) -> Callable[[int], None]:
        frame = np.zeros(size, np.uint8)

        def run(count: int) -> None:
            for _ in range(count):
                value = self.next_value()
                frame.fill(value)
                self.queue.put(frame)
                self.answer("queue", None, value)

        return run

    def iceoryx2(self, publisher: Any, service: str, size: int) -> Callable[[int], None]:
        def run(count: int) -> None:
            for _ in range(count):
                value = self.next_value()
                iox.send_frame(publisher, size, fill(value))
                self.answer("iceoryx2", service, value)

        return run


def section_pipeline(plan: Plan, daemon: Daemon, ctx: SpawnContext, report: Report) -> None:
    note("pipeline: frame pipeline: alloc, write every byte, hand over, read every page, free")
    if not iox.available():
        note(iox.MISSING)
    with contextlib.ExitStack() as stack:
        conn, child = ctx.Pipe()
        queue = ctx.Queue()

        def close_queue() -> None:
            queue.cancel_join_thread()  # the reader is gone: nothing queued is wanted
            queue.close()

        stack.callback(cleanup(close_queue))
        started_process(
            stack,
            ctx,
            _reader,
            (child, queue, daemon.name, daemon.run_dir),
            "bench-pipeline-reader",
        )
        child.close()
        stack.callback(cleanup(tell, conn.send, ("stop", None, 0)))
        producer_client = connected(stack, daemon, cache=True)  # the default client
        node = iox.Node() if iox.available() else None
        if node is not None:
            stack.callback(cleanup(node.close))
        if not conn.poll(CHILD_TIMEOUT_S) or conn.recv_bytes() != ACK:
            raise RuntimeError("the pipeline reader did not start")
        producer = Producer(conn, queue)
        variants = []
        for size in PIPELINE_SIZES:
            label = size_label(size)
            with signals_deferred():  # no Ctrl-C between creating and registering
                segment = SharedMemory(create=True, size=size)
                stack.callback(cleanup(segment.unlink))
                stack.callback(cleanup(segment.close))
            # The variants that page-fault or copy every frame: fewer, but at least 5.
            slow = max(MIN_SAMPLES_PER_CHUNK, plan.queue_samples[size])
            variants += [
                Variant(
                    f"shmarena@{label}",
                    producer.shmarena(producer_client, size),
                    per_chunk=plan.handoff_samples,
                    warmup=plan.warmup,
                ),
                Variant(
                    f"shared_memory@{label}",
                    producer.shared_memory(size),
                    per_chunk=plan.handoff_samples if size <= MiB else slow,
                    warmup=2,
                ),
                Variant(
                    f"shm_reused@{label}",
                    producer.shm_reused(segment),
                    per_chunk=plan.handoff_samples,
                    warmup=plan.warmup,
                ),
                Variant(
                    f"queue@{label}",
                    producer.queue_frames(size),
                    per_chunk=plan.handoff_samples if size <= MiB else slow,
                    warmup=2,
                ),
            ]
            if node is not None:
                service = iox.service_name(f"pipeline-{label}")
                publisher = node.publisher(service, size)
                producer.answer("subscribe", service, 0)
                variants.append(
                    Variant(
                        f"iceoryx2@{label}",
                        producer.iceoryx2(publisher, service, size),
                        per_chunk=plan.handoff_samples,
                        warmup=plan.warmup,
                    )
                )
        interleave(variants, plan.rounds, plan.chunk_budget_s)
    summarize_pipeline({v.key: v.summary() for v in variants}, plan, report)


def summarize_pipeline(by_key: dict[str, Any], plan: Plan, report: Report) -> None:
    table = new_table(
        f"pipeline: frame pipeline, µs per frame ({plan.rounds} interleaved rounds)",
        "size",
        "<variant",
        "samples",
        "median µs",
        "p99 µs",
        "<shmarena takes",
    )
    results: dict[str, Any] = {"page_bytes": PAGE, "iceoryx2": iox.available(), "sizes": {}}
    for size in PIPELINE_SIZES:
        label = size_label(size)
        row = {name: by_key[key] for name in ROWS if (key := f"{name}@{label}") in by_key}
        ours = row["shmarena"]
        shown = {"shmarena": ""}
        for name in ("shared_memory", "queue"):
            faster = report.ratio(
                f"pipeline.shmarena_vs_{name}@{label}",
                safe_div(row[name]["median_us"], ours["median_us"]),
                HIGHER,
                f"x times faster: {name} median / shmarena median per frame",
                round_ratios(row[name], ours),
            )
            shown[name] = f"{fmt_ratio(faster)} faster than it"
        over = report.ratio(
            f"pipeline.shmarena_over_shm_reused@{label}",
            safe_div(ours["median_us"], row["shm_reused"]["median_us"]),
            LOWER,
            "multiple of the floor: shmarena median / reused shared_memory median",
            round_ratios(ours, row["shm_reused"]),
        )
        shown["shm_reused"] = f"{fmt_ratio(over)} its time"
        if "iceoryx2" in row:
            over = report.ratio(
                f"pipeline.shmarena_over_iceoryx2@{label}",
                safe_div(ours["median_us"], row["iceoryx2"]["median_us"]),
                LOWER,
                "multiple of iceoryx2: shmarena median / iceoryx2 median per frame",
                round_ratios(ours, row["iceoryx2"]),
            )
            shown["iceoryx2"] = f"{fmt_ratio(over)} its time"
        for name, figures in row.items():
            table.add_row(
                label,
                ROWS[name],
                str(figures["samples"]),
                fmt_us(figures["median_us"]),
                fmt_us(figures["p99_us"]),
                shown[name],
            )
        table.add_section()
        results["sizes"][label] = row
    console.print(table)
    report.sections["pipeline"] = results
    if iox.available():
        for size in PIPELINE_SIZES:
            label = size_label(size)
            report.target(
                f"pipeline {label.replace('MiB', ' MiB')}: shmarena over iceoryx2",
                report.ratios[f"pipeline.shmarena_over_iceoryx2@{label}"]["value"],
                "<=",
                1.2,
                "×",
            )
    else:
        report.target(
            "pipeline 16 MiB: shmarena vs shared_memory (x faster)",
            report.ratios["pipeline.shmarena_vs_shared_memory@16MiB"]["value"],
            ">=",
            15,
            "×",
        )
