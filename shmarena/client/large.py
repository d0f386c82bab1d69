"""The free large blocks one process keeps for reuse: best fit, a byte
budget, and an idle decay.

Sizes above the cache's size classes (client/cache.py) are not rounded to a
class: a large block is carved to the page-rounded size first asked for (so
an arena filled with large blocks wastes nothing but the page rounding), and
when it is freed it stays here instead of going back to the daemon. The next
large request takes the smallest kept block that fits it with at most 1/8
(`SLACK`) to spare; a loop of 16 MiB frames reuses one block without a
message.

What is kept is bounded twice, as jemalloc bounds its dirty extents:
- a byte *budget* per process: over it, the blocks freed longest ago go
  back first;
- an idle *decay*: a block not reused for `DECAY_S` seconds goes back. The
  client's flusher thread asks `expired` when the oldest is due, at most
  every `GRAIN_S`, so an idle process wakes a few times a second at most, and
  not at all once nothing is kept.

Pure bookkeeping of (address, carved bytes) pairs, under the cache's lock;
the cache queues the DRAIN events of what goes back.
"""

from __future__ import annotations

from bisect import bisect_left, insort

DECAY_S = 2.0  # a free large block not reused this long goes back to the arena
GRAIN_S = 0.25  # blocks due within this of each other go back together
MAX_BUDGET = 256 << 20  # free large bytes one process keeps at most (or 1/16 of the arena)
SLACK = 8  # a kept block serves a request at most 1/SLACK larger than its pages


def large_budget(arena_bytes: int) -> int:
    """Free large bytes a process may keep: 1/16 of the arena, at most
    MAX_BUDGET. A sixteenth, like the size classes' cap, so that a handful
    of worker processes sharing an arena keep a quarter of it at worst."""
    return min(MAX_BUDGET, arena_bytes // 16)


class LargeBlocks:
    """The free large blocks of one cache (see the module's docstring)."""

    __slots__ = ("by_size", "freed_at", "bytes", "budget")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.by_size: list[tuple[int, int]] = []  # sorted (carved bytes, address)
        # address -> (when it was freed, carved bytes); in the order freed, so
        # the first is the coldest
        self.freed_at: dict[int, tuple[float, int]] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.freed_at)

    def take(self, need: int) -> tuple[int, int] | None:
        """(address, carved) of the smallest kept block of at least `need`
        bytes and at most 1/SLACK more, taken out; None if none fits. Of
        blocks of that size, the one freed last: its bytes are likeliest
        still in the CPU's caches (writing 16 MiB frames in turn over six
        blocks took twice as long per frame as over one, on a 32 MiB L3)."""
        by_size = self.by_size
        i = bisect_left(by_size, (need, -1))
        if i == len(by_size):
            return None
        carved, address = by_size[i]
        if carved > need + need // SLACK:
            return None
        freed_at = self.freed_at
        j = i + 1
        while j < len(by_size) and by_size[j][0] == carved:  # the same size, freed later?
            if freed_at[by_size[j][1]][0] >= freed_at[address][0]:
                i, address = j, by_size[j][1]
            j += 1
        del by_size[i]
        del self.freed_at[address]
        self.bytes -= carved
        return address, carved

    def put(
        self, address: int, carved: int, now: float, trim: bool = True
    ) -> list[tuple[int, int]]:
        """Keep a freed block; the coldest blocks the budget cannot keep any
        more (taken out: the caller gives them back). Without `trim`, nothing
        goes (a block carved for a request that takes it at once)."""
        insort(self.by_size, (carved, address))
        self.freed_at[address] = (now, carved)
        self.bytes += carved
        over: list[tuple[int, int]] = []
        while trim and self.bytes > self.budget:
            over.append(self._pop_coldest())
        return over

    def expired(self, now: float, decay_s: float = DECAY_S) -> list[tuple[int, int]]:
        """The blocks idle for `decay_s` (within GRAIN_S), taken out."""
        gone: list[tuple[int, int]] = []
        freed_at = self.freed_at
        while freed_at:
            when = next(iter(freed_at.values()))[0]
            if when + decay_s > now + GRAIN_S:
                break
            gone.append(self._pop_coldest())
        return gone

    def due_in(self, now: float, decay_s: float = DECAY_S) -> float | None:
        """Seconds until the coldest block is due (at least GRAIN_S); None
        when nothing is kept."""
        if not self.freed_at:
            return None
        when = next(iter(self.freed_at.values()))[0]
        return max(GRAIN_S, when + decay_s - now)

    def clear(self) -> list[tuple[int, int]]:
        """Every kept block, taken out."""
        gone = [(address, carved) for carved, address in self.by_size]
        self.by_size.clear()
        self.freed_at.clear()
        self.bytes = 0
        return gone

    def _pop_coldest(self) -> tuple[int, int]:
        address = next(iter(self.freed_at))
        _, carved = self.freed_at.pop(address)
        self.by_size.remove((carved, address))  # few blocks: a linear removal is fine
        self.bytes -= carved
        return address, carved
