"""Pins in the pure core: a block its owner lets go while a process still has
views of it stays out of the arena and out of every cache, counted as pinned,
until that process unpins it or its session ends (PIN / UNPIN events)."""

from __future__ import annotations

from shmarena.daemon.layout import PINNED
from shmarena.protocol import ASSIGN, FREE_EVENT, PIN, UNPIN, Op
from tests.unit.test_cache_ledger import filled, gen, post, stats
from tests.unit.test_service import EPOCH, MIN, Peer, make_service


def sum_holds(s: dict) -> bool:
    return s["size_bytes"] == (
        s["used_bytes"]
        + s["cached_bytes"]
        + s["retained_only_bytes"]
        + s["pinned_bytes"]
        + s["free_bytes"]
    )


def test_a_pinned_daemon_block_stays_out_of_the_arena_until_unpinned() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    (wire,) = peer.ok(Op.ALLOC, 3 * MIN, None, False)
    _, _, offset, size, generation = wire
    free_before = stats(service)["free_bytes"]
    assert post(peer, PIN, offset, generation, FREE_EVENT, *wire) is None
    s = stats(service)
    assert s["used_bytes"] == 0 and s["pinned_bytes"] == 3 * MIN and s["pinned_blocks"] == 1
    assert s["free_bytes"] == free_before and s["live_blocks"] == 0 and sum_holds(s)
    assert service.check() == []
    # Not reused while pinned: a new allocation of the same size lands elsewhere.
    (other,) = peer.ok(Op.ALLOC, 3 * MIN, None, False)
    assert other[2] != offset
    (row,) = peer.ok(Op.CLIENTS)[0]
    assert row["pinned_blocks"] == 1 and row["pinned_bytes"] == 3 * MIN
    assert post(peer, UNPIN, offset, generation) is None
    s = stats(service)
    assert s["pinned_bytes"] == 0 and s["free_bytes"] == free_before and sum_holds(s)
    assert service.check() == []


def test_a_pinned_cache_block_comes_back_to_its_cache_by_a_notice_after_unpin() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    offset = filled(peer)[0]
    handle = [EPOCH, 0, offset, 100, gen(peer, 2)]
    assert post(peer, ASSIGN, offset, 100, gen(peer, 2), 0) is None
    assert post(peer, PIN, offset, gen(peer, 2), FREE_EVENT, *handle) is None
    s = stats(service)
    assert s["pinned_bytes"] == MIN and s["cached_bytes"] == 3 * MIN and sum_holds(s)
    assert peer.ok(Op.SYNC) == [[], 0]  # no notice while pinned
    assert post(peer, UNPIN, offset, gen(peer, 2)) is None
    assert peer.ok(Op.SYNC) == [[offset, gen(peer, 2)], 0]
    assert stats(service)["cached_bytes"] == 4 * MIN and service.check() == []


def test_a_pin_of_a_cached_block_takes_it_out_of_the_cache() -> None:
    """A block recycled through somebody else came back to this cache (a
    notice) while this process still views it: PIN keeps it aside."""
    service = make_service()
    peer = Peer(service, b"a")
    offset = filled(peer)[0]
    owner_id = peer.ok(Op.OWNER, "batch", False)[0]["id"]
    assert post(peer, ASSIGN, offset, 100, gen(peer, 2), owner_id) is None
    _, notices = peer.ok(Op.RECYCLE, "batch")
    assert notices == [offset, gen(peer, 2)]
    assert post(peer, PIN, offset, gen(peer, 2)) is None
    s = stats(service)
    assert s["cached_bytes"] == 3 * MIN and s["pinned_bytes"] == MIN and sum_holds(s)
    assert service.check() == []
    assert post(peer, UNPIN, offset, gen(peer, 2)) is None
    assert peer.ok(Op.SYNC) == [[offset, gen(peer, 2)], 0]
    assert stats(service)["cached_bytes"] == 4 * MIN and service.check() == []


def test_pins_count_and_the_last_unpin_releases() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    (wire,) = peer.ok(Op.ALLOC, MIN, None, False)
    offset, generation = wire[2], wire[4]
    assert post(peer, PIN, offset, generation, PIN, offset, generation, FREE_EVENT, *wire) is None
    assert post(peer, UNPIN, offset, generation) is None
    assert stats(service)["pinned_blocks"] == 1
    assert post(peer, UNPIN, offset, generation) is None
    assert stats(service)["pinned_blocks"] == 0 and service.check() == []


def test_a_retained_and_pinned_block_waits_for_both() -> None:
    service = make_service()
    a, b = Peer(service, b"a"), Peer(service, b"b")
    (wire,) = a.ok(Op.ALLOC, MIN, None, False)
    offset, generation = wire[2], wire[4]
    b.ok(Op.RETAIN, [wire])
    assert post(a, PIN, offset, generation, FREE_EVENT, *wire) is None
    # Retained and pinned: counted once, as retained (the retain keeps it anyway).
    assert stats(service)["pinned_blocks"] == 0 and stats(service)["retained_only_blocks"] == 1
    assert sum_holds(stats(service))
    b.ok(Op.RELEASE, [wire])
    assert stats(service)["pinned_blocks"] == 1 and stats(service)["retained_only_blocks"] == 0
    assert post(a, UNPIN, offset, generation) is None
    s = stats(service)
    assert s["pinned_blocks"] == s["retained_only_blocks"] == s["used_bytes"] == 0
    assert service.check() == []


def test_the_end_of_a_session_drops_its_pins() -> None:
    service = make_service()
    a, b = Peer(service, b"a"), Peer(service, b"b")
    (wire,) = b.ok(Op.ALLOC, MIN, "shared", True)  # detached: outlives b
    offset, generation = wire[2], wire[4]
    cached = filled(a)[0]
    assert post(a, ASSIGN, cached, 10, gen(a, 2), 0) is None
    handle = [EPOCH, 0, cached, 10, gen(a, 2)]
    assert post(a, PIN, offset, generation, PIN, cached, gen(a, 2), FREE_EVENT, *handle) is None
    b.ok(Op.RECYCLE, "shared")
    assert stats(service)["pinned_blocks"] == 2
    a.ok(Op.BYE)
    s = stats(service)
    assert s["pinned_blocks"] == 0 and s["cached_bytes"] == 0 and s["used_bytes"] == 0
    assert s["free_bytes"] == s["size_bytes"] and service.check() == []


def test_stale_pins_and_unmatched_unpins_are_ignored_and_change_nothing() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    (wire,) = peer.ok(Op.ALLOC, MIN, None, False)
    offset, generation = wire[2], wire[4]
    before = stats(service)
    assert post(peer, PIN, offset, generation + 1, UNPIN, offset, generation) is None
    assert post(peer, PIN, offset + 64 * MIN, 1, UNPIN, 12345, 1) is None
    after = stats(service)
    before.pop("counters"), after.pop("counters")  # the posts themselves are counted
    assert after == before
    assert service.check() == []
    # A pin on a live, owned block does nothing until its owner lets go.
    assert post(peer, PIN, offset, generation) is None
    assert stats(service)["used_bytes"] == before["used_bytes"]
    peer.ok(Op.FREE, [wire])
    assert stats(service)["pinned_blocks"] == 1


def test_the_layout_names_a_pinned_block_as_pinned() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    (wire,) = peer.ok(Op.ALLOC, MIN, None, False)
    assert post(peer, PIN, wire[2], wire[4], FREE_EVENT, *wire) is None
    (layout,) = peer.ok(Op.BLOCKS)
    (segment,) = layout["segments"]
    holder = layout["holders"][segment["blocks"][2]]
    assert holder == PINNED
