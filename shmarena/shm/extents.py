"""The arena's allocator: free extents in segregated bins, best fit within a
bin, immediate coalescing. Pure: integers in, integers out.

Why not only the buddy allocator (`buddy.py`): a buddy block must sit at an
address aligned to its size, and two free neighbours merge only if they are
buddies. With requests of log-uniform size 4 KiB..4 MiB in a 1 GiB arena the
buddy fails its first request at 89 % use and, after churn (free a random
half, refill), at about 50 %: plenty of free memory, in runs it may not join.
Here any two free neighbours join at once and a request takes any run long
enough, so the same workload fills 99 % of the arena and stays there.

Layout (in minimum blocks, "units"; offsets are units << min_shift):

- a free extent is a run of units, known by its start (``free_start``:
  start -> length) and its end (``free_end``: end -> start), so a freed
  allocation finds its free neighbours in two dict lookups;
- extents are filed in bins by length, 8 bins per power of two (like TLSF's
  second level), and a bit mask says which bins hold anything;
- alloc(n): the best fit among the extents of n's own bin (they may be
  shorter than n), else any extent of the next non-empty bin (all of those
  are long enough); the head is allocated, the tail stays free.

Every allocation costs a few dict and set operations and a bit scan,
independent of the arena size; no split or merge cascade.
"""

from __future__ import annotations

from shmarena.shm.space import Space

SUB_BITS = 3  # 8 bins per power of two
SUB = 1 << SUB_BITS
SCAN = 2  # extents of the own bin looked at for the best fit


def _bin(units: int) -> int:
    """The bin of an extent of `units` (>= 1) units."""
    top = units.bit_length() - 1
    if top < SUB_BITS:
        return units  # lengths 1..7 get a bin each
    return (top - SUB_BITS + 1) * SUB + ((units >> (top - SUB_BITS)) & (SUB - 1))


