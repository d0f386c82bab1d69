"""Section queueing: shmarena.Queue against multiprocessing.Queue, one producer
and one consumer process (spawn), in the same run.

(a) 1 KiB bytes messages: a burst of N puts by a producer process, N gets by a
    consumer process, timed from the start command to the consumer's "done";
    messages per second = N / that time.
(b) a 16 MiB float64 array: put by this process, got by the consumer, which
    touches one element per page and acks back over a Pipe: a plain array
    (shmarena copies it into the arena once) and one already in the arena
    (`client.ndarray`: named, not copied), against multiprocessing.Queue
    (pickled through its pipe).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from typing import Any

import numpy as np

import shmarena
from benchmarks.common import (
    ACK,
    CHILD_TIMEOUT_S,
    HIGHER,
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
    tell,
)
from benchmarks.harness import Daemon, connected, started_daemon, started_process
from benchmarks.measure import Report, Variant, interleave, round_ratios

MESSAGE_BYTES = 1 * KiB
ARRAY_BYTES = 16 * MiB
PAGE_ELEMENTS = 4096 // 8  # float64 elements per 4 KiB page


def _producer(conn: Connection, queue: Any) -> None:
    """Puts bursts of 1 KiB messages on `queue` when told to."""
    ignore_sigint()
    message = b"m" * MESSAGE_BYTES
    conn.send_bytes(ACK)
    while True:
        command = conn.recv()
        if command[0] == "stop":
            break
        put = queue.put
        for _ in range(command[1]):
            put(message)
        conn.send_bytes(ACK)


def _consumer(conn: Connection, queue: Any) -> None:
    """Gets a burst of messages (one ack at the end), or one array, touches
    one element per page and acks (NACK if the data is wrong)."""
    ignore_sigint()
    conn.send_bytes(ACK)
    while True:
        command = conn.recv()
        if command[0] == "stop":
            break
        get = queue.get
        if command[0] == "burst":
            ok = True
            for _ in range(command[1]):
                ok = len(get(timeout=CHILD_TIMEOUT_S)) == MESSAGE_BYTES and ok
        else:
            array = get(timeout=CHILD_TIMEOUT_S)
            ok = bool(array[::PAGE_ELEMENTS].sum() == command[1]) and array[-1] == len(array) - 1
            del array
        conn.send_bytes(ACK if ok else NACK)


def _answer(conn: Connection, what: str) -> bytes:
    """The child's one-byte answer, or RuntimeError naming `what` when none comes."""
    if not conn.poll(CHILD_TIMEOUT_S):
        raise RuntimeError(f"{what} did not answer within {CHILD_TIMEOUT_S:g} s")
    return conn.recv_bytes()


def _burst(producer: Connection, consumer: Connection, count: int) -> Callable[[int], None]:
    def run(bursts: int) -> None:
        for _ in range(bursts):
            consumer.send(("burst", count))
            producer.send(("burst", count))
            for conn, who in ((consumer, "consumer"), (producer, "producer")):
                if _answer(conn, f"the queue {who}") != ACK:
                    raise RuntimeError(f"the {who} of a burst saw wrong messages")

    return run


def _array(queue: Any, consumer: Connection, array: Any, expected: float) -> Callable[[int], None]:
    def run(count: int) -> None:
        for _ in range(count):
            consumer.send(("array", expected))
            queue.put(array)
            if _answer(consumer, "the array consumer") != ACK:
                raise RuntimeError("the consumer read wrong data from a queued array")

    return run


def _start_pair(
    stack: contextlib.ExitStack, ctx: SpawnContext, queue: Any, label: str
) -> tuple[Connection, Connection]:
    """A producer and a consumer process on `queue`; their pipes, both started."""
    ends = []
    for target, role in ((_producer, "producer"), (_consumer, "consumer")):
        mine, theirs = ctx.Pipe()
        started_process(stack, ctx, target, (theirs, queue), f"bench-{label}-{role}")
        theirs.close()
        stack.callback(cleanup(tell, mine.send, ("stop",)))
        ends.append(mine)
    for conn in ends:
        if _answer(conn, f"the {label} process") != ACK:
            raise RuntimeError(f"a {label} process did not start")
    return ends[0], ends[1]


