"""What `shmarena daemon` was asked for: the options the server starts with."""

from __future__ import annotations

import grp
from dataclasses import dataclass

from shmarena.config import DEFAULT_LEASE_S, DEFAULT_MIN_BLOCK_BYTES, DEFAULT_SIZE_BYTES
from shmarena.daemon.store import DEFAULT_COMPACT_BYTES
from shmarena.errors import DaemonStartError


@dataclass
class DaemonOptions:
    """The daemon's settings, one field per command-line option."""

    name: str
    run_dir: str
    size_bytes: int | None = DEFAULT_SIZE_BYTES  # None: a backing file's own size
    min_block_bytes: int | None = DEFAULT_MIN_BLOCK_BYTES  # None: a backing file's own
    lease_s: float = DEFAULT_LEASE_S
    quota_per_session: int = 0  # --quota-per-session (0: none)
    allocator: str | None = "extents"  # None: a backing file's own
    # --group: the group whose members may use the daemon (name or gid), or None
    group: str | None = None
    # --backing: the arena lives in this file and survives restarts; with
    # --durability none|batch|sync and --grace seconds for recovered sessions.
    backing: str | None = None
    durability: str = "batch"
    grace_s: float = 15.0
    compact_bytes: int = DEFAULT_COMPACT_BYTES
    # --numa-node N binds the arena to node N (and the daemon to its CPUs);
    # --numa-interleave spreads it over every node with memory.
    numa_node: int | None = None
    numa_interleave: bool = False
    # --hugepages: hugetlbfs or transparent huge pages, or refuse to start.
    hugepages: bool = False
    # --max-size: grow by segments up to this; --shrink-after: release an
    # added segment empty for this long (0: never).
    max_size_bytes: int | None = None
    shrink_after_s: float = 30.0
    # Tests: SIGKILL the daemon at a named point of the persistence path.
    debug_crash_at: str | None = None
    # Fault injection for tests: drop this fraction of replies (never late
    # errors), and hold each reply back by up to this many milliseconds.
    debug_drop_replies: float = 0.0
    debug_delay_ms: float = 0.0
    debug_seed: int | None = None
    # --debug-fail: make these ops' requests raise inside the daemon ("wake":
    # kept requests as they are answered; "commit": writing the table, after
    # it took the changes), to test that it survives its bugs.
    debug_fail: tuple[str, ...] = ()
    # --metrics-port: serve Prometheus text there (0: any free port), on
    # --metrics-bind (loopback by default); None: no endpoint.
    metrics_port: int | None = None
    metrics_bind: str = "127.0.0.1"
    # --log-format: "text" (the lines as always) or "json" (one object a line)
    log_format: str = "text"
    # --warn-used: log (and count) used bytes rising to this and falling back
    # (daemon/usage.py: "90%", "0.9" or "900M"); None: no alarm.
    warn_used: str | None = None


def resolve_group(group: str) -> int:
    """The gid of a group given by name or number, or DaemonStartError."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        pass
    if group.isdigit():
        return int(group)
    raise DaemonStartError(
        f"--group {group!r}: no such group (see /etc/group, or give a numeric gid)"
    )
