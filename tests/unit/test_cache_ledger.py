"""The daemon's side of client caches, through the pure service: fills,
batched hand-outs, notices, and the races between a cache's report and other
processes' use of its handles."""

from __future__ import annotations

import pytest

from shmarena.client.cache import size_class, split_events
from shmarena.protocol import (
    ASSIGN,
    DRAIN,
    FREE_EVENT,
    GEN_SHIFT,
    LATE_ERR,
    UNASSIGN,
    Op,
    decode,
    encode,
)
from tests.unit.test_service import EPOCH, MIN, Peer, make_service


def gen(peer: Peer, n: int) -> int:
    return (peer.session << GEN_SHIFT) + n


def post(peer: Peer, *events: int) -> list | None:
    """Send a POST; the late error reply, or None when it was accepted."""
    peer.rid += 1
    frame = peer.service.handle(peer.ident, encode([int(Op.POST), peer.rid, list(events)]), 0.0)
    return decode(frame) if frame else None


def stats(service) -> dict:
    return service.stats(0.0)


def filled(peer: Peer, cls: int = MIN, count: int = 4) -> list[int]:
    taken, direct, notices = peer.ok(Op.FILL, [cls, count, count], gen(peer, 1))
    assert direct == [] and notices == []
    return taken[0]


def test_fill_holds_blocks_as_cached_not_used() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    offsets = filled(peer, MIN, 4)
    assert len(set(offsets)) == 4
    s = stats(service)
    assert s["used_bytes"] == 0 and s["cached_bytes"] == 4 * MIN and s["cached_blocks"] == 4
    assert s["free_bytes"] + s["cached_bytes"] == s["size_bytes"]
    assert service.check() == []


def test_assign_and_unassign_move_bytes_between_cached_and_used() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    offset = filled(peer)[0]
    assert post(peer, ASSIGN, offset, 100, gen(peer, 2), 0) is None
    s = stats(service)
    assert s["used_bytes"] == MIN and s["requested_bytes"] == 100 and s["cached_bytes"] == 3 * MIN
    owners = peer.ok(Op.OWNERS)[0]
    assert [(o["name"], o["blocks"]) for o in owners] == [(f"session-{peer.session}", 1)]
    assert post(peer, UNASSIGN, offset, gen(peer, 2)) is None
    assert stats(service)["cached_bytes"] == 4 * MIN and stats(service)["used_bytes"] == 0
    assert service.check() == []


def test_assign_to_a_named_session_owner_and_recycle_returns_to_the_cache() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    offsets = filled(peer)
    owner_id = peer.ok(Op.OWNER, "batch", False)[0]["id"]
    assert owner_id > 0
    assert (
        post(
            peer,
            ASSIGN,
            offsets[0],
            10,
            gen(peer, 2),
            owner_id,
            ASSIGN,
            offsets[1],
            20,
            gen(peer, 3),
            owner_id,
        )
        is None
    )
    (freed, notices) = peer.ok(Op.RECYCLE, "batch")
    assert freed == [2, 2 * MIN]
    # Both came back to this session's cache, and the reply says which.
    assert sorted(zip(notices[::2], notices[1::2], strict=True)) == sorted(
        [(offsets[0], gen(peer, 2)), (offsets[1], gen(peer, 3))]
    )
    assert stats(service)["cached_bytes"] == 4 * MIN
    assert service.check() == []


def test_a_handle_that_arrives_before_its_report_is_honoured() -> None:
    """Process A's cache hands out a block and A sends the handle to B; B's
    free reaches the daemon before A's report. The free works, the block goes
    back to A's cache, and A's late report changes nothing."""
    service = make_service()
    a, b = Peer(service, b"a"), Peer(service, b"b")
    offset = filled(a)[0]
    handle = [EPOCH, 0, offset, 300, gen(a, 7)]
    assert b.ok(Op.FREE, [handle]) == [[1, MIN]]
    assert stats(service)["used_bytes"] == 0
    assert post(a, ASSIGN, offset, 300, gen(a, 7), 0) is None  # the late report
    assert stats(service)["used_bytes"] == 0 and stats(service)["cached_bytes"] == 4 * MIN
    assert a.ok(Op.SYNC) == [[offset, gen(a, 7)], 0]  # A learns the block is back
    # A second free of the same handle is a double free.
    code, message = b.err(Op.FREE, [handle])
    assert code == "stale_handle"
    assert service.check() == []


def test_a_retain_before_the_report_keeps_the_block_until_released() -> None:
    service = make_service()
    a, b = Peer(service, b"a"), Peer(service, b"b")
    offset = filled(a)[0]
    handle = [EPOCH, 0, offset, 300, gen(a, 7)]
    assert b.ok(Op.RETAIN, [handle]) == [1]
    assert post(a, ASSIGN, offset, 300, gen(a, 7), 0, FREE_EVENT, *handle) is None
    s = stats(service)
    assert s["retained_only_bytes"] == MIN and s["cached_bytes"] == 3 * MIN
    assert a.ok(Op.SYNC) == [[], 0]  # not back yet: B holds it
    b.ok(Op.RELEASE, [handle])
    assert a.ok(Op.SYNC) == [[offset, gen(a, 7)], 0]
    assert stats(service)["cached_bytes"] == 4 * MIN
    assert service.check() == []


