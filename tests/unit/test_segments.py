"""Growth by segments, pure: the growth policy (`plan_growth`), the several-
segment allocator (`Segmented`) over both allocators, and the ledger's growth
and trimming as the service's requests drive them (frames in, frames out; the
server's part, making a segment's memory, is a recording callable here)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from shmarena.daemon.ledger import Growth
from shmarena.daemon.service import ArenaInfo, Service
from shmarena.protocol import GEN_SHIFT, OK, Op
from shmarena.shm.buddy import Buddy
from shmarena.shm.extents import Extents
from shmarena.shm.segments import (
    MAX_SEGMENT_INDEX,
    OFFSET_MASK,
    SEGMENT_SHIFT,
    SEGMENT_SPAN,
    Segmented,
    address,
    plan_growth,
    split,
)
from shmarena.shm.space import Space
from tests.unit.test_service import EPOCH, MIN, Peer

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

KINDS: list[type[Space]] = [Extents, Buddy]


# -- addresses -----------------------------------------------------------------


def test_address_and_split_are_inverse_and_segment_zero_is_plain_offsets() -> None:
    """An address is segment << 40 | offset, split takes it apart again, and
    segment 0's addresses are its offsets (an arena that never grows keeps
    the numbers it always had)."""
    assert SEGMENT_SPAN == 1 << 40 and OFFSET_MASK == SEGMENT_SPAN - 1
    assert address(0, 0x5000) == 0x5000
    assert split(0x5000) == (0, 0x5000)
    assert address(3, 0x1000) == (3 << 40) | 0x1000
    for segment, offset in [(1, 0), (7, OFFSET_MASK), (MAX_SEGMENT_INDEX, 123 * 4096)]:
        assert split(address(segment, offset)) == (segment, offset)
    assert address(MAX_SEGMENT_INDEX, OFFSET_MASK) < 1 << 62


# -- plan_growth -----------------------------------------------------------------


def test_plan_growth_doubles_the_arena() -> None:
    """A small request in a 64 MiB arena adds another 64 MiB: the arena doubles."""
    assert plan_growth(64 * MiB, 1 * MiB, 4 * GiB, 4096) == 64 * MiB


def test_plan_growth_doubles_until_the_request_fits() -> None:
    """A request larger than the arena gets the first doubling that holds it
    (64 -> 128 -> 256 MiB for 200 MiB), not just the arena's size."""
    assert plan_growth(64 * MiB, 200 * MiB, 4 * GiB, 4096) == 256 * MiB
    assert plan_growth(64 * MiB, 64 * MiB + 4096, 4 * GiB, 4096) == 128 * MiB


def test_plan_growth_stops_at_the_cap() -> None:
    """Near the cap the segment is what is left (960 MiB of 1 GiB: 64 MiB), and
    a request that does not fit what is left gets None, not an oversize segment."""
    assert plan_growth(960 * MiB, 1 * MiB, GiB, 4096) == 64 * MiB
    assert plan_growth(960 * MiB, 64 * MiB, GiB, 4096) == 64 * MiB
    assert plan_growth(960 * MiB, 100 * MiB, GiB, 4096) is None
    assert plan_growth(GiB, 4096, GiB, 4096) is None  # at the cap: nothing left


def test_plan_growth_rounds_to_whole_granules() -> None:
    """Segments are whole granules: a 3 MiB arena grows by 4 MiB with 2 MiB
    granules, and the room under the cap counts only whole granules (5 MiB of
    room is 4 MiB of 2 MiB granules, too little for 5 MiB)."""
    assert plan_growth(3 * MiB, 1 * MiB, GiB, 2 * MiB) == 4 * MiB
    assert plan_growth(2 * MiB, 5 * MiB, GiB, 2 * MiB) == 8 * MiB
    assert plan_growth(1 * MiB, 5 * MiB, 6 * MiB, 2 * MiB) is None
    assert plan_growth(1 * MiB, 3 * MiB, 6 * MiB, 2 * MiB) == 4 * MiB
    for current, need, cap, granule in [(3 * MiB, 7 * MiB, GiB, 2 * MiB), (5000, 1, GiB, 4096)]:
        planned = plan_growth(current, need, cap, granule)
        assert planned is not None and planned % granule == 0 and planned >= need


def test_plan_growth_from_an_empty_arena() -> None:
    """With nothing in the arena yet the doubling starts from one granule, and
    with no room at all there is no segment."""
    assert plan_growth(0, 1, GiB, 4096) == 4096
    assert plan_growth(0, 5000, GiB, 4096) == 8192
    assert plan_growth(0, 3 * MiB, GiB, 4096) == 4 * MiB
    assert plan_growth(0, 1, 0, 4096) is None
    assert plan_growth(0, 8192, 4096, 4096) is None


# -- Segmented -------------------------------------------------------------------


