"""Of kept large blocks of the same size, the one freed last is handed out
first (client/large.py `take`): its bytes are likeliest still in the CPU's
caches, so a pipeline writing frame after frame reuses the warm one. And a
squeezed cache (client/cache.py `squeeze`) restores its limits."""

from __future__ import annotations

from shmarena.client.cache import Cache
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


def test_a_squeeze_keeps_the_cache_attributes_shared_keys() -> None:
    """CPython shares an instance dict's keys (and specialises attribute reads
    of the hot path on them) only up to 30 attributes: a squeezed cache,
    refilled and restored, stays under that."""
    now = [0.0]
    cache = Cache(
        session=1,
        epoch=9,
        min_block=4096,
        arena_bytes=256 * MIB,
        wake=lambda: None,
        mark=lambda *_: None,
        recall=lambda *_: False,
        view=memoryview(bytearray(0)),
        clock=lambda: now[0],
    )
    normal = (cache.cap, cache.large.budget)
    cache.drain_all()
    assert (cache.cap, cache.large.budget) == (2 * cache.batch_bytes, cache.max_bytes)
    cache.drain_all()  # squeezed twice: the normal limits are still the saved ones
    now[0] = 10.0
    cache.add(8192, [])  # the first refill after the squeeze restores them
    assert (cache.cap, cache.large.budget) == normal and cache.squeezed is None
    assert len(vars(cache)) <= 30