def test_generations_from_another_space_or_older_are_refused() -> None:
    service = make_service()
    a, b = Peer(service, b"a"), Peer(service, b"b")
    offset = filled(a)[0]
    # B cannot claim A's cached block, and A cannot reuse the fill's own mark.
    assert post(b, ASSIGN, offset, 100, gen(b, 5), 0)[0] == LATE_ERR
    code, _ = b.err(Op.FREE, [[EPOCH, 0, offset, 100, gen(b, 5)]])
    assert code == "stale_handle"
    post(a, ASSIGN, offset, 100, gen(a, 1), 0)  # not newer than the fill: ignored
    assert stats(service)["used_bytes"] == 0
    assert service.check() == []


def test_a_malformed_post_changes_nothing_and_is_a_late_error() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    offset = filled(peer)[0]
    before = stats(service)
    for events in ([ASSIGN, offset, 100], [99, 1, 2], [UNASSIGN], [ASSIGN, offset, 1, 2, 3, "x"]):
        peer.rid += 1
        reply = decode(service.handle(b"a", encode([int(Op.POST), peer.rid, events]), 0.0))
        assert reply[0] == LATE_ERR
    assert stats(service)["used_bytes"] == before["used_bytes"]
    assert stats(service)["cached_bytes"] == before["cached_bytes"]
    assert service.check() == []


def test_drain_and_session_end_give_cached_blocks_back() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    offsets = filled(peer, 2 * MIN, 3)
    assert post(peer, DRAIN, offsets[0]) is None
    assert stats(service)["cached_bytes"] == 4 * MIN
    post(peer, ASSIGN, offsets[1], 5000, gen(peer, 2), 0)
    service.reclaim(peer.session)
    s = stats(service)
    assert s["cached_bytes"] == 0 and s["used_bytes"] == 0 and s["free_bytes"] == s["size_bytes"]
    assert service.check() == []


def test_fill_is_all_or_none_for_what_is_needed() -> None:
    service = make_service(size=64 * MIN)
    peer = Peer(service, b"a")
    code, _ = peer.err(Op.FILL, [MIN, 10, 10, 32 * MIN, 2, 2], gen(peer, 1))
    assert code == "out_of_memory"
    assert stats(service)["free_bytes"] == 64 * MIN
    # What is only wanted is taken if it fits, while a quarter of the arena stays free.
    taken, _, _ = peer.ok(Op.FILL, [8 * MIN, 8, 1], gen(peer, 1))
    assert len(taken[0]) == 6  # 48 of 64 units: 16 stay free
    taken, _, _ = peer.ok(Op.FILL, [8 * MIN, 3, 1], gen(peer, 1))
    assert len(taken[0]) == 1  # the arena fills up: only what is needed
    code, _ = peer.err(Op.FILL, [MIN, 1, 1], 5)  # a mark outside the session's space
    assert code == "invalid_request"
    assert service.check() == []


@pytest.mark.parametrize("min_block", [64, 4096])
def test_size_classes_waste_at_most_an_eighth_beyond_page_rounding(min_block: int) -> None:
    for size in range(1, 1 << 20, 97):
        cls = size_class(size, min_block)
        page = -(-size // min_block) * min_block
        assert cls % min_block == 0 and cls >= size
        assert cls == page or (cls - size) * 8 < size


def test_split_events_keeps_events_whole() -> None:
    flat = [ASSIGN, 1, 2, 3, 4, UNASSIGN, 5, 6, FREE_EVENT, 1, 2, 3, 4, 5, DRAIN, 9] * 100
    chunks = split_events(flat, limit=20)
    assert sum(chunks, []) == flat
    assert all(len(c) <= 20 for c in chunks)
    for chunk in chunks:
        assert chunk[0] in (ASSIGN, UNASSIGN, FREE_EVENT, DRAIN)


def test_a_handle_of_a_newer_hand_out_overtakes_the_report_of_the_return() -> None:
    """The cache reported a hand-out (g2), took the block back and handed it out
    again (g3); both reports are on the way when another process retains g3."""
    service = make_service()
    writer, reader = Peer(service, b"w"), Peer(service, b"r")
    offset = filled(writer)[0]
    assert post(writer, ASSIGN, offset, 100, gen(writer, 2), 0) is None
    handle = [EPOCH, 0, offset, 100, gen(writer, 3)]
    assert reader.ok(Op.RETAIN, [handle]) == [1]
    assert stats(service)["requested_bytes"] == 100
    # The reports arrive: nothing is refused, and the accounting is right.
    assert (
        post(writer, UNASSIGN, offset, gen(writer, 2), ASSIGN, offset, 100, gen(writer, 3), 0)
        is None
    )
    s = stats(service)
    assert s["requested_bytes"] == 100 and s["used_bytes"] == MIN
    # An older generation is still refused.
    stale = [EPOCH, 0, offset, 100, gen(writer, 2)]
    assert reader.err(Op.RETAIN, [stale])[0] == "stale_handle"
    assert reader.ok(Op.RELEASE, [handle]) == [1]
    assert writer.ok(Op.FREE, [handle]) == [[1, MIN]]
    assert stats(service)["requested_bytes"] == 0
    assert service.check() == []