def segmented(kind: type[Space], first: int, *added: int) -> Segmented:
    """A Segmented of `kind` with segment 0 of `first` bytes and segments
    1, 2, ... of the `added` sizes."""
    space = Segmented(kind(first, MIN), lambda size: kind(size, MIN))
    for index, size in enumerate(added, start=1):
        space.add(index, size)
    return space


def need_for(kind: type[Space], part: Space, size: int) -> int:
    """The largest free block a segment must have to take `size`."""
    return part.room_for(size) if kind is Buddy else part.carved_bytes(size)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_alloc_takes_the_lowest_segment_that_fits(kind: type[Space]) -> None:
    """Requests go to segment 0 until it cannot take them, then to the next
    segment that can; addresses carry the segment in bits 40 and up; a freed
    hole in a lower segment is used before any higher segment."""
    space = segmented(kind, 64 * KiB, 128 * KiB, 256 * KiB)
    assert space.alloc(64 * KiB) == 0
    assert space.alloc(64 * KiB) == address(1, 0)
    assert space.alloc(128 * KiB) == address(2, 0)  # segment 1 has only 64 KiB left
    assert space.alloc(64 * KiB) == address(1, 64 * KiB)
    assert space.alloc(256 * KiB) is None  # no segment has 256 KiB free in one piece
    assert space.free(address(1, 0)) == 64 * KiB
    assert space.alloc(32 * KiB) == address(1, 0)
    assert space.alloc(8 * KiB) == address(1, 32 * KiB)
    assert space.check() == []


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_figures_are_sums_and_maxima_over_segments(kind: type[Space]) -> None:
    """size, used and free bytes, the live table, the count of allocations and
    the free blocks by order are sums over the segments; the largest free
    block and max order are the largest of any segment."""
    space = segmented(kind, 64 * KiB, 256 * KiB, 128 * KiB)
    a = space.alloc(40 * KiB)
    b = space.alloc(100 * KiB)
    c = space.alloc(4 * KiB)
    assert a is not None and b is not None and c is not None
    parts = space.spaces
    assert space.sizes() == {0: 64 * KiB, 1: 256 * KiB, 2: 128 * KiB}
    assert space.size_bytes == 448 * KiB
    assert space.used_bytes == sum(p.used_bytes for p in parts.values()) == 144 * KiB
    assert space.free_bytes == sum(p.free_bytes for p in parts.values()) == 304 * KiB
    assert space.used_units == space.used_bytes // MIN
    assert len(space) == 3
    assert space.live == {a: 10, b: 25, c: 1}
    assert dict(space.allocations()) == {a: 40 * KiB, b: 100 * KiB, c: 4 * KiB}
    assert space.allocation_bytes(b) == 100 * KiB
    assert space.allocation_bytes(address(9, 0)) is None  # no segment 9
    assert space.largest_free_bytes() == max(p.largest_free_bytes() for p in parts.values())
    assert space.max_order == max(p.max_order for p in parts.values())
    expected = dict.fromkeys(range(space.max_order + 1), 0)
    for part in parts.values():
        for order, count in part.free_blocks_by_order().items():
            expected[order] += count
    assert space.free_blocks_by_order() == expected


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_fragmentation_index_is_none_while_some_segment_can_take_the_request(
    kind: type[Space],
) -> None:
    """The arena-wide fragmentation index answers None (the request would
    succeed) when any one segment holds a free block large enough, even if
    segment 0 is full, and a number once no segment does."""
    space = segmented(kind, 64 * KiB, 64 * KiB)
    assert space.alloc(64 * KiB) == 0
    assert space.fragmentation_index(32 * KiB) is None
    assert space.alloc(64 * KiB) == address(1, 0)
    index = space.fragmentation_index(MIN)
    assert index is not None and 0.0 <= index <= 1.0


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_free_of_an_unknown_address_is_refused_without_change(kind: type[Space]) -> None:
    """Freeing an address that is not the start of a live allocation (in a
    segment that exists or not) raises ValueError and changes nothing."""
    space = segmented(kind, 64 * KiB, 64 * KiB)
    space.alloc(64 * KiB)
    held = space.alloc(8 * KiB)
    assert held == address(1, 0)
    before = dict(space.allocations())
    for wrong in [address(1, MIN), address(2, 0), address(5, 0), address(1, 32 * KiB)]:
        with pytest.raises(ValueError):
            space.free(wrong)
    assert dict(space.allocations()) == before and space.check() == []
    assert space.free(held) == 8 * KiB


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_remove_only_empty_added_segments(kind: type[Space]) -> None:
    """remove() refuses segment 0, a segment holding anything and a segment
    that is not there; an empty added segment goes, and its figures with it."""
    space = segmented(kind, 64 * KiB, 64 * KiB, 128 * KiB)
    space.alloc(64 * KiB)
    held = space.alloc(MIN)
    assert held == address(1, 0)
    space.free(0)  # segment 0 is empty now, and still cannot go
    for index in [0, 1, 3]:
        with pytest.raises(ValueError):
            space.remove(index)
    assert space.sizes() == {0: 64 * KiB, 1: 64 * KiB, 2: 128 * KiB}
    space.remove(2)
    assert space.sizes() == {0: 64 * KiB, 1: 64 * KiB}
    assert space.size_bytes == 128 * KiB and space.free_bytes == 128 * KiB - MIN
    space.free(held)
    space.remove(1)
    assert space.sizes() == {0: 64 * KiB} and space.check() == []
    assert space.alloc(128 * KiB) is None  # the removed segments no longer serve


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_add_never_reuses_an_index(kind: type[Space]) -> None:
    """Indices only go up: add() refuses an index in use, one below the next
    index (even of a removed segment) and one past the largest; a gap is fine."""
    space = segmented(kind, 64 * KiB, 64 * KiB)
    assert space.next_index == 2
    space.remove(1)
    for index in [0, 1]:
        with pytest.raises(ValueError):
            space.add(index, 64 * KiB)
    with pytest.raises(ValueError):
        space.add(MAX_SEGMENT_INDEX + 1, 64 * KiB)
    assert space.sizes() == {0: 64 * KiB} and space.next_index == 2
    space.add(5, 128 * KiB)
    assert space.next_index == 6
    with pytest.raises(ValueError):
        space.add(5, 64 * KiB)
    with pytest.raises(ValueError):
        space.add(4, 64 * KiB)
    assert space.alloc(100 * KiB) == address(5, 0)


