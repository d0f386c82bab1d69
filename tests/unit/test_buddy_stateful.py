"""Hypothesis state machines: whatever sequence of allocs and frees, the
allocator's invariants hold and a model of the live blocks agrees with it."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from shmarena.shm.buddy import Buddy
from shmarena.shm.extents import Extents


class BuddyMachine(RuleBasedStateMachine):
    size_bytes = 1 << 20
    min_block = 4096
    allocator: type[Buddy] | type[Extents] = Buddy

    def __init__(self) -> None:
        super().__init__()
        self.buddy = self.allocator(self.size_bytes, self.min_block)
        self.model: dict[int, int] = {}  # offset -> asked size

    blocks = Bundle("blocks")

    @rule(target=blocks, size=st.integers(1, 300_000))
    def alloc(self, size: int) -> int:
        offset = self.buddy.alloc(size)
        if offset is None:
            assert self.buddy.largest_free_bytes() < self.buddy.carved_bytes(size)
            return -1
        assert offset % self.min_block == 0
        carved = self.buddy.allocation_bytes(offset)
        assert carved is not None and size <= carved < size + self.min_block
        for other, other_size in self.model.items():
            other_end = other + self.buddy.carved_bytes(other_size)
            assert offset + carved <= other or other_end <= offset, "overlap"
        self.model[offset] = size
        return offset

    @rule(offset=consumes(blocks))
    def free(self, offset: int) -> None:
        if offset not in self.model:  # a failed alloc, or gone with free_everything
            return
        size = self.model.pop(offset)
        assert self.buddy.free(offset) == self.buddy.carved_bytes(size)

    @rule()
    def free_everything(self) -> None:
        for offset in list(self.model):
            self.buddy.free(offset)
        self.model.clear()
        assert self.buddy.free_bytes == self.size_bytes
        if self.allocator is Extents:  # one free run: the whole arena
            assert self.buddy.largest_free_bytes() == self.size_bytes
        else:  # the largest power-of-two block
            whole = self.buddy.min_block_bytes << self.buddy.max_order
            assert self.buddy.largest_free_bytes() == whole

    @invariant()
    def invariants_hold(self) -> None:
        assert self.buddy.check() == []
        assert self.buddy.used_bytes + self.buddy.free_bytes == self.size_bytes
        assert len(self.buddy) == len(self.model)


class OddArenaMachine(BuddyMachine):
    """Not a power of two, with the smallest allowed block."""

    size_bytes = (3 << 20) + (64 << 10)
    min_block = 64


class ExtentsMachine(BuddyMachine):
    allocator = Extents


class OddExtentsMachine(OddArenaMachine):
    allocator = Extents


TestBuddy = BuddyMachine.TestCase
TestBuddy.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestOddArena = OddArenaMachine.TestCase
TestOddArena.settings = settings(max_examples=50, stateful_step_count=50, deadline=None)
TestExtents = ExtentsMachine.TestCase
TestExtents.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestOddExtents = OddExtentsMachine.TestCase
TestOddExtents.settings = settings(max_examples=50, stateful_step_count=50, deadline=None)
