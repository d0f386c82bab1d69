"""The free large blocks a process keeps (client/large.py): best fit within
the slack, the budget, and the idle decay; and their path through the Cache."""

from __future__ import annotations

from shmarena.client.cache import Cache, largest_class, size_class
from shmarena.client.large import GRAIN_S, LargeBlocks, large_budget
from shmarena.protocol import ASSIGN, DRAIN

MIB = 1 << 20


def test_best_fit_within_an_eighth() -> None:
    kept = LargeBlocks(budget=64 * MIB)
    for address, size in ((0x100000, 4 * MIB), (0x900000, 3 * MIB), (0x2000000, 8 * MIB)):
        assert kept.put(address, size, now=0.0) == []
    assert kept.take(5 * MIB) is None  # 8 MiB is more than 1/8 over
    assert kept.take(3 * MIB - 4096) == (0x900000, 3 * MIB)  # the smallest that fits
    assert kept.take(4 * MIB + 4096) is None  # 4 MiB is too small, 8 MiB too large
    assert kept.take(4 * MIB) == (0x100000, 4 * MIB)
    assert kept.bytes == sum(c for c, _ in kept.by_size)


def test_the_budget_gives_the_coldest_back() -> None:
    kept = LargeBlocks(budget=10 * MIB)
    assert kept.put(1 << 20, 4 * MIB, now=1.0) == []
    assert kept.put(2 << 24, 4 * MIB, now=2.0) == []
    assert kept.put(3 << 24, 4 * MIB, now=3.0) == [(1 << 20, 4 * MIB)]  # freed first
    assert kept.bytes == 8 * MIB and len(kept) == 2
    assert kept.put(4 << 24, 4 * MIB, now=4.0, trim=False) == []  # about to be taken
    assert kept.bytes == 12 * MIB


def test_idle_blocks_decay_oldest_first() -> None:
    kept = LargeBlocks(budget=64 * MIB)
    kept.put(1 << 24, 2 * MIB, now=10.0)
    kept.put(2 << 24, 2 * MIB, now=11.0)
    assert kept.due_in(now=10.5, decay_s=2.0) == 1.5
    assert kept.expired(now=11.0, decay_s=2.0) == []
    assert kept.expired(now=12.0, decay_s=2.0) == [(1 << 24, 2 * MIB)]
    assert kept.due_in(now=12.9, decay_s=2.0) == GRAIN_S  # never a busy wait
    assert kept.expired(now=13.0, decay_s=2.0) == [(2 << 24, 2 * MIB)]
    assert kept.due_in(now=13.0) is None and kept.bytes == 0


def test_the_budget_is_a_sixteenth_of_the_arena_at_most_256_mib() -> None:
    assert large_budget(64 * MIB) == 4 * MIB
    assert large_budget(1 << 30) == 64 * MIB
    assert large_budget(16 << 30) == 256 * MIB


def test_a_large_block_goes_round_the_cache_without_events() -> None:
    now = [100.0]
    cache = Cache(
        session=1,
        epoch=9,
        min_block=4096,
        arena_bytes=64 * MIB,
        wake=lambda: None,
        mark=lambda *_: None,
        recall=lambda *_: False,
        view=memoryview(bytearray(0)),
        clock=lambda: now[0],
    )
    size = 2 * MIB + 100
    assert cache.hand_out_large(size, 0) is None  # nothing kept yet: a miss
    cache.add(cache.carve_size(size), [0x400000])  # what the FILL brought
    address, gen = cache.hand_out_large(size, 0) or (0, 0)
    assert address == 0x400000 and cache.out[address][3] == 2 * MIB + 4096
    assert cache.give_back(address, gen) == 2 * MIB + 4096
    again = cache.hand_out_large(2 * MIB, 0)  # within the slack: the same block
    assert again is not None and again[0] == address
    cache.give_back(*again)
    assert cache.take_events() == []  # never reported: folded away
    now[0] += cache.decay_s + 1
    assert cache.decay() is None
    assert cache.take_events() == [[DRAIN, address]]
    assert ASSIGN not in cache.pending


def test_no_size_class_reaches_above_the_cached_sizes() -> None:
    """Whatever the arena, sizes up to max_bytes have classes up to max_bytes:
    a block above it is always a large one, never a class's."""
    for arena in (48 * MIB, 50 * MIB, 64 * MIB, 100 * MIB, 3 * MIB + 8192, 1 << 30):
        for unit in (4096, 65536):
            cache = Cache(
                session=1,
                epoch=1,
                min_block=unit,
                arena_bytes=arena,
                wake=lambda: None,
                mark=lambda *_: None,
                recall=lambda *_: False,
                view=memoryview(bytearray(0)),
            )
            top = cache.max_bytes
            assert size_class(top, unit) == top
            assert all(size_class(s, unit) <= top for s in range(1, top + 1, 997))
            assert largest_class(top + unit, unit) >= top