def assert_no_overlap(space: Segmented) -> None:
    """No two live allocations of one segment share a byte, and each lies in
    its segment."""
    by_segment: dict[int, list[tuple[int, int]]] = {}
    for addr, carved in space.allocations():
        segment, offset = split(addr)
        by_segment.setdefault(segment, []).append((offset, carved))
    for segment, spans in by_segment.items():
        size = space.spaces[segment].size_bytes
        spans.sort()
        for (a, a_len), (b, _) in zip(spans, spans[1:], strict=False):
            assert a + a_len <= b, f"segment {segment}: {a:#x}+{a_len} overlaps {b:#x}"
        last, last_len = spans[-1]
        assert last + last_len <= size


def churn(space: Segmented, kind: type[Space], rng: random.Random, steps: int) -> dict[int, int]:
    """Random allocs and frees; checks at every alloc that it went to the
    lowest segment able to take it (or failed when none could). The live
    allocations as address -> carved bytes."""
    live: dict[int, int] = {}
    for step in range(steps):
        if live and rng.random() < 0.45:
            victim = rng.choice(list(live))
            assert space.free(victim) == live.pop(victim)
        else:
            size = int(2 ** rng.uniform(8, 17.5))  # 256 B .. ~180 KiB, log-uniform
            able = [
                index
                for index, part in space.spaces.items()
                if part.largest_free_bytes() >= need_for(kind, part, size)
            ]
            addr = space.alloc(size)
            if addr is None:
                assert able == []
            else:
                assert split(addr)[0] == able[0]
                assert addr not in live
                carved = space.allocation_bytes(addr)
                assert carved is not None and carved >= size
                live[addr] = carved
        if step % 500 == 0:
            assert space.check() == []
    return live


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_random_alloc_free_keeps_every_segment_healthy(kind: type[Space]) -> None:
    """Thousands of seeded random allocs and frees over four segments of
    different sizes: each alloc lands in the lowest segment that can hold it,
    every check() is clean, the table matches the model, nothing overlaps."""
    rng = random.Random(20240611)
    space = segmented(kind, 256 * KiB, 512 * KiB, 1 * MiB, 768 * KiB)
    live = churn(space, kind, rng, 4000)
    assert space.check() == []
    assert dict(space.allocations()) == live
    assert space.used_bytes == sum(live.values())
    assert space.free_bytes == space.size_bytes - space.used_bytes
    assert {split(a)[0] for a in live} <= set(space.spaces)
    assert_no_overlap(space)
    for addr in list(live):
        space.free(addr)
    assert space.used_bytes == 0 and space.check() == []
    assert space.largest_free_bytes() == 1 * MiB


