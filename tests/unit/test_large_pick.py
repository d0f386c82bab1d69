"""Of kept large blocks of the same size, the one freed last is handed out
first (client/large.py `take`): its bytes are likeliest still in the CPU's
caches, so a pipeline writing frame after frame reuses the warm one."""

from __future__ import annotations

from shmarena.client.large import LargeBlocks

MIB = 1 << 20


def test_of_equal_blocks_the_last_freed_goes_first() -> None:
    kept = LargeBlocks(budget=64 * MIB)
    for address, now in ((0x3000000, 1.0), (0x1000000, 2.0), (0x2000000, 3.0)):
        assert kept.put(address, 16 * MIB, now=now) == []
    assert kept.take(16 * MIB) == (0x2000000, 16 * MIB)
    assert kept.take(16 * MIB) == (0x1000000, 16 * MIB)
    assert kept.put(0x2000000, 16 * MIB, now=4.0) == []
    assert kept.take(16 * MIB) == (0x2000000, 16 * MIB)
    assert kept.take(16 * MIB) == (0x3000000, 16 * MIB)
    assert kept.take(16 * MIB) is None and kept.bytes == 0 and len(kept) == 0


def test_a_smaller_fit_still_wins_over_a_warmer_larger_one() -> None:
    kept = LargeBlocks(budget=64 * MIB)
    assert kept.put(0x1000000, 16 * MIB, now=1.0) == []
    assert kept.put(0x3000000, 17 * MIB, now=2.0) == []  # freed later, but larger
    assert kept.take(16 * MIB) == (0x1000000, 16 * MIB)
