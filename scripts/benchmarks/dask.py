"""Section 8: Dask worker -> worker transfer, with and without shmarena.dask.ShmarenaPlugin."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.markup import escape

from benchmarks.common import (
    CHILD_TIMEOUT_S,
    HIGHER,
    MiB,
    Plan,
    cleanup,
    console,
    fmt_ratio,
    fmt_us,
    new_table,
    note,
    safe_div,
    signals_deferred,
    size_label,
    summarize,
)
from benchmarks.harness import connected, started_daemon
from benchmarks.measure import Report, round_ratios

DASK_SIZE = 256 * MiB


DASK_HINT = "pip install 'shmarena[dask]'"


DASK_ROWS = {  # section 8's table rows
    "dask": "no plugin (Dask's own path)",
    "dask_shm": "plugin, array made in the arena",
    "dask_shm_copy": "plugin, plain array (copied in on send)",
}


DASK_RELEASE_S = 60.0  # longest wait for the workers to forget a round's keys


def _dask_plain(n: int) -> Any:
    import numpy

    return numpy.ones(n, dtype=numpy.uint8)


def _dask_in_arena(n: int) -> Any:
    import shmarena.dask

    x = shmarena.dask.ndarray(n, "uint8")
    x[:] = 1
    return x


def _dask_checksum(x: Any) -> int:
    # One byte per 4 KiB page: the consumer reads the data it got without
    # making the benchmark about a 256 MiB sum.
    return int(x[::4096].sum())


def _dask_where(x: Any) -> dict[str, Any]:
    """Where the array a task received lies: in a mapped arena segment or not."""
    from shmarena.client import registry

    start = int(x.__array_interface__["data"][0])
    ranges = registry.mapping_ranges()
    inside = any(lo <= start and start + x.nbytes <= hi for lo, hi in ranges)
    return {"data": start, "nbytes": int(x.nbytes), "ranges": ranges, "in_arena": inside}


def _dask_transfers(dask_worker: Any, key: str) -> list[dict[str, Any]]:
    return [dict(e) for e in dask_worker.transfer_incoming_log if key in e["keys"]]


def _dask_holds(dask_worker: Any, keys: Sequence[str]) -> bool:
    return any(k in dask_worker.data or k in dask_worker.state.tasks for k in keys)


@dataclass
class DaskCluster:
    """One LocalCluster of this section: its client and the two workers, A
    (the producer's) and B (the consumer's)."""

    client: Any
    a: str
    b: str


def started_cluster(stack: contextlib.ExitStack, plugin: Any = None) -> DaskCluster:
    """A LocalCluster of two single-threaded worker processes, closed by
    `stack` (the client first, then the cluster); with `plugin` registered."""
    import distributed

    # Interrupted half-way, the workers would be orphans. The scheduler's HTTP
    # server (health routes, even without a dashboard) wants port 8787, which
    # the other cluster of this section has: it takes a free one, and warns.
    with signals_deferred(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Port 8787 is already in use", UserWarning)
        cluster = distributed.LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
        )
        stack.callback(cleanup(cluster.close))
        client = distributed.Client(cluster)  # type: ignore[no-untyped-call]
        stack.callback(cleanup(client.close))
    client.wait_for_workers(2, timeout=CHILD_TIMEOUT_S)
    if plugin is not None:
        client.register_plugin(plugin)
    a, b = sorted(client.scheduler_info()["workers"])
    return DaskCluster(client, a, b)


def dask_handoff(cluster: DaskCluster, produce: Callable[[int], Any]) -> tuple[float, float]:
    """One handoff A -> B; returns (transfer s, as B's incoming-transfer log
    has it; consumer end to end s, submit -> result in this process). The
    producer has finished before the clock starts; the keys are forgotten by
    both workers before this returns, so no round's arrays pile up."""
    import distributed

    client = cluster.client
    source = client.submit(produce, DASK_SIZE, workers=[cluster.a], pure=False)
    distributed.wait(source, timeout=CHILD_TIMEOUT_S)  # type: ignore[no-untyped-call]
    t0 = time.perf_counter()
    sink = client.submit(_dask_checksum, source, workers=[cluster.b], pure=False)
    total = sink.result(timeout=CHILD_TIMEOUT_S)
    end_to_end = time.perf_counter() - t0
    if total != DASK_SIZE // 4096:
        raise RuntimeError(f"the consumer's checksum is {total}, not {DASK_SIZE // 4096}")
    keys = [source.key, sink.key]
    entries = client.run(_dask_transfers, key=source.key, workers=[cluster.b])[cluster.b]
    if len(entries) != 1:
        raise RuntimeError(
            f"worker B logged {len(entries)} incoming transfers of {source.key}, not one: "
            "the consumer did not fetch the array from A"
        )
    # stop - start, not "duration": Dask rounds that up to 1 ms.
    transfer = float(entries[0]["stop"] - entries[0]["start"])
    del source, sink
    deadline = time.monotonic() + DASK_RELEASE_S
    while any(client.run(_dask_holds, keys=keys).values()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the workers still hold {keys} after {DASK_RELEASE_S:g} s")
        time.sleep(0.01)
    return transfer, end_to_end


def dask_check_path(cluster: DaskCluster, produce: Callable[[int], Any], in_arena: bool) -> None:
    """Fail unless the array B receives lies in the arena exactly when it
    should: a benchmark of the wrong path is worse than none."""
    client = cluster.client
    source = client.submit(produce, DASK_SIZE, workers=[cluster.a], pure=False)
    where = client.submit(_dask_where, source, workers=[cluster.b], pure=False)
    found = where.result(timeout=CHILD_TIMEOUT_S)
    del source, where
    if found["in_arena"] != in_arena:
        ranges = ", ".join(f"{lo:#x}-{hi:#x}" for lo, hi in found["ranges"]) or "none"
        raise RuntimeError(
            f"dask section: worker B received the {produce.__name__} array at "
            f"{found['data']:#x} ({found['nbytes']} bytes), expected it "
            f"{'inside' if in_arena else 'outside'} the arena; B's mapped segments: {ranges}. "
            "The plugin did not take the path this section measures: check that "
            "ShmarenaPlugin registered on both workers (worker logs)"
        )


def pooled(rounds: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Samples in seconds, by round -> Variant.summary()'s figures, in µs."""
    samples = [s * 1e6 for chunk in rounds for s in chunk]
    medians = [float(np.median(chunk)) * 1e6 for chunk in rounds if chunk]
    return {**summarize(samples), "ops_per_sample": 1, "round_medians": medians}


def section_dask(plan: Plan, report: Report) -> None:
    """A 256 MiB uint8 array made by a task on worker A and consumed by a task
    on worker B of a two-process LocalCluster: the transfer A -> B (from B's
    incoming-transfer log) and the consumer's end-to-end time, without the
    plugin (Dask's own path: serialised, sent over TCP, deserialised) and
    with it (a handle: the array made in the arena, or a plain array that
    the plugin copies into the arena on send)."""
    note(f"8/8 dask: a {size_label(DASK_SIZE)} array from worker A to worker B, plugin or not")
    try:
        import distributed  # noqa: F401

        import shmarena.dask
    except ImportError as exc:
        why = f"{exc} ({DASK_HINT})"
        console.print(f"[yellow]dask: skipped: {escape(why)}[/yellow]")  # [dask] is no markup
        report.sections["dask"] = {"skipped": why}
        return
    kinds: dict[str, Callable[[int], Any]] = {
        "dask": _dask_plain,
        "dask_shm": _dask_in_arena,
        "dask_shm_copy": _dask_plain,
    }
    transfers: dict[str, list[list[float]]] = {name: [] for name in kinds}
    ends: dict[str, list[list[float]]] = {name: [] for name in kinds}
    with contextlib.ExitStack() as stack:
        # Room for the array and a plain array's copy at once, with margin.
        daemon = started_daemon(stack, "1G", "4K")
        # Two clusters side by side (they share nothing: the plugin lives in
        # the worker processes it is registered with), so that every round has
        # every variant, as in the other sections.
        plain = started_cluster(stack)
        plugin = shmarena.dask.ShmarenaPlugin(
            daemon=daemon.name, runtime_dir=daemon.run_dir, start=False
        )
        shm = started_cluster(stack, plugin)
        clusters = {"dask": plain, "dask_shm": shm, "dask_shm_copy": shm}
        watcher = connected(stack, daemon, cache=False)
        baseline = int(watcher.stats()["used_bytes"])  # the workers' registrations
        for name, produce in kinds.items():  # the first transfers open connections,
            for _ in range(2):  # and grow the workers' heaps
                dask_handoff(clusters[name], produce)
        dask_check_path(plain, _dask_plain, in_arena=False)
        dask_check_path(shm, _dask_in_arena, in_arena=True)
        dask_check_path(shm, _dask_plain, in_arena=True)
        names = list(kinds)
        for r in range(plan.rounds):
            shift = r * len(names) // max(1, plan.rounds)
            for name in [*names[shift:], *names[:shift]]:
                transfers[name].append([])
                ends[name].append([])
                for _ in range(plan.dask_samples):
                    transfer, end_to_end = dask_handoff(clusters[name], kinds[name])
                    transfers[name][-1].append(transfer)
                    ends[name][-1].append(end_to_end)
        deadline = time.monotonic() + DASK_RELEASE_S
        while (used := int(watcher.stats()["used_bytes"])) > baseline:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"dask section: the arena still has {used - baseline} bytes in use "
                    f"{DASK_RELEASE_S:g} s after the last round (the workers forgot every key)"
                )
            time.sleep(0.05)

    results: dict[str, Any] = {"size_bytes": DASK_SIZE, "variants": {}}
    for name in kinds:
        results["variants"][name] = {
            "transfer": pooled(transfers[name]),
            "end_to_end": pooled(ends[name]),
        }
    figures = results["variants"]
    label = size_label(DASK_SIZE)
    shown: dict[str, str] = {"dask": ""}
    for name in ("dask_shm", "dask_shm_copy"):
        texts = []
        for what, words in (("transfer", "transfer"), ("end_to_end", "end to end")):
            prefix = "" if what == "transfer" else "end_to_end_"
            ratio = report.ratio(
                f"dask.{prefix}dask_over_{name.removeprefix('dask_')}@{label}",
                safe_div(figures["dask"][what]["median_us"], figures[name][what]["median_us"]),
                HIGHER,
                f"x times faster: {words} median without the plugin / {DASK_ROWS[name]}",
                round_ratios(figures["dask"][what], figures[name][what]),
            )
            texts.append(fmt_ratio(ratio))
        shown[name] = " / ".join(texts)
    table = new_table(
        f"8. Dask: {label} uint8 array, task on worker A -> task on worker B "
        f"({plan.rounds} interleaved rounds)",
        "<variant",
        "samples",
        "transfer median µs",
        "max µs",
        "end to end median µs",
        "max µs",
        "<x faster: transfer / end to end",
    )
    for name in kinds:
        row = figures[name]
        table.add_row(
            DASK_ROWS[name],
            str(row["transfer"]["samples"]),
            fmt_us(row["transfer"]["median_us"]),
            fmt_us(max(s for chunk in transfers[name] for s in chunk) * 1e6),
            fmt_us(row["end_to_end"]["median_us"]),
            fmt_us(max(s for chunk in ends[name] for s in chunk) * 1e6),
            shown[name],
        )
    console.print(table)
    note(
        "transfer: B's transfer_incoming_log (stop - start); end to end: the consumer task, "
        "submit -> result in this process, the producer done before"
    )
    report.sections["dask"] = results
    report.target(
        f"dask transfer {label.replace('MiB', ' MiB')}: no plugin over plugin",
        report.ratios[f"dask.dask_over_shm@{label}"]["value"],
        ">=",
        20,
        "×",
    )