def copy_layout(space: Segmented, kind: type[Space]) -> Segmented:
    """An empty Segmented with the same segments (indices and sizes)."""
    sizes = space.sizes()
    fresh = Segmented(kind(sizes.pop(0), MIN), lambda size: kind(size, MIN))
    for index, size in sizes.items():
        fresh.add(index, size)
    return fresh


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_restore_round_trips_the_allocations(kind: type[Space]) -> None:
    """restore(allocations()) into an empty arena of the same segments gives
    the same allocations, a clean check and the same figures; allocating and
    freeing afterwards works as in the original."""
    rng = random.Random(7)
    space = segmented(kind, 256 * KiB, 512 * KiB, 1 * MiB)
    space.remove(2)
    space.add(4, 512 * KiB)  # a gap in the indices
    churn(space, kind, rng, 1500)
    saved = list(space.allocations())
    fresh = copy_layout(space, kind)
    fresh.restore(saved)
    assert sorted(fresh.allocations()) == sorted(saved)
    assert fresh.check() == []
    assert (fresh.used_bytes, fresh.free_bytes) == (space.used_bytes, space.free_bytes)
    assert fresh.live == space.live
    churn(fresh, kind, rng, 500)
    assert fresh.check() == []
    space.restore(saved)  # into itself: the same state again
    assert sorted(space.allocations()) == sorted(saved) and space.check() == []


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_restore_refuses_bad_input_without_any_change(kind: type[Space]) -> None:
    """restore() refuses an address in an absent segment, and an overlap in
    one segment, before it changes any segment: the state stays as it was."""
    space = segmented(kind, 64 * KiB, 64 * KiB, 64 * KiB)
    kept = [space.alloc(16 * KiB), space.alloc(64 * KiB), space.alloc(48 * KiB)]
    assert None not in kept
    before = sorted(space.allocations())
    good = [(address(0, 0), 8 * KiB), (address(1, 0), 8 * KiB)]
    bad_inputs = [
        [*good, (address(3, 0), 8 * KiB)],  # no segment 3
        [*good, (address(2, 0), 8 * KiB), (address(2, 4 * KiB), 8 * KiB)],  # overlap
        [*good, (address(2, 60 * KiB), 8 * KiB)],  # past segment 2's end
    ]
    for bad in bad_inputs:
        with pytest.raises(ValueError):
            space.restore(bad)
        assert sorted(space.allocations()) == before
        assert space.check() == []
    space.restore(good)
    assert sorted(space.allocations()) == good and space.check() == []


# -- the ledger's growth, through the service ------------------------------------------


class Grower:
    """The server's part of growth, as numbers: records each (index, size)
    asked for; says yes (and, as the server does, publishes where the segment
    lives) or no (with a reason, as the server keeps it)."""

    def __init__(self, answer: bool = True) -> None:
        self.answer = answer
        self.calls: list[tuple[int, int]] = []
        self.service: Service | None = None

    def __call__(self, index: int, size_bytes: int) -> bool:
        self.calls.append((index, size_bytes))
        assert self.service is not None
        if not self.answer:
            growth = self.service.ledger.growth
            assert growth is not None
            growth.last_failure = "test refuses: out of hugepages"
            return False
        self.service.segments[index] = {
            "index": index,
            "shm": f"/shmarena-unit-{index}",
            "size": size_bytes,
        }
        return True


def growing(
    size: int = 1 * MiB,
    max_size: int = 16 * MiB,
    allocator: str = "extents",
    idle_s: float = 10.0,
    answer: bool = True,
    granule: int = 4096,
) -> tuple[Service, Grower]:
    info = ArenaInfo(
        "unit", EPOCH, size, MIN, "/shmarena-unit", 1, 0.0,
        allocator=allocator, max_size_bytes=max_size, granule_bytes=granule, idle_s=idle_s,
    )  # fmt: skip
    grower = Grower(answer)
    service = Service(info, watch=lambda sid, pid, ticks: True, grow=grower)
    grower.service = service
    return service, grower


def rows(service: Service) -> list[tuple[int, int, int, int]]:
    """Per segment row of stats: (index, size, used, blocks)."""
    return [
        (r["index"], r["size_bytes"], r["used_bytes"], r["blocks"])
        for r in service.stats(0.0)["segments"]
    ]


def mark(peer: Peer, n: int = 1) -> int:
    return (peer.session << GEN_SHIFT) + n


def test_service_with_max_size_has_a_segmented_space_and_growth() -> None:
    """new_space gives a Segmented space and a Growth with the cap, granule
    (never below the min block) and idle time of the ArenaInfo; without a cap
    above the size, a plain allocator and no growth."""
    service, grower = growing(size=1 * MiB, max_size=16 * MiB, idle_s=7.0, granule=1024)
    space, growth = service.ledger.space, service.ledger.growth
    assert isinstance(space, Segmented) and isinstance(growth, Growth)
    assert isinstance(space.spaces[0], Extents) and space.size_bytes == 1 * MiB
    assert (growth.max_bytes, growth.granule, growth.idle_s) == (16 * MiB, MIN, 7.0)
    assert growth.make is grower
    for max_size in [0, 1 * MiB]:
        info = ArenaInfo("u", EPOCH, 1 * MiB, MIN, "/s", 1, 0.0, max_size_bytes=max_size)
        plain, none = Service.new_space(info)
        assert isinstance(plain, Extents) and none is None


