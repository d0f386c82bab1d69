"""The buddy allocator, as a table of behaviours. Pure: no daemon involved."""

from __future__ import annotations

import random

import pytest

from shmarena.shm.buddy import Buddy

PAGE = 4096


def test_fresh_arena_is_one_free_block() -> None:
    buddy = Buddy(1 << 20)
    assert buddy.max_order == 8
    assert buddy.free_blocks_by_order() == {**{o: 0 for o in range(8)}, 8: 1}
    assert buddy.largest_free_bytes() == buddy.free_bytes == 1 << 20
    assert buddy.check() == []


def test_power_of_two_request_splits_down() -> None:
    buddy = Buddy(1 << 20)
    offset = buddy.alloc(PAGE)
    assert offset == 0
    # one free buddy left at every order below the top
    assert buddy.free_blocks_by_order() == {**{o: 1 for o in range(8)}, 8: 0}
    assert buddy.used_bytes == PAGE


def test_exact_fit_five_pages_uses_five_pages() -> None:
    buddy = Buddy(64 * PAGE)
    offset = buddy.alloc(5 * PAGE)
    assert offset == 0
    assert buddy.used_bytes == 5 * PAGE
    assert buddy.free_bytes == 59 * PAGE
    # the 8-page block's tail (3 pages) comes back as a 1-page and a 2-page buddy
    assert buddy.free_blocks_by_order() == {0: 1, 1: 1, 2: 0, 3: 1, 4: 1, 5: 1, 6: 0}
    assert buddy.check() == []


def test_exact_fit_wastes_less_than_one_min_block() -> None:
    buddy = Buddy(1 << 24)
    for size in (1, 4095, 4097, 3 * PAGE + 1, 100_000, (1 << 20) + 1):
        offset = buddy.alloc(size)
        assert offset is not None
        carved = buddy.allocation_bytes(offset)
        assert carved is not None and size <= carved < size + PAGE


def test_free_coalesces_to_one_block() -> None:
    buddy = Buddy(1 << 20)
    offsets = [buddy.alloc(size) for size in (PAGE, 3 * PAGE, 5 * PAGE, 17 * PAGE)]
    for offset in reversed(offsets):
        buddy.free(offset)  # type: ignore[arg-type]
    assert buddy.free_blocks_by_order()[buddy.max_order] == 1
    assert buddy.free_bytes == 1 << 20 and buddy.check() == []


def test_free_returns_carved_bytes() -> None:
    buddy = Buddy(1 << 20)
    offset = buddy.alloc(5000)
    assert buddy.free(offset) == 2 * PAGE  # type: ignore[arg-type]


def test_non_power_of_two_arena() -> None:
    buddy = Buddy(6 * PAGE)
    assert buddy.free_blocks_by_order() == {0: 0, 1: 1, 2: 1}
    assert buddy.alloc(5 * PAGE) is None  # no single buddy block holds 5 pages
    offsets = [buddy.alloc(PAGE) for _ in range(6)]
    assert sorted(offsets) == [i * PAGE for i in range(6)]  # type: ignore[type-var]
    assert buddy.alloc(1) is None
    for offset in offsets:
        buddy.free(offset)  # type: ignore[arg-type]
    assert buddy.free_blocks_by_order() == {0: 0, 1: 1, 2: 1}
    assert buddy.check() == []


def test_alloc_returns_none_when_full() -> None:
    buddy = Buddy(4 * PAGE)
    assert buddy.alloc(4 * PAGE) == 0
    assert buddy.alloc(1) is None
    assert buddy.largest_free_bytes() == 0


def test_free_unknown_offset_raises_and_changes_nothing() -> None:
    buddy = Buddy(1 << 20)
    buddy.alloc(PAGE)
    before = (buddy.free_blocks_by_order(), buddy.used_bytes)
    with pytest.raises(ValueError, match="no allocation starts"):
        buddy.free(12345)
    assert (buddy.free_blocks_by_order(), buddy.used_bytes) == before


