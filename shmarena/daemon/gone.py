"""Why a block went: the ledger's memory of the last blocks that left their
owners, and the refusal a stale handle gets from it. Pure.

A stale handle alone says only "not live". The ledger remembers, for the
last `MAX_REMEMBERED_FREES` blocks that left their owners, which hand-out
went and why (freed, its owner recycled, its owner's session ended), so the
refusal can name the rule that was broken (`errors.lifetime_error`). The
memory is bounded: the oldest is forgotten first, and a handle it no longer
remembers is told the three possibilities.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from shmarena.daemon.records import Block
from shmarena.errors import StaleHandle, lifetime_error
from shmarena.protocol import Handle
from shmarena.shm.segments import SEGMENT_SHIFT

# Why a block left its owner (Gone.reason): a free, its owner's recycle, or
# the end of the session its owner belonged to.
FREED = "freed"
RECYCLED = "recycled"
SESSION_ENDED = "session_ended"
_SESSION_ENDINGS = {  # Service.end_session's reasons, as a refusal says them
    "ended": "said bye (client.close)",
    "exited": "exited",
    "lease_expired": "stopped answering and its lease expired",
    "quarantined": "was cut off by the daemon",
}


@dataclass(frozen=True, slots=True)
class Gone:
    """What the ledger remembers of a block that left its owner."""

    generation: int
    reason: str  # FREED, RECYCLED or SESSION_ENDED
    how: str  # for SESSION_ENDED: how the session ended
    owner: str
    pid: int


def remember(memory: OrderedDict[int, Gone], address: int, gone: Gone, limit: int) -> None:
    """Note why the block at `address` went, forgetting the oldest beyond `limit`."""
    memory.pop(address, None)  # re-inserted: the newest is last
    memory[address] = gone
    if len(memory) > limit:
        memory.popitem(last=False)


def place(handle: Handle) -> str:
    """ "offset 0x2000", or "offset 0x2000 of segment 3" beyond segment 0."""
    where = f"offset {handle.offset:#x}"
    return where if handle.segment == 0 else f"{where} of segment {handle.segment}"


def _what_happened(memory: Gone | None, details: dict[str, object]) -> tuple[str, str]:
    """What became of the block and the rule broken, as far as `memory` says."""
    if memory is None:
        return "it was freed, or its owner recycled or its process ended", "use_after_free"
    details.update(reason=memory.reason, owner=memory.owner, pid=memory.pid)
    if memory.reason == RECYCLED:
        return f"its owner {memory.owner!r} was recycled", "owner_recycled"
    if memory.reason == SESSION_ENDED:
        how = _SESSION_ENDINGS.get(memory.how, f"ended ({memory.how})")
        details["ended"] = memory.how
        found = f"its owner {memory.owner!r} went with its session when process {memory.pid} {how}"
        return found, "producer_exited"
    return f"it was freed by its owner {memory.owner!r}", "use_after_free"


def gone_error(
    memory: OrderedDict[int, Gone],
    handle: Handle,
    asked: str,
    for_free: bool,
    block: Block | None,
) -> StaleHandle:
    """Why the block `handle` names is not live (as far as `memory`
    remembers), as the rule the caller broke; `block` is what is at that
    address now, if anything."""
    what = f"{asked} of the block at {place(handle)} (generation {handle.generation})"
    gone = memory.get(handle.segment << SEGMENT_SHIFT | handle.offset)
    details: dict[str, object] = {"handle": list(handle), "reason": ""}
    found, rule = _what_happened(
        gone if gone is not None and gone.generation == handle.generation else None, details
    )
    if block is not None and block.generation != handle.generation and not block.cached:
        found += ", and the block has been handed out again since"
    elif block is not None and block.retainers and not block.cached:
        found += f"; it stays mapped only while {len(block.retainers)} reader(s) retain it"
    if for_free and asked == "free":
        found += "; nothing was freed"
        if rule != "owner_recycled":
            rule = "double_free"
    return lifetime_error(rule, what, found, **details)