def test_alloc_beyond_the_initial_size_adds_a_segment() -> None:
    """An ALLOC larger than the arena makes the server add segment 1 (the
    doubling that holds it); the handle names segment 1 and an offset below
    2**40; stats, SEGMENTS and check() agree; FREE of that handle works."""
    service, grower = growing()
    peer = Peer(service, b"a")
    (handle,) = peer.ok(Op.ALLOC, 2 * MiB)
    assert grower.calls == [(1, 2 * MiB)]
    epoch, segment, offset, size, _ = handle
    assert (epoch, segment, offset, size) == (EPOCH, 1, 0, 2 * MiB)
    assert offset < 1 << SEGMENT_SHIFT
    stats = service.stats(0.0)
    assert stats["size_bytes"] == 3 * MiB and stats["initial_size_bytes"] == 1 * MiB
    assert stats["max_size_bytes"] == 16 * MiB and stats["used_bytes"] == 2 * MiB
    assert rows(service) == [(0, 1 * MiB, 0, 0), (1, 2 * MiB, 2 * MiB, 1)]
    assert [r["where"] for r in stats["segments"]] == ["/shmarena-unit", "/shmarena-unit-1"]
    assert peer.ok(Op.SEGMENTS) == [list(service.segments.values())]
    assert [s["index"] for s in service.segments.values()] == [0, 1]
    assert service.check() == []
    assert peer.ok(Op.FREE, [handle]) == [[1, 2 * MiB]]
    assert service.stats(0.0)["used_bytes"] == 0 and service.check() == []
    code, _ = peer.err(Op.FREE, [handle])  # a second free is a double free
    assert code == "stale_handle"


def test_handle_naming_an_absent_segment_is_stale_not_a_crash() -> None:
    """A FREE of a handle that names a segment that does not exist gets a
    stale_handle error, not an internal error."""
    service, _ = growing()
    peer = Peer(service, b"a")
    (handle,) = peer.ok(Op.ALLOC, MIN)
    for segment in [1, 5, (1 << 22) - 1]:
        code, message = peer.err(Op.FREE, [[EPOCH, segment, *handle[2:]]])
        assert code == "stale_handle", message
    assert service.stats(0.0)["used_bytes"] == MIN and service.check() == []


def test_segment_zero_fills_before_a_segment_is_added_and_it_doubles() -> None:
    """Small blocks stay in segment 0 while it has room; the first that does
    not fit adds a segment as large as the arena (it doubles), and later
    blocks go there without another growth."""
    service, grower = growing()
    peer = Peer(service, b"a")
    (first,) = peer.ok(Op.ALLOC_MANY, [64 * KiB] * 16)
    assert {h[1] for h in first} == {0} and grower.calls == []
    (next_one,) = peer.ok(Op.ALLOC, 64 * KiB)
    (after,) = peer.ok(Op.ALLOC, 64 * KiB)
    assert grower.calls == [(1, 1 * MiB)]
    assert (next_one[1], next_one[2]) == (1, 0) and (after[1], after[2]) == (1, 64 * KiB)
    peer.ok(Op.FREE, [first[3]])
    (refill,) = peer.ok(Op.ALLOC, 64 * KiB)
    assert (refill[1], refill[2]) == (0, first[3][2])  # a hole in segment 0 comes first
    assert rows(service) == [(0, 1 * MiB, 1 * MiB, 16), (1, 1 * MiB, 128 * KiB, 2)]
    assert service.check() == []


def test_alloc_many_grows_once_for_the_rest_of_the_batch() -> None:
    """An ALLOC_MANY that overflows segment 0 grows once, by enough for all
    the sizes still to come, and every handle is in segment 0 or 1."""
    service, grower = growing()
    peer = Peer(service, b"a")
    (handles,) = peer.ok(Op.ALLOC_MANY, [256 * KiB] * 4 + [512 * KiB] * 3)
    assert grower.calls == [(1, 2 * MiB)]  # 1.5 MiB still to place: 1 -> 2 MiB
    assert [h[1] for h in handles] == [0] * 4 + [1] * 3
    assert all(0 <= h[2] < 1 << SEGMENT_SHIFT for h in handles)
    assert rows(service) == [(0, 1 * MiB, 1 * MiB, 4), (1, 2 * MiB, 1536 * KiB, 3)]
    assert service.check() == []
    assert peer.ok(Op.FREE, handles) == [[7, 2560 * KiB]]
    assert service.check() == []


