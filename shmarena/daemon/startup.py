"""Starting and stopping the daemon, in words and files: the lock that
makes one daemon per name, what the daemon was started with (`ArenaInfo`),
and its start and stop lines. I/O."""

from __future__ import annotations

import fcntl
import os
import signal

from shmarena._version import __version__
from shmarena.config import format_size
from shmarena.daemon.logs import EventLog
from shmarena.daemon.model import ArenaInfo
from shmarena.daemon.options import DaemonOptions
from shmarena.errors import DaemonStartError
from shmarena.protocol import PROTOCOL_VERSION
from shmarena.rundir import open_in_run_dir
from shmarena.shm import numa
from shmarena.shm.arena import Pages


def take_lock(lock_path: str, name: str) -> int:
    """Lock the name (one daemon per name): the lock file's descriptor, with
    this pid in it; DaemonStartError naming the holder when it is taken."""
    fd = open_in_run_dir(lock_path, os.O_RDWR | os.O_CREAT, "lock file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DaemonStartError(
            f"a shmarena daemon named {name!r} is already running "
            f"(pid {holder}, lock {lock_path}); stop it with "
            f"`shmarena --name {name} shutdown` or pick another --name",
            pid=holder,
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def arena_info(
    opts: DaemonOptions,
    arena: tuple[int, int, int, str],
    where: tuple[str, str, int],
    pages: Pages,
    node_cpus: list[int],
    gid: int | None,
    started_at: float,
) -> ArenaInfo:
    """What the daemon was started with: `arena` is (size, min block, epoch,
    allocator), `where` (shm name, socket path, data offset in a backing file)."""
    size_bytes, min_block, epoch, allocator = arena
    shm, socket, data_offset = where
    backed = opts.backing is not None
    return ArenaInfo(
        name=opts.name,
        epoch=epoch,
        size_bytes=size_bytes,
        min_block_bytes=min_block,
        shm_name="" if backed else shm,
        pid=os.getpid(),
        started_at=started_at,
        socket_path=socket,
        lease_s=opts.lease_s,
        quota_per_session=opts.quota_per_session,
        uid=os.getuid(),
        group_gid=gid if gid is not None else -1,
        allocator=allocator,
        version=__version__,
        backing=os.path.abspath(opts.backing) if opts.backing else "",
        data_offset=data_offset,
        durability=opts.durability if backed else "",
        grace_s=opts.grace_s,
        max_size_bytes=opts.max_size_bytes or 0,
        granule_bytes=pages.page_bytes,
        idle_s=opts.shrink_after_s,
        numa_policy=numa.POLICY_NAMES.get(pages.numa_policy, ""),
        numa_nodes=pages.numa_nodes,
        numa_cpus=tuple(node_cpus),
        warn_used=opts.warn_used or "",
    )


def announce(
    log: EventLog, opts: DaemonOptions, info: ArenaInfo, where: str, pages_kind: str
) -> None:
    """The start line, and a warning for any fault injection."""
    if opts.debug_drop_replies > 0 or opts.debug_delay_ms > 0:
        log(
            f"DEBUG: dropping {opts.debug_drop_replies:.0%} of replies, delaying each "
            f"by up to {opts.debug_delay_ms:g} ms (fault injection; never in production)",
            "fault_injection",
            "warning",
            drop_replies=opts.debug_drop_replies,
            delay_ms=opts.debug_delay_ms,
        )
    if opts.debug_fail:
        log(
            f"DEBUG: requests of {', '.join(opts.debug_fail)} raise inside the daemon "
            "(fault injection; never in production)",
            "fault_injection",
            "warning",
            fail=list(opts.debug_fail),
        )
    log(
        f"shmarena daemon {info.name!r} (pid {os.getpid()}) serving "
        f"{format_size(info.size_bytes)} at {where}, socket {info.socket_path}"
        + (f"; grows up to {format_size(info.max_size_bytes)}" if info.max_size_bytes else "")
        + (
            f"; pages bound ({info.numa_policy}) to NUMA node(s) {list(info.numa_nodes)}"
            if info.numa_nodes
            else ""
        )
        + (f"; warns when {info.warn_used} of it is used" if info.warn_used else ""),
        "start",
        name=info.name,
        pid=os.getpid(),
        size_bytes=info.size_bytes,
        max_size_bytes=info.max_size_bytes,
        shm=info.shm_name,
        backing=info.backing,
        socket=info.socket_path,
        version=info.version,
        protocol=PROTOCOL_VERSION,
        allocator=info.allocator,
        min_block_bytes=info.min_block_bytes,
        lease_s=info.lease_s,
        group=opts.group or "",
        pages=pages_kind,
        numa_nodes=list(info.numa_nodes),
        warn_used=info.warn_used or None,
    )


def log_stop(
    log: EventLog, info: ArenaInfo, signum: int | None, uptime_s: float, used: int, sessions: int
) -> None:
    """The stop line: why, and how the arena stood."""
    why = signal.Signals(signum).name if signum else "shutdown request"
    log(
        f"shmarena daemon {info.name!r} stopping ({why})",
        "stop",
        name=info.name,
        pid=os.getpid(),
        reason=why,
        uptime_s=round(uptime_s, 3),
        used_bytes=used,
        sessions=sessions,
    )
