"""The service's plain data: what the daemon was started with, what it
counts, the allocators it knows and the names of the ops. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shmarena.protocol import Op
from shmarena.shm.buddy import Buddy
from shmarena.shm.extents import Extents

# --allocator NAME -> the space that carves the arena
ALLOCATORS = {"extents": Extents, "buddy": Buddy}
# Op -> the name counters and metrics use ("alloc", "alloc_many", ...)
OP_NAMES = {op: op.name.lower() for op in Op}


@dataclass(frozen=True)
class ArenaInfo:
    """What the daemon was started with; reported by hello and stats."""

    name: str
    epoch: int
    size_bytes: int
    min_block_bytes: int
    shm_name: str
    pid: int
    started_at: float
    socket_path: str = ""
    lease_s: float = 10.0
    version: str = ""
    allocator: str = "extents"
    # A file-backed arena: the file, where the arena starts in it, and how
    # changes are kept (none, batch or sync); "" for a shm arena.
    backing: str = ""
    data_offset: int = 0
    durability: str = ""
    grace_s: float = 0.0  # how long recovered sessions wait for their client
    # --max-size: the arena may grow by segments up to this (0: it cannot),
    # in whole granules; an empty added segment goes after idle_s seconds.
    max_size_bytes: int = 0
    granule_bytes: int = 4096
    idle_s: float = 30.0
    # --numa-node / --numa-interleave: the nodes the pages are bound to, and
    # the CPUs of those nodes (for clients that want to run next to them)
    numa_policy: str = ""
    numa_nodes: tuple[int, ...] = ()
    numa_cpus: tuple[int, ...] = ()
    # --quota-per-session: carved bytes a session may hold (0: no quota)
    quota_per_session: int = 0
    # Who may use the daemon (docs/reliability.md, "Access"): its own uid and root are
    # administrators; with --group, members of that gid may use it (-1: none).
    uid: int = 0
    group_gid: int = -1
    # --warn-used: the threshold as given ("90%", "0.9", "900M"; "": none), see usage.py
    warn_used: str = ""

    @property
    def first_segment(self) -> dict[str, Any]:
        """How a client maps segment 0 unless the server says otherwise."""
        if self.backing:
            return {"index": 0, "path": self.backing, "offset": self.data_offset,
                    "size": self.size_bytes}  # fmt: skip
        return {"index": 0, "shm": self.shm_name, "size": self.size_bytes}


@dataclass
class Counters:
    """What the daemon counts (`stats()["counters"]`, the metrics)."""

    requests: int = 0
    errors: int = 0
    allocs: int = 0
    frees: int = 0
    recycles: int = 0
    fills: int = 0
    filled_blocks: int = 0
    posts: int = 0
    events: int = 0
    late_errors: int = 0
    sessions_opened: int = 0
    sessions_reclaimed: int = 0
    sessions_resumed: int = 0
    reclaimed_bytes: int = 0
    alloc_waits: int = 0  # allocations that had to wait for room
    alloc_wait_timeouts: int = 0  # ... and ran out of time
    alloc_waited_s: float = 0.0  # how long they waited, all together
    # Bugs of the daemon caught while handling a request or a timer (each
    # answered as internal_error where there was a request, and logged).
    internal_errors: int = 0
    quarantined_sessions: int = 0  # sessions ended because check failed after one
    used_warnings: int = 0  # times used bytes rose to --warn-used (usage.py)
    # Requests by op name (each parsed request once, refused or not; a repeat
    # answered from the reply cache is not run again and not counted), and
    # errors by their wire code: what `--metrics-port` exports.
    ops: dict[str, int] = field(default_factory=dict)
    errors_by_code: dict[str, int] = field(default_factory=dict)