def test_fill_grows_for_the_needed_blocks_only() -> None:
    """A FILL grows the arena for the blocks it needs (its cached addresses
    then lie in the new segment), but never for the optional extra ones; the
    sizes it allocates directly grow the arena too."""
    service, grower = growing()
    peer = Peer(service, b"a")
    taken, direct, notices = peer.ok(Op.FILL, [64 * KiB, 32, 32], mark(peer))
    assert direct == [] and notices == []
    assert grower.calls == [(1, 1 * MiB)]
    assert [split(a)[0] for a in taken[0]] == [0] * 16 + [1] * 16
    assert service.stats(0.0)["cached_bytes"] == 2 * MiB and service.check() == []
    # Both segments full: count 8, need 0 takes nothing and does not grow.
    taken, direct, _ = peer.ok(Op.FILL, [64 * KiB, 8, 0], mark(peer, 100))
    assert taken == [[]] and direct == [] and len(grower.calls) == 1
    # need 2 of count 8: one growth, and then the extras fill the new segment.
    taken, _, _ = peer.ok(Op.FILL, [64 * KiB, 8, 2], mark(peer, 200))
    assert grower.calls[1] == (2, 2 * MiB)
    assert len(taken[0]) == 8 and {split(a)[0] for a in taken[0]} == {2}
    taken, direct, _ = peer.ok(Op.FILL, [], mark(peer, 300), [3 * MiB])
    assert taken == [] and direct[0][1] == 3 and grower.calls[2] == (3, 4 * MiB)
    assert service.check() == []


def test_refused_growth_is_out_of_memory_naming_the_failure() -> None:
    """When the server cannot make the segment the request fails with
    out_of_memory naming --max-size and why the segment failed; nothing is
    added or left behind, and the index is not used up: the next growth that
    succeeds is segment 1."""
    service, grower = growing(answer=False)
    peer = Peer(service, b"a")
    code, message = peer.err(Op.ALLOC, 2 * MiB, "big", False)
    assert code == "out_of_memory"
    assert "--max-size" in message and "test refuses: out of hugepages" in message
    assert "adding a segment failed" in message
    growth = service.ledger.growth
    assert growth is not None and growth.failures == 1
    assert rows(service) == [(0, 1 * MiB, 0, 0)] and peer.ok(Op.OWNERS) == [[]]
    code, _ = peer.err(Op.ALLOC_MANY, [512 * KiB] * 3)
    assert code == "out_of_memory" and growth.failures == 2
    taken, _, _ = peer.ok(Op.FILL, [256 * KiB, 8, 2], mark(peer))
    assert len(taken[0]) == 3  # what fits while a quarter stays free, no growth needed
    code, _ = peer.err(Op.FILL, [256 * KiB, 8, 2], mark(peer, 50))
    assert code == "out_of_memory"
    assert service.stats(0.0)["cached_bytes"] == 768 * KiB and service.check() == []
    grower.answer = True
    (handle,) = peer.ok(Op.ALLOC, 2 * MiB)
    assert handle[1] == 1 and grower.calls[-1] == (1, 2 * MiB)
    assert service.check() == []


def test_growth_stops_at_max_size() -> None:
    """The arena grows up to --max-size and not past it: the last segment is
    what is left under the cap, and then requests fail with out_of_memory
    naming the size reached and the --max-size."""
    service, grower = growing(size=1 * MiB, max_size=4 * MiB)
    peer = Peer(service, b"a")
    peer.ok(Op.ALLOC, 1 * MiB)
    peer.ok(Op.ALLOC, 2 * MiB)
    code, message = peer.err(Op.ALLOC, 2 * MiB)
    assert code == "out_of_memory"
    assert "grown to 3 MiB of its --max-size 4 MiB" in message
    assert "adding a segment failed" not in message
    (handle,) = peer.ok(Op.ALLOC, 1 * MiB)
    assert handle[1] == 2
    assert grower.calls == [(1, 2 * MiB), (2, 1 * MiB)]
    code, message = peer.err(Op.ALLOC, MIN)
    assert code == "out_of_memory" and "--max-size 4 MiB" in message
    assert service.stats(0.0)["size_bytes"] == 4 * MiB and len(grower.calls) == 2
    assert service.check() == []


def test_without_max_size_the_arena_never_grows() -> None:
    """Without --max-size (or with one no larger than --size) the space is a
    plain allocator, growth is never asked for, and out_of_memory tells to
    start with a larger --size."""
    for max_size in [0, 1 * MiB]:
        service, grower = growing(size=1 * MiB, max_size=max_size)
        assert not isinstance(service.ledger.space, Segmented)
        assert service.ledger.growth is None
        peer = Peer(service, b"a")
        code, message = peer.err(Op.ALLOC, 2 * MiB)
        assert code == "out_of_memory"
        assert "--size" in message and "--max-size" not in message
        assert grower.calls == []
        assert rows(service) == [(0, 1 * MiB, 0, 0)]
        assert service.ledger.trim(1e9) == []


