"""Handlers that look at or stop the daemon: STATS, CHECK, SEGMENTS, BLOCKS,
PING, SHUTDOWN; and the stats snapshot itself. Pure.

The snapshot names the allocator the daemon runs (`allocator`: "extents" or
"buddy", `--allocator`); the figures come from whichever it is (`Space`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shmarena.config import format_size
from shmarena.daemon.handlers.base import Call, Result
from shmarena.daemon.layout import layout
from shmarena.daemon.ledger import QUEUED
from shmarena.limits import MAX_KEPT_PER_SESSION
from shmarena.protocol import PROTOCOL_VERSION
from shmarena.shm.segments import Segmented

if TYPE_CHECKING:
    from shmarena.daemon.service import Service


def _extfrag(index: float | None) -> float:
    """Linux's convention: -1 for an order that can be allocated now."""
    return -1.0 if index is None else round(index, 3)


def stats(svc: Service, now: float) -> dict[str, Any]:
    """Everything about the arena in one snapshot (the keys are documented
    in docs/stats.md)."""
    ledger, space, info = svc.ledger, svc.ledger.space, svc.info
    retained_only = ledger.retained_only()
    pinned = ledger.pinned()
    cached_blocks = sum(len(s.cached) for s in ledger.sessions.values())
    largest = space.largest_free_bytes()
    free = space.free_bytes
    return {
        "name": info.name,
        "pid": info.pid,
        "epoch": info.epoch,
        "version": info.version,
        "protocol": PROTOCOL_VERSION,
        "shm_name": info.shm_name,
        "socket": info.socket_path,
        "started_at": info.started_at,
        "uptime_s": round(now - info.started_at, 3),
        "size_bytes": space.size_bytes,
        "initial_size_bytes": info.size_bytes,
        "max_size_bytes": max(info.max_size_bytes, info.size_bytes),
        "segments": svc.segment_rows(),
        "allocator": info.allocator,
        "used_bytes": ledger.owned_bytes,
        **svc.usage.stats(ledger),  # peak_used_bytes, peak_at, warn_used, used_warning
        "requested_bytes": ledger.requested_bytes,
        "cached_bytes": ledger.cached_bytes,
        "cached_blocks": cached_blocks,
        "retained_only_bytes": sum(b.carved for b in retained_only),
        "retained_only_blocks": len(retained_only),
        "pinned_bytes": sum(b.carved for b in pinned),
        "pinned_blocks": len(pinned),
        "free_bytes": free,
        "largest_free_bytes": largest,
        "min_block_bytes": info.min_block_bytes,
        "live_blocks": len(ledger.blocks) - len(retained_only) - len(pinned) - cached_blocks,
        "owners": len(ledger.owners),
        "sessions": len(ledger.sessions),
        "fragmentation": round(1 - largest / free, 4) if free else 0.0,
        "free_blocks_by_order": {
            str(order): count for order, count in space.free_blocks_by_order().items()
        },
        "extfrag_index_by_order": {
            str(order): _extfrag(space.fragmentation_index(info.min_block_bytes << order))
            for order in range(space.max_order + 1)
        },
        "generation": ledger.generation,
        "lease_s": info.lease_s,
        "recovering_sessions": len(svc.admission.recovering),
        "names": len(svc.exchange.names),
        "detached_owners": ledger.detached_owners,
        "queued_payload_bytes": svc.exchange.payload_bytes,
        "queues": svc.exchange.queue_rows(now),
        "queued_bytes": sum(
            b.carved for b in ledger.blocks.values() if b.retainers and QUEUED in b.retainers
        ),
        "waiting_requests": svc.exchange.kept_total + len(svc.alloc_queue.waiters),
        "quota_per_session_bytes": ledger.session_quota,
        "access": {"admin_uids": sorted({0, info.uid}), "group_gid": info.group_gid},
        "limits": svc.limits(),
        "alloc_waiters": [
            {
                "session": w.session_id,
                "size": w.args[0],
                "owner": w.args[1],
                "waited_s": round(now - w.since, 3),
                "left_s": round(w.deadline - now, 3),
            }
            for w in svc.alloc_queue.waiters.values()
        ],
        "counters": {
            **vars(svc.counters),
            "ops": dict(svc.counters.ops),
            "errors_by_code": dict(svc.counters.errors_by_code),
        },
        **svc.extra_stats(),
    }


def limits(svc: Service) -> dict[str, int]:
    """The bounds the daemon keeps on what clients make it hold, by the
    name a `LimitReached` error gives (docs/reliability.md)."""
    return {
        **svc.ledger.limits(),
        **svc.exchange.limits(),
        "kept_requests_per_session": MAX_KEPT_PER_SESSION,
        "listing_rows": svc.max_listing_rows,
    }


def segment_rows(svc: Service) -> list[dict[str, Any]]:
    """Per segment: its index, size, use and where it lives."""
    space = svc.ledger.space
    parts = space.spaces if isinstance(space, Segmented) else {0: space}
    rows = []
    for index, part in parts.items():
        where = svc.segments.get(index, {})
        rows.append(
            {
                "index": index,
                "size_bytes": part.size_bytes,
                "used_bytes": part.used_bytes,
                "blocks": len(part.live),
                "largest_free_bytes": part.largest_free_bytes(),
                "where": where.get("shm") or where.get("path", ""),
                "empty_since": svc.ledger.empty_since.get(index),
            }
        )
    return rows


def stats_op(c: Call) -> Result:
    """STATS: the snapshot; with reset_peak (administrators), taken after the
    peak of used bytes was set to the used bytes now, with the peak before."""
    if not c.args[0]:
        return (stats(c.svc, c.now),)
    svc = c.svc
    svc.require_admin(c.session, "stats --reset-peak", "reset the peak of used bytes")
    reset = svc.usage.reset_peak(svc.ledger, c.now)
    session = svc.ledger.sessions[c.session]
    svc.log(
        "peak_reset",
        f"peak of used bytes reset by uid {session.uid} (session {c.session}, pid "
        f"{session.pid}): was {format_size(reset['previous_peak_used_bytes'])}, now "
        f"{format_size(reset['peak_used_bytes'])}",
        session=c.session,
        **reset,
    )
    snapshot = stats(svc, c.now)
    snapshot["previous_peak_used_bytes"] = reset["previous_peak_used_bytes"]
    snapshot["previous_peak_at"] = reset["previous_peak_at"]
    return (snapshot,)


def check(c: Call) -> Result:
    """CHECK: the invariants' problems (none: [])."""
    return (c.svc.check(),)


def segments(c: Call) -> Result:
    """SEGMENTS: how clients map each segment."""
    return (list(c.svc.segments.values()),)


def blocks(c: Call) -> Result:
    """BLOCKS: the arena's layout, for `shmarena blocks`."""
    return (layout(c.svc.ledger, c.args[0]),)


def ping(c: Call) -> Result:
    """PING: the daemon's time (a heartbeat for a session on a lease)."""
    return (c.now,)


def shutdown(c: Call) -> Result:
    """SHUTDOWN: stop the daemon (administrators)."""
    c.svc.require_admin(c.session, "shutdown", "stop the daemon")
    c.svc.stop()
    return (None,)
