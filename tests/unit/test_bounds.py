"""Everything the daemon keeps per client is bounded: owner ids, owners,
names, queues, queued bytes and listing pages, through the pure service."""

from __future__ import annotations

import os

import msgpack

from shmarena.daemon import table
from shmarena.limits import (
    HANDLE_COST_BYTES,
    MAX_DETACHED_OWNERS,
    MAX_KEPT_PER_SESSION,
    MAX_LISTING_ROWS,
    MAX_NAMES,
    MAX_NAMES_PER_SESSION,
    MAX_OWNERS_PER_SESSION,
    MAX_QUEUE_PAYLOAD_BYTES,
    MAX_QUEUED_PAYLOAD_BYTES,
    MAX_QUEUES,
    MAX_QUEUES_PER_SESSION,
    MAX_REMEMBERED_FREES,
    MAX_TAKEN_AHEAD,
    MESSAGE_COST_BYTES,
)
from shmarena.protocol import ASSIGN, ERR, Op
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


def refused(peer: Peer, op: Op, *args: object) -> tuple[str, str, dict]:
    reply = peer.raw(op, *args)
    assert reply[0] == ERR, reply
    return reply[2], reply[3], reply[4]


def test_owners_per_session_is_refused_naming_the_limit() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    for i in range(MAX_OWNERS_PER_SESSION):
        peer.ok(Op.OWNER, f"o-{i}", i % 2 == 0)
    before = service.stats(0.0)
    code, message, details = refused(peer, Op.OWNER, "one-more", False)
    assert code == "limit_reached"
    assert details["limit"] == "owners_per_session"
    assert details["value"] == MAX_OWNERS_PER_SESSION
    assert "one-more" in message and f"{MAX_OWNERS_PER_SESSION} owners" in message
    # An alloc into a new owner is refused the same way; nothing changed.
    assert refused(peer, Op.ALLOC, MIN, "new", False)[2]["limit"] == "owners_per_session"
    after = service.stats(0.0)
    assert after["owners"] == before["owners"] and after["used_bytes"] == before["used_bytes"]
    assert service.stats(0.0)["limits"]["owners_per_session"] == MAX_OWNERS_PER_SESSION
    # Recycling one makes room again.
    peer.ok(Op.RECYCLE, "o-1")
    peer.ok(Op.OWNER, "one-more", False)
    assert service.check() == []


def test_detached_owners_in_all_are_bounded() -> None:
    service = make_service()
    service.ledger.max_detached_owners = 50  # the same code at a smaller bound
    a, b = Peer(service, b"a"), Peer(service, b"b", pid=1001)
    for i in range(30):
        a.ok(Op.OWNER, f"a-{i}", True)
    a.ok(Op.BYE)  # detached owners outlive their creator, and still count
    for i in range(20):
        b.ok(Op.OWNER, f"b-{i}", True)
    code, message, details = refused(b, Op.OWNER, "b-20", True)
    assert (code, details["limit"], details["value"]) == ("limit_reached", "detached_owners", 50)
    assert "50 detached owners" in message
    b.ok(Op.OWNER, "scoped", False)  # the bound is on detached ones only
    b.ok(Op.RECYCLE, "a-0")
    b.ok(Op.OWNER, "b-20", True)
    assert service.stats(0.0)["detached_owners"] == 50
    assert service.check() == []


def publish_many(peer: Peer, prefix: str, count: int) -> list[list[int]]:
    handles = peer.ok(Op.ALLOC_MANY, [MIN] * count)[0]
    for i, handle in enumerate(handles):
        peer.ok(Op.PUBLISH, f"{prefix}{i}", handle, True)
    return handles


def test_names_per_session_and_in_all_are_bounded() -> None:
    service = make_service(size=1 << 24)
    exchange = service.exchange
    exchange.max_names_per_session, exchange.max_names = 40, 60
    a, b = Peer(service, b"a"), Peer(service, b"b", pid=1001)
    handles = publish_many(a, "a-", 40)
    (extra,) = a.ok(Op.ALLOC, MIN)
    code, message, details = refused(a, Op.PUBLISH, "a-40", extra, True)
    assert (code, details["limit"], details["value"]) == ("limit_reached", "names_per_session", 40)
    assert "'a-40'" in message and "40 names" in message
    publish_many(b, "b-", 20)
    (other,) = b.ok(Op.ALLOC, MIN)
    details = refused(b, Op.PUBLISH, "b-20", other, True)[2]
    assert (details["limit"], details["value"]) == ("names", 60)
    assert service.stats(0.0)["names"] == 60
    a.ok(Op.FREE, [handles[0]])  # its name vanishes with the block: room for one
    b.ok(Op.PUBLISH, "b-20", other, True)
    assert service.check() == []