def test_mid_allocation_offset_refused() -> None:
    buddy = Buddy(1 << 20)
    offset = buddy.alloc(8 * PAGE)
    with pytest.raises(ValueError):
        buddy.free(offset + PAGE)  # type: ignore[operator]
    assert buddy.check() == []


def test_double_free_refused() -> None:
    buddy = Buddy(1 << 20)
    offset = buddy.alloc(PAGE)
    buddy.free(offset)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        buddy.free(offset)  # type: ignore[arg-type]
    assert buddy.check() == []


def test_min_block_64_bytes() -> None:
    buddy = Buddy(1 << 16, min_block_bytes=64)
    offsets = [buddy.alloc(size) for size in (1, 64, 65, 200)]
    assert [buddy.allocation_bytes(o) for o in offsets] == [64, 64, 128, 256]  # type: ignore[arg-type]
    assert all(o % 64 == 0 for o in offsets)  # type: ignore[operator]
    assert buddy.check() == []


@pytest.mark.parametrize(
    ("size", "min_block"), [(1 << 20, 32), (1 << 20, 3000), (1000, 4096), (0, 4096), (-4096, 4096)]
)
def test_invalid_geometry(size: int, min_block: int) -> None:
    with pytest.raises(ValueError):
        Buddy(size, min_block)


@pytest.mark.parametrize("size", [0, -1, 1.5, "4096", None])
def test_invalid_sizes(size: object) -> None:
    with pytest.raises(ValueError):
        Buddy(1 << 20).alloc(size)  # type: ignore[arg-type]


def test_largest_free_bytes() -> None:
    buddy = Buddy(1 << 20)
    buddy.alloc(PAGE)
    assert buddy.largest_free_bytes() == 1 << 19


def test_fragmentation_index_full_vs_fragmented() -> None:
    fragmented = Buddy(64 * PAGE)
    offsets = [fragmented.alloc(PAGE) for _ in range(64)]
    for offset in offsets[::2]:
        fragmented.free(offset)  # type: ignore[arg-type]
    # half the arena is free, but only in single pages
    frag = fragmented.fragmentation_index(16 * PAGE)
    assert frag is not None and frag > 0.9

    full = Buddy(64 * PAGE)
    full.alloc(63 * PAGE)  # one page left
    index = full.fragmentation_index(2 * PAGE)
    assert index is not None and index < 0.1
    assert full.fragmentation_index(PAGE) is None  # would succeed


def test_check_detects_corruption() -> None:
    buddy = Buddy(1 << 20)
    offset = buddy.alloc(PAGE)
    assert buddy.check() == []
    buddy.free_sets[0].add(offset >> 12)  # a free block on top of a live one
    problems = buddy.check()
    assert any("overlaps" in p for p in problems)
    assert any("free" in p and "used" in p for p in problems)


def test_check_detects_unmerged_buddies() -> None:
    buddy = Buddy(2 * PAGE)
    buddy.free_sets[1].clear()
    buddy.free_sets[0].update({0, 1})
    assert any("not merged" in p for p in buddy.check())


def test_random_run_of_100_000_operations_ends_clean() -> None:
    rng = random.Random(2026)
    buddy = Buddy(256 << 20)
    live: list[int] = []
    failures = 0
    for _ in range(100_000):
        if live and rng.random() < 0.45:
            buddy.free(live.pop(rng.randrange(len(live))))
            continue
        size = int(2 ** rng.uniform(0, 22))  # 1 byte .. 4 MiB, log-uniform
        offset = buddy.alloc(size)
        if offset is None:
            failures += 1
            buddy.free(live.pop(rng.randrange(len(live))))
        else:
            live.append(offset)
    assert buddy.check() == []
    assert buddy.used_bytes == sum(buddy.allocation_bytes(o) for o in live)  # type: ignore[misc]
    for offset in live:
        buddy.free(offset)
    assert buddy.check() == []
    assert buddy.free_blocks_by_order() == {
        **{o: 0 for o in range(buddy.max_order)},
        buddy.max_order: 1,
    }
