"""Section 7: first-touch cost of a fresh segment, on plain and on huge pages."""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from typing import Any

import numpy as np
import posix_ipc

from benchmarks.common import (
    CHILD_TIMEOUT_S,
    LOWER,
    MiB,
    Plan,
    console,
    new_table,
    note,
    recv_within,
    safe_div,
    size_label,
)
from benchmarks.harness import stop_process
from benchmarks.measure import Report


def _touch_worker(where: dict[str, Any], populate: bool, conn: Connection) -> None:
    """In a fresh process, as a client does: map the segment (with
    MAP_POPULATE when `populate`), then write one byte per 4 KiB page.
    Sends (map seconds, touch seconds)."""
    from shmarena.shm.arena import map_segment
    from shmarena.shm.backing import map_file

    size = int(where["size"])
    t0 = time.perf_counter()
    if "shm" in where:
        mapping = map_segment(where["shm"], size, populate)
    else:
        mapping = map_file(where["path"], size, int(where.get("offset", 0)), populate)
    t1 = time.perf_counter()
    pages = np.frombuffer(mapping, dtype=np.uint8)
    pages[::4096] = 1
    t2 = time.perf_counter()
    del pages
    mapping.close()
    conn.send((t1 - t0, t2 - t1))
    conn.close()


def _touched_in_child(
    ctx: SpawnContext, where: dict[str, Any], populate: bool
) -> tuple[float, float]:
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_touch_worker, args=(where, populate, child))
    process.start()
    child.close()
    try:
        return recv_within(parent, CHILD_TIMEOUT_S, "a first-touch child")  # type: ignore[no-any-return]
    finally:
        stop_process(process)


@contextlib.contextmanager
def huge_pages_for(size: int) -> Iterator[dict[str, str]]:
    """Huge pages for this section: those the machine offers, or, as root, a
    temporary reservation and hugetlbfs mount plus shmem THP = advise, all
    put back afterwards. Yields kind -> why it is missing ("" = available)."""
    from shmarena.shm import hugepages

    survey = hugepages.survey()
    changes: list[Callable[[], object]] = []
    mount = ""
    try:
        if os.geteuid() == 0 and os.access(hugepages.NR_HUGEPAGES, os.W_OK):
            with open(hugepages.NR_HUGEPAGES) as f:
                old_nr = f.read().strip()
            with open(hugepages.SHMEM_ENABLED) as f:
                old_shmem = hugepages.selected(f.read())

            def put(path: str, value: str) -> None:
                with open(path, "w") as f:
                    f.write(value)

            pages = int(old_nr) + size // survey.default_page_bytes
            put(hugepages.NR_HUGEPAGES, str(pages))
            changes.append(lambda: put(hugepages.NR_HUGEPAGES, old_nr))
            put(hugepages.SHMEM_ENABLED, "advise")
            changes.append(lambda: put(hugepages.SHMEM_ENABLED, old_shmem))
            mount = tempfile.mkdtemp(prefix="shmb-huge-")
            changes.append(lambda: os.rmdir(mount))  # undone last: after the umount
            done = subprocess.run(["mount", "-t", "hugetlbfs", "none", mount], capture_output=True)
            if done.returncode == 0:
                changes.append(lambda: subprocess.run(["umount", mount], check=False))
            note(
                f"(as root: reserved {pages} huge pages, mounted hugetlbfs at {mount} and set "
                "shmem_enabled to advise for this section; all put back afterwards)"
            )
            survey = hugepages.survey()
        missing = {}
        plan = hugepages.plan(survey, size, False)
        has_mount = any(
            survey.pools.get(page) and survey.pools[page].available * page >= size
            for _, page in survey.mounts
        )
        missing["hugetlbfs"] = "" if has_mount else (plan if isinstance(plan, str) else "no pages")
        thp = survey.shmem_enabled in ("always", "within_size", "advise", "force")
        missing["thp"] = "" if thp else f"shmem_enabled is [{survey.shmem_enabled}]"
        yield missing
    finally:
        for undo in reversed(changes):
            with contextlib.suppress(OSError):
                undo()