def empty_added_segment(idle_s: float = 10.0) -> tuple[Service, Peer, list[Any]]:
    """A service whose segment 0 is full (held by `keep`) and segment 1 was
    added and is empty again; the held handle."""
    service, _ = growing(idle_s=idle_s)
    peer = Peer(service, b"a")
    (keep,) = peer.ok(Op.ALLOC, 1 * MiB)
    (big,) = peer.ok(Op.ALLOC, 2 * MiB)
    assert big[1] == 1
    peer.ok(Op.FREE, [big])
    return service, peer, keep


def test_trim_releases_a_segment_only_after_it_was_empty_for_idle_s() -> None:
    """An added segment that is empty is released only once it has been seen
    empty for idle_s: not at first sight, not halfway; then it is gone from
    the allocator and the figures, and the next growth takes a new index."""
    service, peer, _ = empty_added_segment(idle_s=10.0)
    ledger = service.ledger
    assert ledger.trim(1000.0) == []
    assert service.stats(0.0)["segments"][1]["empty_since"] == 1000.0
    assert service.stats(0.0)["segments"][0]["empty_since"] is None
    assert ledger.trim(1005.0) == []
    assert ledger.trim(1009.999) == []
    assert ledger.trim(1010.0) == [1]
    assert isinstance(ledger.space, Segmented) and list(ledger.space.spaces) == [0]
    assert ledger.empty_since == {}
    service.segments.pop(1)  # as the server does once it unmapped it
    assert service.stats(0.0)["size_bytes"] == 1 * MiB
    assert rows(service) == [(0, 1 * MiB, 1 * MiB, 1)]
    assert ledger.trim(2000.0) == [] and service.check() == []
    (again,) = peer.ok(Op.ALLOC, MIN)
    assert again[1] == 2  # index 1 is never used again
    assert peer.ok(Op.SEGMENTS) == [list(service.segments.values())]
    assert [s["index"] for s in service.segments.values()] == [0, 2]


def test_a_block_in_the_segment_resets_its_empty_timer() -> None:
    """A segment seen holding a block again starts its idle period anew once
    it is empty again."""
    service, peer, _ = empty_added_segment(idle_s=10.0)
    ledger = service.ledger
    assert ledger.trim(1000.0) == []
    (block,) = peer.ok(Op.ALLOC, MIN)
    assert block[1] == 1
    assert ledger.trim(1005.0) == [] and 1 not in ledger.empty_since
    peer.ok(Op.FREE, [block])
    assert ledger.trim(1010.0) == []  # 10 s after it was first seen empty, but used since
    assert ledger.trim(1019.0) == []
    assert ledger.trim(1020.0) == [1]
    assert service.check() == []


def test_a_segment_used_between_two_trims_is_not_idle() -> None:
    """A block allocated and freed again between two trim calls (the server
    trims once a tick) counts as use: the idle period starts anew."""
    service, peer, _ = empty_added_segment(idle_s=10.0)
    ledger = service.ledger
    assert ledger.trim(1000.0) == []
    (block,) = peer.ok(Op.ALLOC, MIN)
    assert block[1] == 1
    peer.ok(Op.FREE, [block])
    assert ledger.trim(1010.0) == []  # used at about 1009: not empty for 10 s
    assert ledger.trim(1020.0) == [1]


def test_alloc_many_plans_growth_on_carved_bytes() -> None:
    """1024 sizes of 100 bytes take 1024 minimum blocks (4 MiB): one segment
    of 4 MiB, not three steps planned on the bytes asked for."""
    service, grower = growing()
    peer = Peer(service, b"a")
    peer.ok(Op.ALLOC, 1 * MiB)  # segment 0 full
    (handles,) = peer.ok(Op.ALLOC_MANY, [100] * 1024)
    assert grower.calls == [(1, 4 * MiB)]
    assert {h[1] for h in handles} == {1}
    assert service.check() == []


def test_cached_blocks_keep_a_segment() -> None:
    """Blocks sitting in a client cache hold their segment: it is not empty,
    and is not released however long it waits."""
    service, peer, _ = empty_added_segment(idle_s=10.0)
    taken, _, _ = peer.ok(Op.FILL, [64 * KiB, 2, 2], mark(peer))
    assert {split(a)[0] for a in taken[0]} == {1}
    for now in [1000.0, 1010.0, 5000.0]:
        assert service.ledger.trim(now) == []
    assert service.check() == []


def test_idle_zero_never_trims() -> None:
    """With idle_s 0 an empty added segment is kept forever."""
    service, _, _ = empty_added_segment(idle_s=0.0)
    for now in [0.0, 1000.0, 1e12]:
        assert service.ledger.trim(now) == []
    assert len(rows(service)) == 2 and service.ledger.empty_since == {}


