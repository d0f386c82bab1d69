"""The arena's layout for the BLOCKS request: every allocation in address
order with who holds it, and the free runs between them. Pure and read-only.

The free runs are the gaps between allocations, which is exactly the free
space of either allocator (`Space.check` holds them to free + used = size),
so this needs nothing from how `Extents` or `Buddy` keep their free lists.
"""

from __future__ import annotations

from typing import Any

from shmarena.daemon.ledger import Ledger
from shmarena.errors import InvalidRequest
from shmarena.limits import MAX_BLOCKS_REPLY
from shmarena.shm.segments import SEGMENT_SHIFT, Segmented

CACHED = "(cached)"  # holder of a block sitting in a client's cache
RETAINED = "(retained)"  # holder of a freed block still retained by a reader
PINNED = "(pinned)"  # holder of a freed block a process still has views of (no retain)


def layout(ledger: Ledger, max_blocks: int = MAX_BLOCKS_REPLY) -> dict[str, Any]:
    """Per segment the used blocks as flat [offset, carved, holder index] and
    the free runs as flat [offset, size], in address order, at most
    `max_blocks` blocks in all (capped at MAX_BLOCKS_REPLY); the holder names
    in order of first appearance, so the same arena gives the same indexes."""
    if max_blocks < 0:
        raise InvalidRequest(
            f"blocks: max_blocks must be 0 or more, got {max_blocks}; "
            f"leave it out for the most a reply holds ({MAX_BLOCKS_REPLY})",
            op="blocks",
            argument="max_blocks",
        )
    budget = min(max_blocks, MAX_BLOCKS_REPLY)
    space = ledger.space
    parts = space.spaces if isinstance(space, Segmented) else {0: space}
    holders: list[str] = []
    index_of: dict[str, int] = {}
    segments = []
    truncated = False
    for segment, part in parts.items():
        base = segment << SEGMENT_SHIFT
        shift = part.min_shift
        blocks: list[int] = []
        free: list[int] = []
        position = 0
        complete = not truncated
        if complete:
            for offset in sorted(part.live):
                if budget == 0:
                    truncated, complete = True, False
                    break
                budget -= 1
                carved = part.live[offset] << shift
                if offset > position:
                    free += (position, offset - position)
                holder = _holder(ledger, base | offset)
                index = index_of.get(holder)
                if index is None:
                    index = index_of[holder] = len(holders)
                    holders.append(holder)
                blocks += (offset, carved, index)
                position = offset + carved
            if complete and position < part.size_bytes:
                free += (position, part.size_bytes - position)
        segments.append(
            {
                "index": segment,
                "size_bytes": part.size_bytes,
                "complete": complete,
                "blocks": blocks,
                "free": free,
            }
        )
    return {
        "segments": segments,
        "holders": holders,
        "truncated": truncated,
        "min_block_bytes": ledger.space.min_block_bytes,
    }


def _holder(ledger: Ledger, address: int) -> str:
    block = ledger.blocks.get(address)
    if block is None:  # pragma: no cover - the ledger's invariant says never
        return "(unknown)"
    if block.owner is not None:
        return block.owner
    if block.cached:
        return CACHED
    return PINNED if block.pins and not block.retainers else RETAINED
