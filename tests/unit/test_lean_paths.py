"""The daemon's fast paths (issue 22, a leaner daemon) decide as the general
paths do: a run of same-size blocks carved from one extent, the one-handle
free, and a client's own owner opened again."""

from __future__ import annotations

import random

import pytest

from shmarena.daemon.records import implicit_owner
from shmarena.errors import AccessDenied, ShmArenaError
from shmarena.protocol import FREE_EVENT, LATE_ERR, Handle, Op, decode, encode
from shmarena.shm.extents import Extents
from tests.unit.test_service import MIN, Peer, make_service, used

KiB = 1024


def post(peer: Peer, events: list[int]) -> bytes:
    frame = encode([int(Op.POST), peer.next_id(Op.POST), events])
    return peer.service.handle(peer.ident, frame, peer.now, peer.creds)


def test_a_run_of_blocks_from_one_extent_keeps_the_bins_exact() -> None:
    # Same-size blocks from one long extent (the tail stays in its bin), then
    # a mix that moves tails across bins, frees in random order between.
    space = Extents(64 << 20, 4 * KiB)
    rng = random.Random(7)
    live: list[int] = []
    for size in [4 * KiB] * 300 + [rng.choice([4, 8, 12, 64, 1024]) * KiB for _ in range(300)]:
        offset = space.alloc(size)
        assert offset is not None
        live.append(offset)
        if rng.random() < 0.3:
            space.free(live.pop(rng.randrange(len(live))))
        assert space.check() == []
    for offset in live:
        space.free(offset)
    assert space.check() == [] and space.used_bytes == 0
    assert space.largest_free_bytes() == 64 << 20


def test_runs_are_carved_in_address_order() -> None:
    space = Extents(1 << 20, 4 * KiB)
    assert [space.alloc(4 * KiB) for _ in range(8)] == [i * 4 * KiB for i in range(8)]


def test_a_free_event_frees_one_block_and_refuses_a_second_time() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    (handle,) = peer.ok(Op.ALLOC, 3 * MIN)
    assert used(service) == 3 * MIN
    assert post(peer, [FREE_EVENT, *handle]) == b""  # one-way: no reply when it went well
    assert used(service) == 0
    reply = decode(post(peer, [FREE_EVENT, *handle]))  # the second one: a late error
    assert reply[0] == LATE_ERR and "free" in reply[3]
    assert service.check() == []


def test_one_handle_free_matches_the_many_handle_free() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    handles = [peer.ok(Op.ALLOC, n * MIN)[0] for n in (1, 2, 3)]
    ledger = service.ledger
    one = ledger.free_one(Handle(*handles[0]), 1.0, peer.session)
    many = ledger.free([Handle(*h) for h in handles[1:]], 1.0, peer.session)
    assert (one.blocks, one.bytes) == (1, MIN)
    assert (many.blocks, many.bytes) == (2, 5 * MIN)
    for free in (
        lambda: ledger.free_one(Handle(*handles[0]), 1.0),
        lambda: ledger.free([Handle(*handles[0])], 1.0),
    ):
        with pytest.raises(ShmArenaError) as caught:
            free()
        assert caught.value.code == "double_free" or "free" in str(caught.value)
    assert service.check() == []


def test_another_users_block_is_not_freed_by_one_handle() -> None:
    service = make_service()
    owner = Peer(service, b"a")
    (handle,) = owner.ok(Op.ALLOC, MIN)
    stranger = Peer(service, b"b", pid=2000)
    session = service.ledger.sessions[stranger.session]
    session.uid, session.admin = 4242, False  # another user, no administrator
    with pytest.raises(AccessDenied):
        service.ledger.free_one(Handle(*handle), 1.0, stranger.session)
    assert used(service) == MIN and service.check() == []


def test_the_sessions_own_owner_is_opened_again_as_it_was() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    ledger = service.ledger
    name = implicit_owner(peer.session)
    first = ledger.open_owner(name, peer.session, False, 1.0)
    assert ledger.open_owner(name, peer.session, False, 2.0) is first
    other = Peer(service, b"b", pid=2000)
    with pytest.raises(ShmArenaError):  # not another session's, as before
        ledger.open_owner(name, other.session, False, 2.0)