def section_pages(plan: Plan, report: Report) -> None:
    """What the first touch of an arena's pages costs, per GiB, and who
    pays it: the daemon when it makes the segment (fallocate allocates the
    pages; pre-faulting, as --numa-node and --hugepages do, also maps them),
    and each client process when it first writes a page (or up front with
    connect(populate=True), MAP_POPULATE). `no pre-fault` is a bare shm
    segment sized with ftruncate, the cost shmarena avoids paying lazily. Each
    row: median over `rounds` fresh segments, each touched by a fresh process."""
    from shmarena.shm import numa
    from shmarena.shm.arena import Arena, Pages

    size = (256 if plan.quick else 1024) * MiB
    gib = size / (1 << 30)
    note(f"7/8 pages: first touch of a {size_label(size)} segment, ms per GiB")
    ctx = mp.get_context("spawn")
    serial = itertools.count()
    rows: dict[str, dict[str, list[float]]] = {}

    def measure(label: str, pages: Pages | None, populate: bool) -> None:
        name = f"/shmarena-bench-{os.getpid()}-p{next(serial)}"
        t0 = time.perf_counter()
        if pages is None:  # the reference: ftruncate only, nothing allocated
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=size)
            shm.close_fd()
            where: dict[str, Any] = {"shm": name, "size": size}
            arena = None
        else:
            arena = Arena.create(name, size, None, pages)
            where = {"index": 0, **arena.locator}
        made = time.perf_counter() - t0
        try:
            mapped, touched = _touched_in_child(ctx, where, populate)
        finally:
            if arena is not None:
                arena.close(unlink=True)
            else:
                posix_ipc.unlink_shared_memory(name)
        row = rows.setdefault(label, {"make": [], "map": [], "touch": []})
        for key, seconds in (("make", made), ("map", mapped), ("touch", touched)):
            row[key].append(seconds * 1000 / gib)

    with huge_pages_for(size) as missing:
        variants: list[tuple[str, Pages | None, bool]] = [
            ("no pre-fault (bare ftruncate), client touches", None, False),
            ("shm (default), client touches", Pages(), False),
            ("shm (default), client populate=True", Pages(), True),
            ("shm pre-faulted (--numa-node 0), client touches",
             Pages(numa_policy=numa.MPOL_BIND, numa_nodes=(0,), prefault=True), False),
        ]  # fmt: skip
        from shmarena.shm import hugepages

        survey = hugepages.survey()
        if not missing["hugetlbfs"]:
            point, page = next(
                (p, b) for p, b in survey.mounts
                if (pool := survey.pools.get(b)) and pool.available * b >= size
            )  # fmt: skip
            variants.append(("hugetlbfs 2 MiB, client touches",
                             Pages("hugetlbfs", point, page, prefault=True), False))  # fmt: skip
        if not missing["thp"]:
            variants.append(("shmem THP (memfd), client touches",
                             Pages("memfd", page_bytes=survey.thp_bytes, thp=True,
                                   prefault=True), False))  # fmt: skip
        for _ in range(plan.rounds):
            for label, pages, populate in variants:
                measure(label, pages, populate)
    table = new_table(
        f"7. first touch of a {size_label(size)} arena, ms per GiB (median of {plan.rounds})",
        "<variant",
        "daemon makes",
        "client maps",
        "client touches",
        "client total",
        "all",
    )
    results: dict[str, Any] = {}
    for label, row in rows.items():
        medians = {key: float(np.median(values)) for key, values in row.items()}
        client = medians["map"] + medians["touch"]
        results[label] = {**medians, "client_ms_per_gib": client, "samples": row}
        table.add_row(
            label, f"{medians['make']:.0f}", f"{medians['map']:.0f}", f"{medians['touch']:.0f}",
            f"{client:.0f}", f"{client + medians['make']:.0f}",
        )  # fmt: skip
    console.print(table)
    for kind, why in missing.items():
        if why:
            note(f"{kind}: not measured here: {why}")
    results["missing"] = missing
    report.sections["pages"] = results
    base = results["shm (default), client touches"]["client_ms_per_gib"]
    for label in results:
        if label in ("missing", "shm (default), client touches"):
            continue
        words = "".join(c if c.isalnum() else " " for c in label).split()
        key = "pages." + "_".join(words)  # the whole label: two rows share "shm (default)"
        report.ratio(
            key,
            safe_div(results[label]["client_ms_per_gib"], base),
            LOWER,
            f"client first-touch ms/GiB: {label} / shm (default), client touches",
        )
