"""The arena's memory on the daemon's side: its segments, their generation
tables and how their pages are made (NUMA, huge pages). I/O; decides nothing.

The service decides when to grow (a `Ledger` growth) and when an added
segment may go (`Ledger.trim`); `add_segment` is the capability it is
handed to make one (see effects.py), `release_segments` the timer's part.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from shmarena.config import format_size, shm_name
from shmarena.daemon.clock import Clock
from shmarena.daemon.ledger import Ledger
from shmarena.daemon.logs import EventLog
from shmarena.daemon.options import DaemonOptions
from shmarena.errors import DaemonStartError
from shmarena.shm import gens, hugepages, numa
from shmarena.shm.arena import Arena, GenTable, Pages
from shmarena.shm.segments import OFFSET_MASK, SEGMENT_SHIFT

if TYPE_CHECKING:
    from shmarena.daemon.service import Service

DEFAULT_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
# `stats` reads the pages' placement from /proc again after this long.
PLACEMENT_TTL_S = 5.0


class Arenas:
    """Segment index -> its memory and its generation table."""

    def __init__(
        self, options: DaemonOptions, gid: int | None, log: EventLog, clock: Clock
    ) -> None:
        self.options = options
        self.gid = gid
        self.log = log
        self.clock = clock
        self.service: Service | None = None  # set once the service is made
        self.arenas: dict[int, Arena] = {}  # segment index -> its memory
        self.tables: dict[int, GenTable] = {}  # segment index -> its generation table
        self.pages = Pages()
        self.pages_kind = "shm"  # or hugetlbfs, thp-shm, thp-memfd
        self.node_cpus: list[int] = []  # --numa-node: the CPUs the daemon was pinned to
        self._placement_cache: tuple[float, set[int], dict[int, dict[str, Any]]] | None = None

    def plan_pages(self, size_bytes: int) -> Pages:
        """How the arena's pages are made, from --numa-* and --hugepages;
        DaemonStartError when the machine cannot do what was asked."""
        opts = self.options
        policy = 0
        nodes: tuple[int, ...] = ()
        if opts.numa_node is not None or opts.numa_interleave:
            topology = numa.read_topology()
            if opts.numa_node is not None:
                node = topology.nodes.get(opts.numa_node)
                if node is None or node.memory_bytes == 0:
                    why = "does not exist" if node is None else "has no memory"
                    raise DaemonStartError(
                        f"--numa-node {opts.numa_node}: that node {why} on this machine; "
                        f"it has {topology.describe()}; pick one of "
                        f"{', '.join(map(str, topology.with_memory))}",
                        nodes=topology.with_memory,
                    )
                policy, nodes = numa.MPOL_BIND, (opts.numa_node,)
                if node.cpus:
                    numa.pin_to_cpus(node.cpus)
                    self.node_cpus = list(node.cpus)
            else:
                policy, nodes = numa.MPOL_INTERLEAVE, tuple(topology.with_memory)
                self.node_cpus = sorted(c for n in nodes for c in topology.nodes[n].cpus)
        kind, directory, page_bytes, thp = "shm", "/dev/shm", DEFAULT_PAGE_BYTES, False
        if opts.hugepages:
            plan = hugepages.plan(hugepages.survey(), size_bytes, self.gid is not None)
            if isinstance(plan, str):
                raise DaemonStartError(plan)
            self.pages_kind = plan.kind
            page_bytes = plan.page_bytes
            if plan.kind == "hugetlbfs":
                kind, directory = "hugetlbfs", plan.directory
            else:
                kind, thp = ("shm" if plan.kind == "thp-shm" else "memfd"), True
            self.log(f"--hugepages: the arena is on {plan.describe()}", "hugepages",
                     kind=plan.kind, page_bytes=plan.page_bytes)  # fmt: skip
        prefault = bool(policy) or opts.hugepages
        return Pages(kind, directory, page_bytes, thp, policy, nodes, prefault)

    def add_segment(self, index: int, size_bytes: int) -> bool:
        """Make segment `index` (the service's growth asks); False, with the
        reason kept for the next OutOfMemory message, when it cannot."""
        assert self.service is not None
        growth = self.service.ledger.growth
        try:
            arena = Arena.create(shm_name(self.options.name, index), size_bytes, self.gid,
                                 self.pages)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - any failure to make it: refuse, keep serving
            if growth is not None:
                growth.last_failure = str(exc)
            self.log(f"could not add segment {index} of {format_size(size_bytes)}: {exc}",
                     "segment_add_failed", "warning", index=index, size_bytes=size_bytes,
                     error=str(exc))  # fmt: skip
            return False
        try:
            table = GenTable.create(shm_name(self.options.name, index), size_bytes,
                                    self.service.info.min_block_bytes, self.gid,
                                    arena.kind)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - as above: refuse the request, keep serving
            arena.close(unlink=True)
            if growth is not None:
                growth.last_failure = f"its generation table: {exc}"
            self.log(f"could not add segment {index}: its generation table: {exc}",
                     "segment_add_failed", "warning", index=index, size_bytes=size_bytes,
                     error=str(exc))  # fmt: skip
            return False
        self.arenas[index] = arena
        self.tables[index] = table
        self.service.segments[index] = {"index": index, **arena.locator, "gens": table.locator}
        total = sum(a.size_bytes for a in self.arenas.values())
        self.log(
            f"added segment {index}: {format_size(size_bytes)} at {arena.where}; "
            f"the arena is {format_size(total)} now",
            "segment_added",
            index=index,
            size_bytes=size_bytes,
            where=arena.where,
            total_bytes=total,
        )
        return True

    def release_segments(self, now: float) -> None:
        assert self.service is not None
        for index in self.service.ledger.trim(now):
            arena = self.arenas.pop(index)
            self.service.segments.pop(index, None)
            arena.close(unlink=True)
            table = self.tables.pop(index, None)
            if table is not None:
                table.close(unlink=True)
            self.log(
                f"released segment {index} ({format_size(arena.size_bytes)}): empty for "
                f"{self.options.shrink_after_s:g} s",
                "segment_released",
                index=index,
                size_bytes=arena.size_bytes,
                idle_s=self.options.shrink_after_s,
            )

    def placements(self) -> dict[int, dict[str, Any]]:
        """Each segment's pages as the kernel reports them, read again when a
        segment came or went or PLACEMENT_TTL_S passed (reading /proc/self/smaps
        costs milliseconds; placement changes only by migration)."""
        now = self.clock.monotonic()
        cached = self._placement_cache
        if (
            cached is not None
            and cached[1] == set(self.arenas)
            and now - cached[0] < PLACEMENT_TTL_S
        ):
            return cached[2]
        arenas = list(self.arenas.items())
        try:
            records = numa.read_placements([(a.mapping, a.size_bytes) for _, a in arenas])
        except (OSError, ValueError) as exc:
            records = [{"error": str(exc)} for _ in arenas]
        result = {index: record for (index, _), record in zip(arenas, records, strict=True)}
        self._placement_cache = (now, set(self.arenas), result)
        return result

    def rebuild_table(self, ledger: Ledger) -> None:
        """Make the kept generation table of a recovered arena agree with the
        recovered ledger (see gens.rebuilt)."""
        table = self.tables[0]
        blocks = {
            b.address: (b.generation, b.owner is not None, b.cache_session)
            for b in ledger.blocks.values()
        }
        words = table.words
        for index, word in gens.rebuilt(
            words.tolist(), table.shift, blocks, set(ledger.sessions)
        ).items():
            words[index] = word

    def check_tables(self) -> list[str]:
        """The generation tables against the ledger (part of `check`)."""
        assert self.service is not None
        problems: list[str] = []
        per_segment: dict[int, dict[int, tuple[int, bool, bool]]] = {i: {} for i in self.tables}
        for block in self.service.ledger.blocks.values():
            blocks = per_segment.get(block.address >> SEGMENT_SHIFT)
            if blocks is not None:
                blocks[block.address & OFFSET_MASK] = (
                    block.generation,
                    block.owner is not None,
                    block.cached,
                )
        for index, table in self.tables.items():
            words = table.words.tolist()
            problems += gens.check_words(words, table.shift, per_segment[index], index)
        return problems

    def mark(self, address: int, generation: int, reason: int) -> None:
        """The ledger's writes to the generation tables (Ledger.gens)."""
        table = self.tables.get(address >> SEGMENT_SHIFT)
        if table is not None:
            table.mark(address & OFFSET_MASK, generation, reason)

    def page_stats(self) -> dict[str, Any]:
        """The pages as the kernel reports them, and their NUMA placement."""
        pages: list[dict[str, Any]] = []
        by_node: dict[str, int] = {}
        policy = ""
        for index, record in self.placements().items():
            record = {**record, "index": index}
            pages.append(record)
            policy = policy or str(record.get("policy", ""))
            for node, count in record.get("bytes_by_node", {}).items():
                by_node[node] = by_node.get(node, 0) + count
        if not pages:
            return {}
        bound = self.arenas[0].numa if 0 in self.arenas else None
        return {
            "pages": {
                "kind": self.pages_kind,
                "page_bytes": min(int(p.get("page_bytes", 0)) for p in pages),
                "huge_bytes": sum(int(p.get("huge_bytes", 0)) for p in pages),
                "mapped_bytes": sum(int(p.get("mapped_bytes", 0)) for p in pages),
                "segments": pages,
            },
            "numa": {
                "requested": dict(bound) if bound else None,
                "policy": policy or "default",
                "bytes_by_node": by_node,
                "daemon_cpus": sorted(os.sched_getaffinity(0)),
                "resident_pages_at_bind": sum(
                    int(a.numa["resident_pages_at_bind"]) for a in self.arenas.values() if a.numa
                ),
            },
        }

    def close(self) -> None:
        """Unmap and unlink every segment and table (a backing file stays)."""
        for arena in self.arenas.values():
            arena.close(unlink=True)
        self.arenas.clear()
        for table in self.tables.values():
            table.close(unlink=True)  # a backing file's table stays: it is a kept file
        self.tables.clear()
