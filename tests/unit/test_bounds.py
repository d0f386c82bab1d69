"""Everything the daemon keeps per client is bounded: owner ids, owners,
names, queues, queued bytes and listing pages, through the pure service."""

from __future__ import annotations

import os

import msgpack

from shmarena.daemon import table
from shmarena.protocol import ASSIGN, Op
from tests.unit.test_cache_ledger import filled, gen, post
from tests.unit.test_service import MIN, Peer, make_service

# How many owners the recycling test opens; the real-daemon test does fewer.
RECYCLED_OWNERS = int(os.environ.get("SHMARENA_TEST_RECYCLED_OWNERS", "100000"))


def test_recycled_owners_leave_the_id_map_at_its_live_size() -> None:
    """The README's `with client.owner(f"batch-{i}")` loop: each batch gets an
    id for cache hand-outs, and a recycled batch's id is forgotten."""
    service = make_service()
    peer = Peer(service, b"a")
    session = service.ledger.sessions[peer.session]
    ids = set()
    for i in range(RECYCLED_OWNERS):
        (row,) = peer.ok(Op.OWNER, f"batch-{i}", False)
        ids.add(row["id"])
        peer.ok(Op.RECYCLE, f"batch-{i}")
    assert len(ids) == RECYCLED_OWNERS  # never reused: a late post cannot mean another
    assert len(session.owner_ids) == 1  # the session's own owner, id 0
    assert service.check() == []


def test_an_owner_id_still_in_use_keeps_its_meaning() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    offsets = filled(peer)
    (first,) = peer.ok(Op.OWNER, "first", False)
    (second,) = peer.ok(Op.OWNER, "second", False)
    peer.ok(Op.RECYCLE, "first")
    assert post(peer, ASSIGN, offsets[0], 10, gen(peer, 2), second["id"]) is None
    owners = {row["name"]: row["blocks"] for row in peer.ok(Op.OWNERS)[0]}
    assert owners["second"] == 1 and "first" not in owners
    # The recycled owner's id is refused, as a late error naming it.
    late = post(peer, ASSIGN, offsets[1], 10, gen(peer, 3), first["id"])
    assert late is not None and f"owner id {first['id']}" in late[3]
    assert service.check() == []


def _rebuilt_session(service, records: list[dict]):
    state = table.State()
    for record in records:
        state.apply(msgpack.unpackb(msgpack.packb(record), strict_map_key=False))
    space = type(service.ledger.space)(service.ledger.space.size_bytes, MIN)
    ledger, _ = table.build(state, "unit", space, 0.0)
    assert ledger.check() == []
    return ledger


def test_the_next_owner_id_survives_a_restart_from_snapshot_and_deltas() -> None:
    """A recycled owner's id is never given again, after a restart too: a post
    the client sends again after the restart cannot name another owner."""
    service = make_service()
    peer = Peer(service, b"a")
    session_id = peer.session
    records = [table.snapshot(service.ledger, service.links(), {})]
    peer.ok(Op.OWNER, "kept", False)
    (gone,) = peer.ok(Op.OWNER, "gone", False)
    peer.ok(Op.RECYCLE, "gone")
    records.append(table.delta(service.ledger, service.link, service.ledger.take_changes()))
    for ledger in (
        _rebuilt_session(service, records),  # from the deltas
        _rebuilt_session(service, [table.snapshot(service.ledger, service.links(), {})]),
    ):
        session = ledger.sessions[session_id]
        assert session.owner_ids == {0: f"session-{session_id}", 1: "kept"}
        assert session.next_owner_id == gone["id"] + 1
        assert ledger.owner_id(session_id, "kept") == 1
        ledger.open_owner("new", session_id, False, 0.0)
        assert ledger.owner_id(session_id, "new") == gone["id"] + 1