class Extents(Space):
    """Free-extent allocator over ``size_bytes`` of offsets; the same interface
    as `Buddy`."""

    def __init__(self, size_bytes: int, min_block_bytes: int = 4096) -> None:
        super().__init__(size_bytes, min_block_bytes)
        self.bins: list[set[int]] = [set() for _ in range(_bin(self.units) + 1)]
        self.mask = 0  # bit b set: bins[b] is not empty
        self.free_start: dict[int, int] = {}
        self.free_end: dict[int, int] = {}
        self._add(0, self.units)

    # -- free extents ----------------------------------------------------------

    def _add(self, start: int, length: int) -> None:
        self.free_start[start] = length
        self.free_end[start + length] = start
        b = _bin(length)
        self.bins[b].add(start)
        self.mask |= 1 << b

    def _remove(self, start: int, length: int) -> None:
        del self.free_start[start]
        del self.free_end[start + length]
        b = _bin(length)
        members = self.bins[b]
        members.discard(start)
        if not members:
            self.mask &= ~(1 << b)

    def _set_free(self, gaps: list[tuple[int, int]]) -> None:
        for members in self.bins:
            members.clear()
        self.mask = 0
        self.free_start.clear()
        self.free_end.clear()
        for start, end in gaps:
            self._add(start, end - start)

    # -- alloc / free ----------------------------------------------------------

    def alloc(self, size_bytes: int) -> int | None:
        """Offset of a new allocation of `size_bytes` rounded up to whole
        minimum blocks, or None when no free extent is long enough."""
        units = self._units(size_bytes)
        b = _bin(units)
        free_start = self.free_start
        higher = self.mask >> (b + 1)
        start = -1
        if self.mask >> b & 1:  # the own bin: lengths near `units`, maybe shorter
            start = self._fit_in_bin(b, units, everything=not higher)
        if start < 0:
            if not higher:
                return None
            b += (higher & -higher).bit_length()
            # set.pop() starts where the last pop ended; iterating from the
            # table's start would walk over every slot emptied by removals.
            start = self.bins[b].pop()
            self.bins[b].add(start)
        length = free_start[start]
        rest = length - units
        if rest and _bin(rest) == b:
            # The tail stays in the extent's bin (a long extent carved from,
            # a FILL's run of blocks): only its start moves.
            del free_start[start]
            free_start[start + units] = rest
            self.free_end[start + length] = start + units
            members = self.bins[b]
            members.discard(start)
            members.add(start + units)
        else:
            self._remove(start, length)
            if rest:
                self._add(start + units, rest)
        return self._record(start, units)

    def _fit_in_bin(self, b: int, units: int, everything: bool) -> int:
        """The shortest of SCAN extents of bin `b` that holds `units` (all of
        them when `everything`), or -1. Sampled with pop(), put back after."""
        members, free_start = self.bins[b], self.free_start
        start, best = -1, 0
        looked = []
        for _ in range(min(SCAN, len(members))):
            candidate = members.pop()
            looked.append(candidate)
            length = free_start[candidate]
            if length >= units and (not best or length < best):
                start, best = candidate, length
                if length == units:
                    break
        members.update(looked)
        if start < 0 and everything:  # the last chance before OutOfMemory: look at all
            for candidate in members:
                length = free_start[candidate]
                if length >= units and (not best or length < best):
                    start, best = candidate, length
        return start

    def free(self, offset: int) -> int:
        """Free the allocation that starts at `offset`; returns its bytes.

        ValueError (and no change) when no allocation starts there.
        """
        units = self._forget(offset)
        start = offset >> self.min_shift
        length = units
        before = self.free_end.get(start)
        if before is not None:
            self._remove(before, start - before)
            length += start - before
            start = before
        after = self.free_start.get(start + length)
        if after is not None:
            self._remove(start + length, after)
            length += after
        self._add(start, length)
        return units << self.min_shift

    # -- reading ---------------------------------------------------------------

    def largest_free_bytes(self) -> int:
        if not self.mask:
            return 0
        top = self.bins[self.mask.bit_length() - 1]
        return max(self.free_start[s] for s in top) << self.min_shift

    def free_blocks_by_order(self) -> dict[int, int]:
        """Free extents by order: order k counts the extents of at least
        2**k and less than 2**(k+1) minimum blocks (as /proc/buddyinfo reads)."""
        counts = dict.fromkeys(range(self.max_order + 1), 0)
        for length in self.free_start.values():
            counts[length.bit_length() - 1] += 1
        return counts

    def fragmentation_index(self, size_bytes: int) -> float | None:
        """Linux's extfrag_index for a request of `size_bytes`: None when it
        would succeed; near 0 the arena is short of memory, near 1 the free
        memory is there but in extents too short (fragmentation)."""
        units = max(1, (size_bytes + self.min_block_bytes - 1) >> self.min_shift)
        if self.largest_free_bytes() >> self.min_shift >= units:
            return None
        extents = len(self.free_start)
        if not extents:
            return 0.0
        index = 1 - (1 + self.free_bytes / (units << self.min_shift)) / extents
        return min(1.0, max(0.0, index))

    def check(self) -> list[str]:
        """Every invariant, verified from scratch; [] when healthy."""
        problems: list[str] = []
        shift = self.min_shift
        mask = 0
        for b, members in enumerate(self.bins):
            if members:
                mask |= 1 << b
            for start in members:
                length = self.free_start.get(start)
                if length is None or _bin(length) != b:
                    problems.append(f"free extent at unit {start} is in the wrong bin {b}")
        if mask != self.mask:
            problems.append("the bin mask disagrees with the bins")
        spans: list[tuple[int, int, str]] = []
        for start, length in self.free_start.items():
            spans.append((start << shift, (start + length) << shift, "free extent"))
            if self.free_end.get(start + length) != start:
                problems.append(f"free extent at unit {start} is missing from the end map")
            if start not in self.bins[_bin(length)]:
                problems.append(f"free extent at unit {start} is in no bin")
            if start + length in self.free_start:
                problems.append(f"free extents at units {start} and {start + length} not joined")
        if len(self.free_end) != len(self.free_start):
            problems.append("start and end maps of free extents differ in size")
        return problems + self._check_spans(spans)
