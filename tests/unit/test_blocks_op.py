"""The BLOCKS request (the arena's layout for `shmarena map`), at the service level."""

from __future__ import annotations

from shmarena.daemon.layout import CACHED, RETAINED
from shmarena.limits import MAX_BLOCKS_REPLY
from shmarena.protocol import GEN_SHIFT, MUTATING_OPS, Op
from tests.unit.test_service import MIN, Peer, make_service


def pairs(flat: list[int], width: int) -> list[tuple[int, ...]]:
    return [tuple(flat[i : i + width]) for i in range(0, len(flat), width)]


def test_blocks_lists_used_and_free_runs_in_address_order() -> None:
    service = make_service(size=16 * MIN)
    peer = Peer(service, b"a")
    handles = [peer.ok(Op.ALLOC, MIN, "batch", False)[0] for _ in range(6)]
    (wide,) = peer.ok(Op.ALLOC, 3 * MIN - 10, "other", False)
    for handle in handles[::2]:
        peer.ok(Op.FREE, [handle])
    (reply,) = peer.ok(Op.BLOCKS)
    assert reply["truncated"] is False and reply["min_block_bytes"] == MIN
    (segment,) = reply["segments"]
    assert segment["index"] == 0 and segment["size_bytes"] == 16 * MIN and segment["complete"]
    holders = reply["holders"]
    used = [(offset, size, holders[i]) for offset, size, i in pairs(segment["blocks"], 3)]
    expected = sorted([(h[2], MIN, "batch") for h in handles[1::2]] + [(wide[2], 3 * MIN, "other")])
    assert used == expected
    free = pairs(segment["free"], 2)
    # used and free tile the segment exactly, without overlap or gap
    spans = sorted([(o, s) for o, s, _ in used] + free)
    position = 0
    for offset, size in spans:
        assert offset == position, spans
        position += size
    assert position == 16 * MIN
    assert sum(size for _, size in free) == service.stats(0.0)["free_bytes"]
    assert all(b > a + s for (a, s), (b, _) in zip(free, free[1:], strict=False))  # coalesced


def test_blocks_names_cached_and_retained_holders() -> None:
    service = make_service(size=16 * MIN)
    peer, reader = Peer(service, b"a"), Peer(service, b"b")
    # one block into the session's cache, one owned and then freed while retained
    (cached,) = peer.ok(Op.FILL, [MIN, 1, 1], (peer.session << GEN_SHIFT) + 1)[0]
    (kept,) = peer.ok(Op.ALLOC, MIN, "w", False)
    assert reader.ok(Op.RETAIN, [kept]) == [1]
    peer.ok(Op.FREE, [kept])  # freed, but the reader still holds it
    (reply,) = peer.ok(Op.BLOCKS)
    holders = reply["holders"]
    found = {off: holders[i] for off, _, i in pairs(reply["segments"][0]["blocks"], 3)}
    assert found == {cached[0]: CACHED, kept[2]: RETAINED}


def test_blocks_is_bounded_and_says_so() -> None:
    service = make_service(size=64 * MIN)
    peer = Peer(service, b"a")
    for _ in range(10):
        peer.ok(Op.ALLOC, MIN)
    (reply,) = peer.ok(Op.BLOCKS, 4)
    assert reply["truncated"] is True
    (segment,) = reply["segments"]
    assert len(segment["blocks"]) == 4 * 3 and not segment["complete"]
    (everything,) = peer.ok(Op.BLOCKS, 10)
    assert everything["truncated"] is False and len(everything["segments"][0]["blocks"]) == 30
    (huge,) = peer.ok(Op.BLOCKS, 1 << 62)  # asking for more than the cap is not an error
    assert huge["truncated"] is False
    code, message = peer.err(Op.BLOCKS, -1)
    assert code == "invalid_request" and "max_blocks" in message
    assert str(MAX_BLOCKS_REPLY) in message


def test_blocks_is_read_only() -> None:
    assert Op.BLOCKS not in MUTATING_OPS
    service = make_service()
    peer = Peer(service, b"a")
    peer.ok(Op.ALLOC, MIN)
    before = service.stats(0.0)
    peer.ok(Op.BLOCKS)
    after = service.stats(0.0)
    assert {k: v for k, v in after.items() if k != "counters"} == {
        k: v for k, v in before.items() if k != "counters"
    }
    assert service.check() == []