def test_random_workload_with_growth_and_trim_keeps_invariants() -> None:
    """Seeded random ALLOC, ALLOC_MANY, FILL, FREE and RECYCLE from two peers
    with growth capped at 8 MiB and trimming as time passes: check() stays
    clean, every handle's segment exists, the arena stays under the cap."""
    rng = random.Random(11)
    service, grower = growing(size=512 * KiB, max_size=8 * MiB, idle_s=5.0)
    peers = [Peer(service, bytes([i])) for i in range(2)]
    live: list[list[int]] = []
    refused = 0
    now = 100.0
    marks = {p.session: 1 for p in peers}
    released: list[int] = []
    for step in range(1500):
        peer = rng.choice(peers)
        action = rng.random()
        if action < 0.3:
            reply = peer.raw(Op.ALLOC, int(2 ** rng.uniform(10, 21)), rng.choice([None, "a"]))
            if reply[0] == OK:
                live.append(reply[2])
            else:
                refused += 1
        elif action < 0.4:
            sizes = [int(2 ** rng.uniform(12, 18)) for _ in range(rng.randint(1, 6))]
            reply = peer.raw(Op.ALLOC_MANY, sizes)
            if reply[0] == OK:
                live.extend(reply[2])
        elif action < 0.45:
            marks[peer.session] += 1000
            peer.raw(Op.FILL, [16 * KiB, 4, rng.randint(0, 4)], mark(peer, marks[peer.session]))
        elif action < 0.85 and live:
            handle = live.pop(rng.randrange(len(live)))
            peer.raw(Op.FREE, [handle])
        elif action < 0.87:
            peer.raw(Op.RECYCLE, "a")  # the handles of "a" in `live` turn stale
        now += rng.uniform(0.0, 0.5)
        for index in service.ledger.trim(now):
            service.segments.pop(index)
            released.append(index)
        if step % 100 == 0:
            assert service.check() == []
            space = service.ledger.space
            assert isinstance(space, Segmented)
            assert space.size_bytes <= 8 * MiB
            assert set(service.segments) == set(space.spaces)
    assert service.check() == []
    indices = [index for index, _ in grower.calls]
    assert indices == sorted(set(indices))  # each index asked for once, going up
    assert released and len(grower.calls) > len(released)  # it grew and shrank
    print(
        f"FIGURE: {len(grower.calls)} segments added, {len(released)} released, "
        f"{refused} allocs refused at the cap"
    )


# -- Buddy growth ---------------------------------------------------------------------


def test_buddy_grows_by_a_power_of_two_that_holds_the_request() -> None:
    """With the buddy allocator a request larger than the arena gets a segment
    with a free block of the power of two above it (Buddy.room_for), so it
    is allocated there at once."""
    service, grower = growing(size=1 * MiB, max_size=64 * MiB, allocator="buddy")
    space = service.ledger.space
    assert isinstance(space, Segmented) and isinstance(space.spaces[0], Buddy)
    peer = Peer(service, b"a")
    (handle,) = peer.ok(Op.ALLOC, 5 * MiB)
    assert grower.calls == [(1, 8 * MiB)]
    assert (handle[1], handle[2]) == (1, 0)
    assert isinstance(space.spaces[1], Buddy)
    assert service.check() == []


def test_buddy_growth_counts_alignment_not_only_bytes() -> None:
    """Buddy: a 3 MiB arena asked for 7 MiB grows by 12 MiB (whose 8 MiB block
    holds it); when the room under the cap holds the bytes but not the power
    of two, no segment is made at all and the request is out_of_memory."""
    service, grower = growing(size=3 * MiB, max_size=64 * MiB, allocator="buddy")
    peer = Peer(service, b"a")
    (handle,) = peer.ok(Op.ALLOC, 7 * MiB)
    assert grower.calls == [(1, 12 * MiB)] and handle[1] == 1
    assert service.check() == []

    service, grower = growing(size=1 * MiB, max_size=4 * MiB, allocator="buddy")
    peer = Peer(service, b"a")
    code, message = peer.err(Op.ALLOC, 2560 * KiB)  # 3 MiB of room, needs a 4 MiB block
    assert code == "out_of_memory" and "--max-size" in message
    assert grower.calls == []
    (handle,) = peer.ok(Op.ALLOC, 2 * MiB)  # a 2 MiB block fits the room: 1 -> 2 MiB
    assert grower.calls == [(1, 2 * MiB)] and handle[1] == 1
    assert service.check() == []


def test_segmented_make_builds_the_same_allocator_kind() -> None:
    """Added segments are of segment 0's allocator and min block."""
    for allocator, kind in [("extents", Extents), ("buddy", Buddy)]:
        service, _ = growing(allocator=allocator)
        peer = Peer(service, b"a")
        peer.ok(Op.ALLOC, 2 * MiB)
        space = service.ledger.space
        assert isinstance(space, Segmented)
        assert all(type(p) is kind and p.min_block_bytes == MIN for p in space.spaces.values())
