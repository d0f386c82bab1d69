"""The generation tables of the arena's segments, as this client sees them:
one 64-bit word per minimum block, written by the daemon and by the clients
(shm/gens.py), read by a plain attach to tell a live handle from a stale one
without a round trip.

No I/O and no client here: the Client maps the tables (client/mappings.py)
and puts them in; the Cache is given `mark` to write a block's word.
"""

from __future__ import annotations

from shmarena.errors import StaleHandle, lifetime_error
from shmarena.protocol import Handle
from shmarena.shm import gens
from shmarena.shm.segments import OFFSET_MASK, SEGMENT_SHIFT

# The rule a stale attach broke, by what the generation table says happened.
_RULE_OF_REASON = {
    "recycled": "owner_recycled",
    "session_ended": "producer_exited",
    "never": "handle_altered",
    "not_a_block": "handle_altered",
}


class GenTables:
    """Segment index -> its generation table (64-bit words); empty for a
    daemon that keeps none. `min_shift`: log2 of the minimum block."""

    def __init__(self) -> None:
        self.tables: dict[int, memoryview] = {}
        self.min_shift = 12

    def mark(self, address: int, generation: int, reason: int) -> None:
        """Write a block's word: live under `generation` (reason gens.LIVE;
        its handle is leaving this process), or let go for `reason` if it is
        still live under `generation`."""
        table = self.tables.get(address >> SEGMENT_SHIFT)
        if table is None:
            return
        index = (address & OFFSET_MASK) >> self.min_shift
        if reason == gens.LIVE:
            table[index] = generation
        elif table[index] == generation:
            table[index] = gens.dead_word(generation, reason)

    def not_live(self, handle: Handle, table: memoryview) -> StaleHandle:
        """Why attach refuses `handle`, from its block's word in the table."""
        shift = self.min_shift
        index = handle.offset >> shift
        word = table[index]
        if index << shift != handle.offset:
            reason = "not_a_block"
            what = (
                f"offset {handle.offset:#x} is not the start of a block (blocks start at "
                f"multiples of {1 << shift} bytes): not a handle shmarena gave out"
            )
        else:
            reason = gens.reason_key(word, handle.generation)
            what = gens.what_happened(word, handle.generation) or "it is not live"
        place = f"offset {handle.offset:#x}" + (
            f" of segment {handle.segment}" if handle.segment else ""
        )
        return lifetime_error(
            _RULE_OF_REASON.get(reason, "use_after_free"),
            f"attach of handle {tuple(handle)} ({place})",
            f"{what}; nothing was attached (the bytes there may belong to someone else now)",
            handle=list(handle),
            reason=reason,
            word=word,
        )