def section_queueing(plan: Plan, ctx: SpawnContext, report: Report) -> None:
    note("queueing: 1 KiB messages and 16 MiB arrays, shmarena.Queue vs multiprocessing.Queue")
    count = 2000 if plan.quick else 10_000
    with contextlib.ExitStack() as stack:
        daemon: Daemon = started_daemon(stack, "1G", "4K")
        client = connected(stack, daemon, cache=True)
        mpq = ctx.Queue()

        def close_mpq() -> None:
            mpq.cancel_join_thread()
            mpq.close()

        stack.callback(cleanup(close_mpq))
        sq = shmarena.Queue(client=client)
        stack.callback(cleanup(sq.close))
        mp_producer, mp_consumer = _start_pair(stack, ctx, mpq, "mpqueue")
        s_producer, s_consumer = _start_pair(stack, ctx, sq, "squeue")

        elements = ARRAY_BYTES // 8
        plain = np.arange(elements, dtype=np.float64)
        resident = client.ndarray((elements,), np.float64)
        resident[:] = plain
        expected = float(plain[::PAGE_ELEMENTS].sum())
        bursts = 1
        variants = [
            Variant("mpqueue_msgs", _burst(mp_producer, mp_consumer, count), bursts, 3, 1),
            Variant("squeue_msgs", _burst(s_producer, s_consumer, count), bursts, 3, 1),
            Variant("mpqueue_array", _array(mpq, mp_consumer, plain, expected), 1, 4, 1),
            Variant("squeue_plain", _array(sq, s_consumer, plain, expected), 1, 10, 2),
            Variant("squeue_arena", _array(sq, s_consumer, resident, expected), 1, 20, 3),
        ]
        interleave(variants, plan.rounds, plan.chunk_budget_s)
        del resident

    by_key = {v.key: v.summary() for v in variants}
    table = new_table(
        f"queueing, one producer and one consumer process ({plan.rounds} interleaved rounds)",
        "<what",
        "samples",
        "median",
        "vs multiprocessing.Queue",
    )
    results: dict[str, Any] = {"messages_per_burst": count, "variants": by_key}
    rates = {
        k: safe_div(count, by_key[k]["median_us"] / 1e6) for k in ("mpqueue_msgs", "squeue_msgs")
    }
    msgs = report.ratio(
        "queueing.squeue_vs_mpqueue_msgs",
        safe_div(by_key["mpqueue_msgs"]["median_us"], by_key["squeue_msgs"]["median_us"]),
        HIGHER,
        "1 KiB messages/s: shmarena.Queue / multiprocessing.Queue",
        round_ratios(by_key["mpqueue_msgs"], by_key["squeue_msgs"]),
    )
    for key, what in (("mpqueue_msgs", "multiprocessing.Queue"), ("squeue_msgs", "shmarena.Queue")):
        table.add_row(
            f"1 KiB messages, {what}",
            str(by_key[key]["samples"]),
            f"{rates[key] / 1e3:.1f} k msgs/s",
            fmt_ratio(msgs) if key == "squeue_msgs" else "1×",
        )
    table.add_section()
    speedups = {}
    for key, what in (
        ("mpqueue_array", "16 MiB array, multiprocessing.Queue"),
        ("squeue_plain", "16 MiB plain array, shmarena.Queue (one copy in)"),
        ("squeue_arena", "16 MiB array in the arena, shmarena.Queue"),
    ):
        if key != "mpqueue_array":
            speedups[key] = report.ratio(
                f"queueing.{key}_vs_mpqueue@16MiB",
                safe_div(by_key["mpqueue_array"]["median_us"], by_key[key]["median_us"]),
                HIGHER,
                f"x times faster: multiprocessing.Queue median / {key} median",
                round_ratios(by_key["mpqueue_array"], by_key[key]),
            )
        table.add_row(
            what,
            str(by_key[key]["samples"]),
            f"{fmt_us(by_key[key]['median_us'])} µs",
            fmt_ratio(speedups[key]) if key in speedups else "1×",
        )
    console.print(table)
    results["messages_per_s"] = rates
    report.sections["queueing"] = results
    report.target("Queue 1 KiB msgs/s vs multiprocessing.Queue", msgs, ">=", 1.0, "×")
    report.target(
        "Queue 16 MiB plain array vs multiprocessing.Queue (x faster)",
        speedups["squeue_plain"],
        ">=",
        15,
        "×",
    )
    report.target(
        "Queue 16 MiB array in the arena vs multiprocessing.Queue (x faster)",
        speedups["squeue_arena"],
        ">=",
        100,
        "×",
    )