def test_queues_per_session_and_in_all_are_bounded() -> None:
    service = make_service()
    exchange = service.exchange
    exchange.max_queues_per_session, exchange.max_queues = 3, 5
    a, b = Peer(service, b"a"), Peer(service, b"b", pid=1001)
    for i in range(3):
        a.ok(Op.QOPEN, f"q{i}", 0)
    code, message, details = refused(a, Op.QOPEN, "q3", 0)
    assert (code, details["limit"], details["value"]) == ("limit_reached", "queues_per_session", 3)
    assert "3 queues" in message
    b.ok(Op.QOPEN, "q3", 0)
    b.ok(Op.QOPEN, "q4", 0)
    assert refused(b, Op.QOPEN, "q5", 0)[2]["limit"] == "queues"
    # A put joins a queue as an open does: the same bound.
    assert refused(a, Op.QPUT, "q3", b"x", [], 0.0)[2]["limit"] == "queues_per_session"
    assert len(service.exchange.queues) == 5
    a.ok(Op.QCLOSE, "q0")
    a.ok(Op.QPUT, "q3", b"x", [], 0.0)
    assert service.check() == []


def test_queued_payload_bytes_are_bounded_per_queue_and_in_all() -> None:
    """The finding: puts of ~64 KB grew the daemon's heap without bound."""
    service = make_service()
    peer = Peer(service, b"a")
    payload = b"p" * 64_000
    cost = len(payload) + MESSAGE_COST_BYTES
    per_queue = MAX_QUEUE_PAYLOAD_BYTES // cost
    for q in range(MAX_QUEUED_PAYLOAD_BYTES // MAX_QUEUE_PAYLOAD_BYTES):
        peer.ok(Op.QOPEN, f"q{q}", 0)
        for _ in range(per_queue):
            peer.ok(Op.QPUT, f"q{q}", payload, [], 0.0)
        code, message, details = refused(peer, Op.QPUT, f"q{q}", payload, [], 0.0)
        assert code == "limit_reached"
        assert details["limit"] == "queued_payload_bytes_per_queue"
        assert details["value"] == MAX_QUEUE_PAYLOAD_BYTES
        assert f"queue 'q{q}'" in message and "in a block" in message
    stats = service.stats(0.0)
    assert stats["queued_payload_bytes"] == 4 * per_queue * cost
    assert stats["queues"][0]["payload_bytes"] == per_queue * cost
    # A fifth queue takes what is left of the total, then the total refuses.
    peer.ok(Op.QOPEN, "q4", 0)
    left = (MAX_QUEUED_PAYLOAD_BYTES - stats["queued_payload_bytes"]) // cost
    for _ in range(left):
        peer.ok(Op.QPUT, "q4", payload, [], 0.0)
    details = refused(peer, Op.QPUT, "q4", payload, [], 0.0)[2]
    assert (details["limit"], details["value"]) == (
        "queued_payload_bytes",
        MAX_QUEUED_PAYLOAD_BYTES,
    )
    # Getting messages out (or dropping a queue) gives the bytes back.
    peer.ok(Op.QGET, "q0", 0, 0.0)
    assert service.stats(0.0)["queued_payload_bytes"] == (4 * per_queue + left - 1) * cost
    peer.ok(Op.QCLOSE, "q1")
    assert service.stats(0.0)["queued_payload_bytes"] == (3 * per_queue + left - 1) * cost
    peer.ok(Op.QPUT, "q4", payload, [], 0.0)
    assert service.check() == []


def test_every_limit_is_in_stats() -> None:
    limits = make_service().stats(0.0)["limits"]
    assert limits == {
        "owners_per_session": MAX_OWNERS_PER_SESSION,
        "detached_owners": MAX_DETACHED_OWNERS,
        "names_per_session": MAX_NAMES_PER_SESSION,
        "names": MAX_NAMES,
        "queues_per_session": MAX_QUEUES_PER_SESSION,
        "queues": MAX_QUEUES,
        "queued_payload_bytes_per_queue": MAX_QUEUE_PAYLOAD_BYTES,
        "queued_payload_bytes": MAX_QUEUED_PAYLOAD_BYTES,
        "taken_ahead_per_session": MAX_TAKEN_AHEAD,
        "kept_requests_per_session": MAX_KEPT_PER_SESSION,
        "listing_rows": MAX_LISTING_ROWS,
        "remembered_frees": MAX_REMEMBERED_FREES,
    }


def pages(peer: Peer, op: Op, *args: object, page: int) -> list[list[dict]]:
    """Every page of a listing, asked as a client does."""
    found, cursor = [], ""
    while cursor is not None:
        rows, cursor = peer.ok(op, *args, cursor, page)
        assert len(rows) <= page
        found.append(rows)
    return found


def test_owners_come_in_pages_in_the_listing_order() -> None:
    service = make_service(size=1 << 24)
    peer = Peer(service, b"a")
    for i in range(25):
        peer.ok(Op.OWNER, f"o {i:02}", i % 3 == 0)  # a space in a name is fine
        if i % 4 == 0:
            peer.ok(Op.ALLOC, MIN * (1 + i % 5), f"o {i:02}", i % 3 == 0)
    (everything,) = peer.ok(Op.OWNERS)  # a client from before paging
    assert len(everything) == 25
    found = pages(peer, Op.OWNERS, page=10)
    assert [len(rows) for rows in found] == [10, 10, 5]
    assert [r["name"] for rows in found for r in rows] == [r["name"] for r in everything]


def test_an_owner_that_keeps_its_size_is_listed_once_while_others_change() -> None:
    service = make_service(size=1 << 24)
    peer = Peer(service, b"a")
    for i in range(30):
        peer.ok(Op.OWNER, f"o-{i:02}", False)
    rows, cursor = peer.ok(Op.OWNERS, "", 10)
    peer.ok(Op.ALLOC, MIN, rows[0]["name"], False)  # listed already: moves ahead
    peer.ok(Op.ALLOC, MIN, "o-29", False)  # not listed yet: moves ahead of the cursor
    peer.ok(Op.RECYCLE, "o-20")
    peer.ok(Op.OWNER, "o-99", False)
    seen = [r["name"] for r in rows]
    while cursor is not None:
        rows, cursor = peer.ok(Op.OWNERS, cursor, 10)
        seen += [r["name"] for r in rows]
    steady = {f"o-{i:02}" for i in range(1, 29)} - {"o-20"}
    assert all(seen.count(name) == 1 for name in steady)
    assert "o-99" in seen


def test_clients_and_names_come_in_pages() -> None:
    service = make_service(size=1 << 24)
    peers = [Peer(service, bytes([i]), pid=1000 + i) for i in range(7)]
    found = pages(peers[0], Op.CLIENTS, page=3)
    assert [len(rows) for rows in found] == [3, 3, 1]
    assert [r["session"] for rows in found for r in rows] == [p.session for p in peers]
    publish_many(peers[0], "n-", 12)
    publish_many(peers[1], "other-", 3)
    found = pages(peers[0], Op.NAMES, "n-", page=5)
    assert [len(rows) for rows in found] == [5, 5, 2]
    assert [r["name"] for rows in found for r in rows] == sorted(f"n-{i}" for i in range(12))
    assert len(peers[0].ok(Op.NAMES, "")[0]) == 15


def test_a_listing_reply_never_passes_the_row_limit() -> None:
    service = make_service()
    service.max_listing_rows = 4
    peer = Peer(service, b"a")
    for i in range(9):
        peer.ok(Op.OWNER, f"o-{i}", False)
    assert len(peer.ok(Op.OWNERS)[0]) == 4  # without paging: the first page only
    rows, cursor = peer.ok(Op.OWNERS, "", 1000)
    assert len(rows) == 4 and cursor is not None
    assert service.stats(0.0)["limits"]["listing_rows"] == 4


def test_the_biggest_owners_come_in_one_request_whatever_their_scope() -> None:
    """What `shmarena top` shows: the owners holding most bytes, detached or
    not, in one page, without paging through every owner."""
    peer = Peer(make_service(size=1 << 24), b"a")
    for i in range(30):
        peer.ok(Op.OWNER, f"o-{i:02}", i % 2 == 0)
        peer.ok(Op.ALLOC, MIN * (1 + i % 7), f"o-{i:02}", i % 2 == 0)
    rows, cursor = peer.ok(Op.OWNERS, "", 5, "bytes")
    assert cursor is None
    every = peer.ok(Op.OWNERS, "", 100)[0]
    biggest = sorted(every, key=lambda r: (-r["bytes"], r["name"]))[:5]
    assert [r["name"] for r in rows] == [r["name"] for r in biggest]
    assert {r["scope"] for r in rows} == {"session", "detached"}  # both scopes compete
    assert refused(peer, Op.OWNERS, "1 -5 o-01", 5, "bytes")[0] == "invalid_request"
    code, message, _ = refused(peer, Op.OWNERS, "", 5, "size")
    assert code == "invalid_request" and "'bytes'" in message


def test_a_cursor_the_daemon_did_not_give_is_refused() -> None:
    peer = Peer(make_service(), b"a")
    bad = [(Op.OWNERS, "x"), (Op.OWNERS, "1 -5 name"), (Op.OWNERS, "1 ² n"), (Op.CLIENTS, "²")]
    for op, cursor in bad:
        code, message, _ = refused(peer, op, cursor, 10)
        assert code == "invalid_request" and "cursor" in message
    assert refused(peer, Op.OWNERS, "", -1)[0] == "invalid_request"


def test_a_put_refused_for_its_bytes_leaves_the_queue_as_it_was() -> None:
    service = make_service()
    service.exchange.max_queue_payload_bytes = 1000
    a, b = Peer(service, b"a"), Peer(service, b"b", pid=1001)
    a.ok(Op.QOPEN, "q", 0)
    (handle,) = b.ok(Op.ALLOC, MIN)
    details = refused(b, Op.QPUT, "q", b"x" * 1000, [handle], 0.0)[2]
    assert details["limit"] == "queued_payload_bytes_per_queue"
    queue = service.exchange.queues["q"]
    assert queue.users == {a.session} and not queue.messages
    assert service.stats(0.0)["queued_bytes"] == 0  # the block is not held by the queue
    b.ok(Op.QPUT, "q", b"x" * 100, [handle], 0.0)
    cost = 100 + MESSAGE_COST_BYTES + HANDLE_COST_BYTES
    assert service.stats(0.0)["queued_payload_bytes"] == cost
    assert service.check() == []
