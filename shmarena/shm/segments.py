"""An arena of several segments: one allocator (`Space`) per segment, behind
the `Space` interface. Pure: integers in, integers out.

Addresses. The ledger, the allocation table and the client cache know a
block by one integer, its *address*: ``segment << SEGMENT_SHIFT | offset``.
Segment 0's addresses are its offsets, so an arena that never grows looks
exactly as before. A handle carries the two halves apart (``segment``,
``offset``), as the protocol says.

Growth policy (`plan_growth`): when a request finds no room, the arena adds a
segment as large as the arena already is (so it doubles), larger still if
the request needs it, and never past the cap. Indices only go up: a segment
released when idle is never reused under its index, so a client that mapped
segment k can never be looking at another segment k.

Allocation order: the lowest segment first. The first segment fills up
before the next is touched, and the newest segments are the first to become
empty again, so they can be released.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from shmarena.shm.space import Space

SEGMENT_SHIFT = 40  # a segment holds at most 1 TiB
SEGMENT_SPAN = 1 << SEGMENT_SHIFT
OFFSET_MASK = SEGMENT_SPAN - 1
MAX_SEGMENTS = 64  # live at once
MAX_SEGMENT_INDEX = (1 << 22) - 1  # addresses stay below 2**62


def address(segment: int, offset: int) -> int:
    return segment << SEGMENT_SHIFT | offset


def split(addr: int) -> tuple[int, int]:
    """(segment, offset) of an address."""
    return addr >> SEGMENT_SHIFT, addr & OFFSET_MASK


def plan_growth(current_bytes: int, need_bytes: int, max_bytes: int, granule: int) -> int | None:
    """The size of the next segment for a request of `need_bytes`, in whole
    `granule`s, with `current_bytes` in the arena now; None when even the
    room left under `max_bytes` cannot hold it."""
    room = (max_bytes - current_bytes) // granule * granule
    size = max(current_bytes, granule)
    while size < need_bytes:
        size *= 2
    size = min(-(-size // granule) * granule, room, SEGMENT_SPAN)  # addresses hold 1 TiB
    return size if size >= need_bytes and size > 0 else None


class Segmented(Space):
    """Several `Space`s, one per segment, addressed as `address` says."""

    def __init__(self, first: Space, make: Callable[[int], Space]) -> None:
        # No Space.__init__: the figures are sums over the segments.
        self.spaces: dict[int, Space] = {0: first}  # ascending index order
        self.make = make  # size -> an empty Space of that size
        self.min_block_bytes = first.min_block_bytes
        self.min_shift = first.min_shift
        self.next_index = 1

    # -- segments ------------------------------------------------------------

    def add(self, index: int, size_bytes: int) -> None:
        if index in self.spaces or index < self.next_index or index > MAX_SEGMENT_INDEX:
            raise ValueError(f"segment {index} cannot be added after {self.next_index - 1}")
        self.spaces[index] = self.make(size_bytes)
        self.next_index = index + 1

    def remove(self, index: int) -> None:
        space = self.spaces.get(index)
        if index == 0 or space is None or space.live:
            raise ValueError(f"segment {index} is not an empty added segment")
        del self.spaces[index]

    def sizes(self) -> dict[int, int]:
        return {index: space.size_bytes for index, space in self.spaces.items()}

    # -- the Space interface -----------------------------------------------------

    @property
    def size_bytes(self) -> int:  # type: ignore[override]
        return sum(space.size_bytes for space in self.spaces.values())

    @property
    def used_units(self) -> int:  # type: ignore[override]
        return sum(space.used_units for space in self.spaces.values())

    @property
    def used_bytes(self) -> int:
        return sum(space.used_bytes for space in self.spaces.values())

    @property
    def free_bytes(self) -> int:
        return sum(space.free_bytes for space in self.spaces.values())

    @property
    def max_order(self) -> int:  # type: ignore[override]
        return max(space.max_order for space in self.spaces.values())

    @property
    def live(self) -> dict[int, int]:  # type: ignore[override]
        return {
            address(index, offset): units
            for index, space in self.spaces.items()
            for offset, units in space.live.items()
        }

    def __len__(self) -> int:
        return sum(len(space.live) for space in self.spaces.values())

    def alloc(self, size_bytes: int) -> int | None:
        for index, space in self.spaces.items():
            offset = space.alloc(size_bytes)
            if offset is not None:
                return index << SEGMENT_SHIFT | offset
        return None

    def free(self, offset: int) -> int:
        space = self.spaces.get(offset >> SEGMENT_SHIFT)
        if space is None:
            raise ValueError(f"no allocation starts at address {offset:#x}")
        return space.free(offset & OFFSET_MASK)

    def allocation_bytes(self, offset: int) -> int | None:
        space = self.spaces.get(offset >> SEGMENT_SHIFT)
        return None if space is None else space.allocation_bytes(offset & OFFSET_MASK)

    def allocations(self) -> Iterator[tuple[int, int]]:
        for index, space in self.spaces.items():
            for offset, carved in space.allocations():
                yield index << SEGMENT_SHIFT | offset, carved

    def largest_free_bytes(self) -> int:
        return max(space.largest_free_bytes() for space in self.spaces.values())

    def free_blocks_by_order(self) -> dict[int, int]:
        counts = dict.fromkeys(range(self.max_order + 1), 0)
        for space in self.spaces.values():
            for order, count in space.free_blocks_by_order().items():
                counts[order] += count
        return counts

    def fragmentation_index(self, size_bytes: int) -> float | None:
        """Linux's extfrag_index over all segments: None when some segment
        can hold the request."""
        indices = [space.fragmentation_index(size_bytes) for space in self.spaces.values()]
        if any(index is None for index in indices):
            return None
        blocks = sum(self.free_blocks_by_order().values())
        if not blocks:
            return 0.0
        index = 1 - (1 + self.free_bytes / self.carved_bytes(size_bytes)) / blocks
        return min(1.0, max(0.0, index))

    def check(self) -> list[str]:
        problems = []
        for index, space in self.spaces.items():
            prefix = f"segment {index}: " if len(self.spaces) > 1 else ""
            problems += [prefix + problem for problem in space.check()]
        return problems

    def restore(self, allocations: Iterable[tuple[int, int]]) -> None:
        grouped: dict[int, list[tuple[int, int]]] = {index: [] for index in self.spaces}
        for addr, carved in allocations:
            index, offset = split(addr)
            if index not in grouped:
                raise ValueError(f"allocation {addr:#x} lies in segment {index}, which is absent")
            grouped[index].append((offset, carved))
        for index, space in self.spaces.items():  # checks each group before any change
            self.make(space.size_bytes).restore(grouped[index])
        for index, space in self.spaces.items():
            space.restore(grouped[index])
