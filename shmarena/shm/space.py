"""What the arena's two allocators share: sizes in minimum blocks, the table
of live allocations, and the checks that do not depend on how free space is
kept. Pure: integers in, integers out.

`Extents` (the default) and `Buddy` subclass `Space` and add `alloc`, `free`,
`largest_free_bytes`, `free_blocks_by_order`, `fragmentation_index` and the
free-space half of `check`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import pairwise


class Space:
    """Base of the two allocators: sizes counted in minimum blocks, the table of
    live allocations, and the checks that do not depend on the free-space
    structure. Never built by itself: `Extents` and `Buddy` subclass it, and
    `Segmented` (several of them behind the same interface)."""

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
        self.used_units = 0  # minimum blocks held by live allocations
        self.live: dict[int, int] = {}  # offset -> size in minimum blocks

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

    def room_for(self, size_bytes: int) -> int:
        """The smallest empty arena of this kind that can hold `size_bytes`."""
        return self.carved_bytes(size_bytes)

    def _units(self, size_bytes: int) -> int:
        if size_bytes.__class__ is not int or size_bytes <= 0:
            raise ValueError(f"allocation size must be a positive int, got {size_bytes!r}")
        return ((size_bytes - 1) >> self.min_shift) + 1

    def _record(self, start: int, units: int) -> int:
        """Note a new allocation of `units` at unit `start`; its offset."""
        offset = start << self.min_shift
        self.live[offset] = units
        self.used_units += units
        return offset

    def _forget(self, offset: int) -> int:
        """Drop the allocation at `offset` from the table; its units."""
        units = self.live.pop(offset, None)
        if units is None:
            raise ValueError(f"no allocation starts at offset {offset!r}")
        self.used_units -= units
        return units

    # -- what each allocator provides ------------------------------------------

    def alloc(self, size_bytes: int) -> int | None:
        """Offset of a new allocation of `size_bytes` rounded up to whole
        minimum blocks, or None when nothing free is large enough."""
        raise NotImplementedError

    def free(self, offset: int) -> int:
        """Free the allocation at `offset`; its bytes. ValueError if none."""
        raise NotImplementedError

    def largest_free_bytes(self) -> int:
        raise NotImplementedError

    def free_blocks_by_order(self) -> dict[int, int]:
        raise NotImplementedError

    def fragmentation_index(self, size_bytes: int) -> float | None:
        raise NotImplementedError

    def check(self) -> list[str]:
        raise NotImplementedError

    # -- restoring -----------------------------------------------------------

    def restore(self, allocations: Iterable[tuple[int, int]]) -> None:
        """Replace the whole state by exactly these (offset, carved bytes)
        allocations, everything else free (fully coalesced). ValueError, with
        no change, when one is misaligned, outside the arena or overlaps."""
        table: dict[int, int] = {}
        for offset, carved in sorted(allocations):
            if offset in table:
                raise ValueError(f"two allocations start at offset {offset:#x}")
            if (
                offset < 0
                or carved <= 0
                or offset % self.min_block_bytes
                or carved % self.min_block_bytes
                or offset + carved > self.size_bytes
            ):
                raise ValueError(
                    f"allocation {offset:#x} of {carved} bytes does not fit an arena of "
                    f"{self.size_bytes} bytes in {self.min_block_bytes}-byte blocks"
                )
            table[offset] = carved >> self.min_shift
        gaps: list[tuple[int, int]] = []
        position = 0
        for offset, units in table.items():
            start = offset >> self.min_shift
            if start < position:
                raise ValueError(f"allocation {offset:#x} overlaps the one before it")
            if start > position:
                gaps.append((position, start))
            position = start + units
        if position < self.units:
            gaps.append((position, self.units))
        self._set_free(gaps)
        self.live = table
        self.used_units = sum(table.values())

    def _set_free(self, gaps: list[tuple[int, int]]) -> None:
        """Make exactly these [start, end) unit ranges the free space."""
        raise NotImplementedError

    # -- reading -------------------------------------------------------------

    def allocation_bytes(self, offset: int) -> int | None:
        units = self.live.get(offset)
        return None if units is None else units << self.min_shift

    def allocations(self) -> Iterator[tuple[int, int]]:
        shift = self.min_shift
        for offset, units in self.live.items():
            yield offset, units << shift

    def _check_spans(self, free_spans: list[tuple[int, int, str]]) -> list[str]:
        """The checks common to both allocators, given the free space as
        (start, end, kind) byte spans: allocations aligned and inside the
        arena, no overlap of anything, the counter right, free + used = size."""
        problems: list[str] = []
        spans = list(free_spans)
        free_total = sum(end - start for start, end, _ in free_spans)
        used_total = 0
        for offset, units in self.live.items():
            size = units << self.min_shift
            used_total += size
            if offset % self.min_block_bytes or offset < 0 or offset + size > self.size_bytes:
                problems.append(f"allocation {offset:#x} of {size} bytes is misplaced")
            spans.append((offset, offset + size, "allocation"))
        spans.sort()
        for (a_start, a_end, a_kind), (b_start, b_end, b_kind) in pairwise(spans):
            if b_start < a_end:
                problems.append(
                    f"{a_kind} [{a_start:#x}, {a_end:#x}) overlaps "
                    f"{b_kind} [{b_start:#x}, {b_end:#x})"
                )
        if used_total != self.used_bytes:
            problems.append(
                f"used byte counter {self.used_bytes} != sum of allocations {used_total}"
            )
        if free_total + used_total != self.size_bytes:
            problems.append(
                f"free {free_total} + used {used_total} != arena size {self.size_bytes}"
            )
        return problems
