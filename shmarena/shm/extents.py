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

from collections.abc import Iterator
from itertools import pairwise

SUB_BITS = 3  # 8 bins per power of two
SUB = 1 << SUB_BITS
SCAN = 2  # extents of the own bin looked at for the best fit


def _bin(units: int) -> int:
    """The bin of an extent of `units` (>= 1) units."""
    top = units.bit_length() - 1
    if top < SUB_BITS:
        return units  # lengths 1..7 get a bin each
    return (top - SUB_BITS + 1) * SUB + ((units >> (top - SUB_BITS)) & (SUB - 1))


class Extents:
    """Free-extent allocator over ``size_bytes`` of offsets; the same interface
    as `Buddy`."""

    kind = "extents"

    def __init__(self, size_bytes: int, min_block_bytes: int = 4096) -> None:
        if (
            type(min_block_bytes) is not int
            or min_block_bytes < 64
            or min_block_bytes & (min_block_bytes - 1)
        ):
            raise ValueError(
                f"min block must be a power of two of at least 64 bytes, got {min_block_bytes!r}"
            )
        if type(size_bytes) is not int or size_bytes <= 0 or size_bytes % min_block_bytes:
            raise ValueError(
                f"arena size must be a positive multiple of the min block ({min_block_bytes}), "
                f"got {size_bytes!r}"
            )
        self.size_bytes = size_bytes
        self.min_block_bytes = min_block_bytes
        self.min_shift = min_block_bytes.bit_length() - 1
        self.units = size_bytes >> self.min_shift
        self.max_order = self.units.bit_length() - 1
        self.bins: list[set[int]] = [set() for _ in range(_bin(self.units) + 1)]
        self.mask = 0  # bit b set: bins[b] is not empty
        self.free_start: dict[int, int] = {}
        self.free_end: dict[int, int] = {}
        self.live: dict[int, int] = {}  # offset -> units
        self.used_units = 0
        self._add(0, self.units)

    # -- sizes ---------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self.used_units << self.min_shift

    @property
    def free_bytes(self) -> int:
        return (self.units - self.used_units) << self.min_shift

    def __len__(self) -> int:
        return len(self.live)

    def carved_bytes(self, size_bytes: int) -> int:
        """The request rounded up to a whole number of minimum blocks."""
        mask = self.min_block_bytes - 1
        return (size_bytes + mask) & ~mask

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

    # -- alloc / free ----------------------------------------------------------

    def alloc(self, size_bytes: int) -> int | None:
        """Offset of a new allocation of `size_bytes` rounded up to whole
        minimum blocks, or None when no free extent is long enough."""
        if size_bytes.__class__ is not int or size_bytes <= 0:
            raise ValueError(f"allocation size must be a positive int, got {size_bytes!r}")
        units = ((size_bytes - 1) >> self.min_shift) + 1
        b = _bin(units)
        free_start = self.free_start
        higher = self.mask >> (b + 1)
        start = -1
        if self.mask >> b & 1:  # the own bin: lengths near `units`, maybe shorter
            best = seen = 0
            for candidate in self.bins[b]:
                length = free_start[candidate]
                if length >= units and (not best or length < best):
                    start, best = candidate, length
                    if length == units:
                        break
                seen += 1
                if seen >= SCAN and (start >= 0 or higher):
                    break  # good enough, or a longer extent is at hand anyway
        if start < 0:
            if not higher:
                return None
            b += (higher & -higher).bit_length()
            start = next(iter(self.bins[b]))
        length = free_start[start]
        self._remove(start, length)
        if length > units:
            self._add(start + units, length - units)
        offset = start << self.min_shift
        self.live[offset] = units
        self.used_units += units
        return offset

    def free(self, offset: int) -> int:
        """Free the allocation that starts at `offset`; returns its bytes.

        ValueError (and no change) when no allocation starts there.
        """
        units = self.live.pop(offset, None)
        if units is None:
            raise ValueError(f"no allocation starts at offset {offset!r}")
        self.used_units -= units
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

    def allocation_bytes(self, offset: int) -> int | None:
        units = self.live.get(offset)
        return None if units is None else units << self.min_shift

    def allocations(self) -> Iterator[tuple[int, int]]:
        shift = self.min_shift
        for offset, units in self.live.items():
            yield offset, units << shift

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
        spans: list[tuple[int, int, str]] = []
        free_units = 0
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
        for start, length in self.free_start.items():
            free_units += length
            spans.append((start << shift, (start + length) << shift, "free extent"))
            if self.free_end.get(start + length) != start:
                problems.append(f"free extent at unit {start} is missing from the end map")
            if start not in self.bins[_bin(length)]:
                problems.append(f"free extent at unit {start} is in no bin")
            if start + length in self.free_start:
                problems.append(f"free extents at units {start} and {start + length} not joined")
        if len(self.free_end) != len(self.free_start):
            problems.append("start and end maps of free extents differ in size")
        used_units = 0
        for offset, units in self.live.items():
            used_units += units
            if (
                offset % self.min_block_bytes
                or offset < 0
                or offset + (units << shift) > (self.size_bytes)
            ):
                problems.append(f"allocation {offset:#x} of {units << shift} bytes is misplaced")
            spans.append((offset, offset + (units << shift), "allocation"))
        spans.sort()
        for (a_start, a_end, a_kind), (b_start, b_end, b_kind) in pairwise(spans):
            if b_start < a_end:
                problems.append(
                    f"{a_kind} [{a_start:#x}, {a_end:#x}) overlaps "
                    f"{b_kind} [{b_start:#x}, {b_end:#x})"
                )
        if used_units != self.used_units:
            problems.append(
                f"used unit counter {self.used_units} != sum of allocations {used_units}"
            )
        if free_units + used_units != self.units:
            problems.append(
                f"free {free_units << shift} + used {used_units << shift} != arena size "
                f"{self.size_bytes}"
            )
        return problems
