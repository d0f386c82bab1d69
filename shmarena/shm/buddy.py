"""A buddy allocator over integer offsets. Pure: no I/O, no owners, no sessions.

Theory of operation
===================
The arena is cut into blocks of ``min_block << k`` bytes, k being the block's
*order* (0 = the minimum block). A block of order k at offset B is named by
its *number* n = B >> (k + min_shift). Its buddy, the other half of the block
of order k + 1 it was split from, is found by flipping the lowest bit of n,
and the parent is n >> 1:

    min_block 4 KiB (min_shift 12), block at 0x6000, order 0: n = 6
    buddy   n ^ 1 = 7  -> offset 7 << 12 = 0x7000
    parent  n >> 1 = 3 of order 1 -> offset 3 << 13 = 0x6000

Free blocks are kept as one set of numbers per order. Allocating an order
pops a block from the first non-empty set at or above it and splits it down,
keeping the left half each time and freeing the right one. Freeing looks the
buddy up in its order's set; while it is free too, the two merge and the
search moves up one order (eager coalescing).

Exact fit
---------
A request is rounded up to a whole number of minimum blocks, c. When c is
not a power of two the allocator takes the smallest block of 2**k >= c
minimum blocks, keeps its head of c blocks and gives the tail back as free
buddies, as Linux's ``alloc_pages_exact`` does: at most one minimum block is
wasted per allocation, not up to half. The head is the binary decomposition
of c laid out largest first (c = 5 -> a piece of 4 blocks then a piece of 1),
each piece naturally aligned, so `free` finds the pieces again from the
offset and c alone and coalescing stays complete.

Arena sizes need not be powers of two: the initial free blocks are the binary
decomposition of the arena, largest first, and a block never merges with a
buddy that would reach past the arena's end (that buddy is never free).

`check()` verifies, from scratch: blocks aligned and inside the arena, no
overlaps between any two blocks, free + used == size, the byte counter right,
and no two free buddies left unmerged.
"""

from __future__ import annotations

from shmarena.shm.space import Space


class Buddy(Space):
    """The buddy allocator (see the theory of operation above): free blocks kept
    as one set of block numbers per order."""

    def __init__(self, size_bytes: int, min_block_bytes: int = 4096) -> None:
        super().__init__(size_bytes, min_block_bytes)
        units = self.units
        self.free_sets: list[set[int]] = [set() for _ in range(self.max_order + 1)]
        start = 0
        for order in range(self.max_order, -1, -1):
            if units >> order & 1:
                self.free_sets[order].add(start >> order)
                start += 1 << order

    def _set_free(self, gaps: list[tuple[int, int]]) -> None:
        """Each gap as the largest naturally aligned pieces, left to right: two
        free buddies are always adjacent, so they land in one gap, where the
        greedy choice would have taken their parent instead."""
        for members in self.free_sets:
            members.clear()
        for position, end in gaps:
            while position < end:
                order = min(self.max_order, (position & -position).bit_length() - 1)
                if position == 0:
                    order = self.max_order
                while position + (1 << order) > end:
                    order -= 1
                self.free_sets[order].add(position >> order)
                position += 1 << order

    def room_for(self, size_bytes: int) -> int:
        """A request needs one free block of the power of two above it."""
        units = self._units(size_bytes)
        return self.min_block_bytes << (units - 1).bit_length()

    # -- alloc / free ----------------------------------------------------------

    def alloc(self, size_bytes: int) -> int | None:
        """Offset of a new allocation of at least `size_bytes` (exact fit), or
        None when no free block is large enough."""
        units = self._units(size_bytes)
        order = (units - 1).bit_length()
        free_sets = self.free_sets
        found = order
        try:
            while not free_sets[found]:
                found += 1
        except IndexError:  # past the top order: nothing large enough
            return None
        n = free_sets[found].pop()
        while found > order:  # split down, keeping the left half
            found -= 1
            n <<= 1
            free_sets[found].add(n | 1)
        start = n << order  # in minimum blocks
        if units != 1 << order:
            # Exact fit: keep the head of `units` blocks, free the tail up to
            # start + 2**order as naturally aligned pieces.
            position = start + units
            end = start + (1 << order)
            while position < end:
                piece = (position & -position).bit_length() - 1  # alignment of position
                while position + (1 << piece) > end:
                    piece -= 1
                free_sets[piece].add(position >> piece)
                position += 1 << piece
        return self._record(start, units)

    def free(self, offset: int) -> int:
        """Free the allocation that starts at `offset`; returns its carved bytes.

        ValueError (and no change) when no allocation starts there.
        """
        units = self._forget(offset)
        free_sets = self.free_sets
        top = self.max_order
        position = offset >> self.min_shift
        # The head pieces: binary decomposition of units, largest first (one
        # piece when units is a power of two).
        remaining = units
        while remaining:
            order = remaining.bit_length() - 1
            remaining ^= 1 << order
            n = position >> order
            position += 1 << order
            while order < top:
                buddies = free_sets[order]
                buddy = n ^ 1
                if buddy in buddies:
                    buddies.remove(buddy)
                    n >>= 1
                    order += 1
                else:
                    break
            free_sets[order].add(n)
        return units << self.min_shift

    # -- reading ---------------------------------------------------------------

    def largest_free_bytes(self) -> int:
        for order in range(self.max_order, -1, -1):
            if self.free_sets[order]:
                return self.min_block_bytes << order
        return 0

    def free_blocks_by_order(self) -> dict[int, int]:
        return {order: len(blocks) for order, blocks in enumerate(self.free_sets)}

    def fragmentation_index(self, size_bytes: int) -> float | None:
        """Linux's extfrag_index for the order a request needs: None when it
        would succeed; near 0 the arena is short of memory, near 1 the free
        memory is there but in blocks too small (fragmentation)."""
        units = max(1, (size_bytes + self.min_block_bytes - 1) >> self.min_shift)
        order = (units - 1).bit_length()
        if order <= self.max_order and any(self.free_sets[order:]):
            return None
        total_blocks = sum(len(s) for s in self.free_sets)
        if not total_blocks:
            return 0.0
        requested = self.min_block_bytes << order
        index = 1 - (1 + self.free_bytes / requested) / total_blocks
        return min(1.0, max(0.0, index))

    def check(self) -> list[str]:
        """Every invariant, verified from scratch; [] when healthy."""
        problems: list[str] = []
        spans: list[tuple[int, int, str]] = []
        for order, blocks in enumerate(self.free_sets):
            size = self.min_block_bytes << order
            for n in blocks:
                start = n * size
                spans.append((start, start + size, f"free order {order}"))
                if start + size > self.size_bytes:
                    problems.append(f"free block {start:#x} of order {order} passes the arena end")
                if order < self.max_order and (n ^ 1) in blocks:
                    parent_end = (n >> 1) * 2 * size + 2 * size
                    if parent_end <= self.size_bytes:
                        problems.append(
                            f"free buddies {start:#x} and {(n ^ 1) * size:#x} of order {order} "
                            "were not merged"
                        )
        return problems + self._check_spans(spans)
