"""The daemon's whole behaviour as Service.handle: frames in, frames out, no sockets."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shmarena.daemon.service import ArenaInfo, Creds, Service
from shmarena.protocol import (
    ERR,
    FREE_ID_BIT,
    LATE_ERR,
    OK,
    ONE_WAY_OPS,
    PROTOCOL_VERSION,
    Op,
    decode,
    encode,
)
from tests.unit.receiving import RequestIds

EPOCH = 77
MIN = 4096


def make_service(size: int = 1 << 20, watch: bool = True) -> Service:
    info = ArenaInfo("unit", EPOCH, size, MIN, "/shmarena-unit", 1, 0.0)
    return Service(info, watch=lambda sid, pid, ticks: watch)


class Peer(RequestIds):
    """A fake client: a routing id plus a request counter (the service is pure,
    so this is the real wire format, only without the socket)."""

    creds: Creds | None = None

    def __init__(
        self, service: Service, ident: bytes, pid: int = 1000, creds: Creds | None = None
    ) -> None:
        self.service = service
        self.ident = ident
        self.creds = creds  # who the kernel says the process is (None: the daemon's user)
        RequestIds.__init__(self)  # state-changing requests 1, 2, ...; others apart
        self.now = 100.0
        self.session = self.ok(Op.HELLO, PROTOCOL_VERSION, pid, 5, "t")[0]["session"]

    def raw(self, op: Op, *args: object) -> list:
        frame = encode([int(op), self.next_id(op), *args])
        return decode(self.service.handle(self.ident, frame, self.now, self.creds))

    def ok(self, op: Op, *args: object) -> list:
        reply = self.raw(op, *args)
        assert reply[0] == OK, reply
        return reply[2:]

    def err(self, op: Op, *args: object) -> tuple[str, str]:
        reply = self.raw(op, *args)
        assert reply[0] == ERR, reply
        return reply[2], reply[3]


def used(service: Service) -> int:
    return service.stats(0.0)["used_bytes"]


def test_alloc_free_round_trip() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    (handle,) = peer.ok(Op.ALLOC, 5 * MIN)
    assert handle[0] == EPOCH and handle[3] == 5 * MIN
    assert used(service) == 5 * MIN
    assert peer.ok(Op.FREE, [handle]) == [[1, 5 * MIN]]
    assert used(service) == 0
    assert service.check() == []


def test_double_free_is_stale_and_changes_nothing() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    (handle,) = peer.ok(Op.ALLOC, 100)
    (other,) = peer.ok(Op.ALLOC, 100)
    peer.ok(Op.FREE, [handle])
    code, message = peer.err(Op.FREE, [other, handle])
    assert code == "stale_handle" and "double free" in message
    assert used(service) == MIN  # `other` was not freed either: all or none
    peer.ok(Op.FREE, [other])


def test_other_epoch_is_refused() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    (handle,) = peer.ok(Op.ALLOC, 100)
    code, message = peer.err(Op.FREE, [[EPOCH + 1, *handle[1:]]])
    assert code == "stale_handle" and "epoch" in message


def test_recycle_frees_only_that_owner() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    for _ in range(3):
        peer.ok(Op.ALLOC, MIN, "batch-1", False)
    (keep,) = peer.ok(Op.ALLOC, 2 * MIN, "batch-2", False)
    assert peer.ok(Op.RECYCLE, "batch-1") == [[3, 3 * MIN], []]
    assert used(service) == 2 * MIN
    code, _ = peer.err(Op.RECYCLE, "batch-1")
    assert code == "unknown_owner"
    peer.ok(Op.FREE, [keep])


def test_session_end_recycles_session_owners_but_not_detached() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    peer.ok(Op.ALLOC, MIN)
    peer.ok(Op.ALLOC, MIN, "mine", False)
    peer.ok(Op.ALLOC, 3 * MIN, "shared", True)
    service.reclaim(peer.session)
    assert used(service) == 3 * MIN
    rows = Peer(service, b"b").ok(Op.OWNERS)[0]
    assert [(r["name"], r["scope"], r["bytes"]) for r in rows] == [("shared", "detached", 3 * MIN)]
    assert service.check() == []


def test_retained_block_outlives_recycle_until_release() -> None:
    service = make_service()
    writer, reader = Peer(service, b"w"), Peer(service, b"r")
    (handle,) = writer.ok(Op.ALLOC, MIN, "batch", False)
    reader.ok(Op.RETAIN, [handle])
    writer.ok(Op.RECYCLE, "batch")
    stats = service.stats(0.0)
    assert stats["used_bytes"] == 0 and stats["retained_only_bytes"] == MIN
    assert stats["free_bytes"] == (1 << 20) - MIN
    code, _ = writer.err(Op.FREE, [handle])
    assert code == "stale_handle"
    reader.ok(Op.RELEASE, [handle])
    assert service.stats(0.0)["free_bytes"] == 1 << 20
    assert service.check() == []


def test_reader_death_releases_retained_block() -> None:
    service = make_service()
    writer, reader = Peer(service, b"w"), Peer(service, b"r")
    (handle,) = writer.ok(Op.ALLOC, MIN)
    reader.ok(Op.RETAIN, [handle])
    writer.ok(Op.FREE, [handle])
    service.reclaim(reader.session)
    assert service.stats(0.0)["free_bytes"] == 1 << 20


def test_out_of_memory_names_the_figures_and_leaves_no_owner() -> None:
    service = make_service(size=64 * MIN)
    peer = Peer(service, b"a")
    (handle,) = peer.ok(Op.ALLOC, 32 * MIN)
    code, message = peer.err(Op.ALLOC, 33 * MIN, "too-big", False)
    assert code == "out_of_memory"
    assert "asked 132 KiB" in message and "largest free block 128 KiB" in message
    assert "full" in message
    assert [row["name"] for row in peer.ok(Op.OWNERS)[0]] == [f"session-{peer.session}"]
    peer.ok(Op.FREE, [handle])


def test_fragmented_arena_is_told_apart_from_full() -> None:
    service = make_service(size=64 * MIN)
    peer = Peer(service, b"a")
    (handles,) = peer.ok(Op.ALLOC_MANY, [MIN] * 64)
    peer.ok(Op.FREE, handles[::2])
    code, message = peer.err(Op.ALLOC, 2 * MIN)
    assert code == "out_of_memory" and "fragmented" in message
    extfrag = service.stats(0.0)["extfrag_index_by_order"]
    assert extfrag["0"] == -1.0  # single pages can still be had
    assert extfrag["5"] > 0.9  # 32 pages are free in total, but not in one block


def test_full_arena_is_not_called_fragmented() -> None:
    service = make_service(size=64 * MIN)
    peer = Peer(service, b"a")
    peer.ok(Op.ALLOC_MANY, [MIN] * 60, "big", False)
    peer.ok(Op.ALLOC_MANY, [MIN] * 3, "small", False)
    code, message = peer.err(Op.ALLOC, 2 * MIN)
    assert code == "out_of_memory" and "is full" in message
    assert "largest owners: big 240 KiB, small 12 KiB" in message
    assert 0 <= service.stats(0.0)["extfrag_index_by_order"]["1"] < 0.1


def test_alloc_many_is_all_or_nothing() -> None:
    service = make_service(size=16 * MIN)
    peer = Peer(service, b"a")
    code, _ = peer.err(Op.ALLOC_MANY, [8 * MIN, 8 * MIN, MIN])
    assert code == "out_of_memory"
    assert used(service) == 0 and service.check() == []


def test_request_before_hello_is_refused() -> None:
    service = make_service()
    reply = decode(service.handle(b"x", encode([int(Op.STATS), 1]), 0.0))
    assert reply[0] == ERR and reply[2] == "session_lost" and "no session" in reply[3]


def test_wrong_protocol_version_names_both() -> None:
    service = make_service()
    reply = decode(service.handle(b"x", encode([int(Op.HELLO), 1, 99, 1, 1]), 0.0))
    assert reply[2] == "protocol" and "99" in reply[3] and str(PROTOCOL_VERSION) in reply[3]


def test_retried_request_is_answered_from_cache_not_executed_twice() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    frame = encode([int(Op.ALLOC), 1, MIN])
    first = service.handle(b"a", frame, 0.0)
    second = service.handle(b"a", frame, 0.0)
    assert first == second and decode(first)[0] == OK
    assert used(service) == MIN
    assert peer.session


def test_requests_apply_in_sequence_a_gap_is_asked_for_and_repeats_skip() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    alloc = encode([int(Op.ALLOC), 1, MIN])
    assert decode(service.handle(b"a", alloc, 0.0))[0] == OK
    # Number 3 before 2: not applied, the reply says what the daemon has.
    late = decode(service.handle(b"a", encode([int(Op.ALLOC), 3, MIN]), 0.0))
    assert late[2] == "resend" and late[4] == {"seen": 1}
    assert used(service) == MIN
    # A one-way request with a gap gets the same as a late error.
    gap_post = decode(service.handle(b"a", encode([int(Op.POST), 4, []]), 0.0))
    assert gap_post[0] == LATE_ERR and gap_post[2] == "resend"
    # 2 then 3 again: both applied, once each; repeats are answered, not run.
    assert decode(service.handle(b"a", encode([int(Op.ALLOC), 2, MIN]), 0.0))[0] == OK
    assert decode(service.handle(b"a", encode([int(Op.ALLOC), 3, MIN]), 0.0))[0] == OK
    assert service.handle(b"a", encode([int(Op.POST), 4, []]), 0.0) == b""
    assert service.handle(b"a", encode([int(Op.POST), 4, []]), 0.0) == b""
    assert decode(service.handle(b"a", encode([int(Op.ALLOC), 3, MIN]), 0.0))[0] == OK
    # A post reusing the number of another request (only a broken or hostile
    # client does that) is dropped too: never answered with that one's reply.
    assert service.handle(b"a", encode([int(Op.POST), 3, []]), 0.0) == b""
    assert used(service) == 3 * MIN
    assert service.seen[peer.session] == 4
    assert service.check() == []


def test_unwatched_session_expires_after_lease() -> None:
    service = make_service(watch=False)
    peer = Peer(service, b"a")
    peer.ok(Op.ALLOC, MIN)
    assert service.expire(peer.now + 5) == []
    assert service.expire(peer.now + 11) == [peer.session]
    assert used(service) == 0
    # The stopped client comes back: told its lease ran out, not "say hello".
    code, message = peer.err(Op.ALLOC, MIN)
    assert code == "session_lost" and "lease" in message and str(peer.session) in message
    assert used(service) == 0


def test_hello_resumes_a_living_session_from_a_new_socket_only_with_its_token() -> None:
    service = make_service()
    peer = Peer(service, b"a", pid=1234)
    (handle,) = peer.ok(Op.ALLOC, MIN)
    token = service.tokens[peer.session]
    # A wrong token or another pid gets a new session; the old one keeps its block.
    for pid, wrong in ((1234, token + 1), (999, token)):
        intruder = Peer.__new__(Peer)
        intruder.service, intruder.ident, intruder.rid, intruder.now = service, b"i", 0, 1.0
        intruder.free_rid = FREE_ID_BIT
        (info,) = intruder.ok(Op.HELLO, PROTOCOL_VERSION, pid, 5, "t", [peer.session, wrong])
        assert not info["resumed"] and info["session"] != peer.session
        service.end_session(info["session"])
    # The right token from a new socket: the same session, its reply cache included.
    again = Peer.__new__(Peer)
    again.service, again.ident, again.rid, again.now = service, b"b", peer.rid, 1.0
    again.free_rid = FREE_ID_BIT
    (info,) = again.ok(Op.HELLO, PROTOCOL_VERSION, 1234, 5, "t", [peer.session, token])
    assert info["resumed"] and info["session"] == peer.session
    assert again.ok(Op.FREE, [handle]) == [[1, MIN]]
    assert used(service) == 0
    # The old socket no longer speaks for the session.
    assert peer.err(Op.STATS)[0] == "session_lost"
    assert service.check() == []


@pytest.mark.parametrize(
    "size",
    [0, -1, 2**63 - 1, 1 << 40],
)
def test_bad_sizes_get_error_replies(size: int) -> None:
    service = make_service()
    peer = Peer(service, b"a")
    code, _ = peer.err(Op.ALLOC, size)
    assert code in ("invalid_request", "out_of_memory")
    assert service.check() == [] and used(service) == 0


def test_size_beyond_msgpack_int_range_is_refused() -> None:
    service = make_service()
    Peer(service, b"a")
    reply = decode(service.handle(b"a", b"\x93\x0a\x05\xcf" + b"\xff" * 8, 0.0))
    assert reply[0] == ERR


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=64))
@example(payload=b"\x95\x12\x01\x00\x00\x00")  # a malformed POST: its refusal is late
def test_random_bytes_never_crash_or_change_state(payload: bytes) -> None:
    service = make_service()
    peer = Peer(service, b"a")
    before = service.stats(0.0)
    frame = service.handle(b"a", payload, 0.0)
    # A one-way POST gets no reply when it succeeds, and a LATE_ERR refusal.
    reply = decode(frame) if frame else [OK]
    assert isinstance(reply, list) and reply[0] in (OK, ERR, LATE_ERR)
    assert service.check() == []
    assert service.stats(0.0)["used_bytes"] == before["used_bytes"] or reply[0] == OK
    assert peer.session


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=5),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    op=st.sampled_from([int(o) for o in Op if o not in (Op.SHUTDOWN, Op.BYE)]),
    args=st.lists(values, max_size=4),
)
def test_wrong_typed_arguments_get_error_replies(op: int, args: list) -> None:
    service = make_service()
    peer = Peer(service, b"a")
    frame = service.handle(b"a", msgpack.packb([op, 9, *args]), 0.0)
    if frame:
        assert decode(frame)[0] in ((LATE_ERR,) if op in ONE_WAY_OPS else (OK, ERR))
    else:
        assert op in ONE_WAY_OPS  # one-way: no reply when it succeeds
    assert service.check() == []
    assert peer.session


def test_random_workload_keeps_invariants() -> None:
    rng = random.Random(3)
    service = make_service(size=4 << 20)
    peers = [Peer(service, bytes([i])) for i in range(3)]
    live: list[list[int]] = []
    for step in range(2000):
        peer = rng.choice(peers)
        action = rng.random()
        if action < 0.5:
            reply = peer.raw(Op.ALLOC, rng.randint(1, 200_000), rng.choice([None, "a", "b"]))
            if reply[0] == OK:
                live.append(reply[2])
        elif action < 0.9 and live:
            handle = live.pop(rng.randrange(len(live)))
            peer.raw(Op.FREE, [handle])
        elif action < 0.95:
            peer.raw(Op.RECYCLE, rng.choice(["a", "b"]))
        if step % 200 == 0:
            assert service.check() == []
    assert service.check() == []
