"""Any bytes on the daemon's socket: an error reply or a dropped frame, never a
crash, never a change of state. `shmarena check` proves it afterwards.

Besides hand-made bad frames and random bytes, requests built from the
message schema itself (hypothesis), valid requests cut at every byte, byte-level
mutations of valid requests (with the daemon's memory measured), and the
limits on frames per message and bytes per frame."""

from __future__ import annotations

import pickle
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

import shmarena
from shmarena.limits import (
    MAX_BATCH,
    MAX_EVENTS,
    MAX_FILLS,
    MAX_FRAME_BYTES,
    MAX_FRAMES,
    MAX_PAYLOAD_BYTES,
    MAX_PID,
    MAX_SIZE_BYTES,
    MAX_WAIT_S,
)
from shmarena.protocol import (
    ASSIGN,
    DRAIN,
    ERR,
    FREE_EVENT,
    GEN_SHIFT,
    LATE_ERR,
    OK,
    ONE_WAY_OPS,
    PROTOCOL_VERSION,
    SCHEMAS,
    UNASSIGN,
    WAITING_OPS,
    Op,
    decode,
)
from tests.conftest import Daemon, wait_for


class Frames:
    """Every frame this module sends, for the figure printed at its end."""

    tried = 0


class RawPeer:
    """A bare DEALER that speaks (or mangles) the wire protocol by hand."""

    def __init__(self, daemon: Daemon) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(f"ipc://{daemon.socket_path}")

    def send(self, *frames: bytes) -> None:
        Frames.tried += len(frames)
        self.socket.send_multipart(list(frames))

    def reply(self, timeout_ms: int = 5000) -> list | None:
        if not self.socket.poll(timeout_ms):
            return None
        return msgpack.unpackb(self.socket.recv(), raw=False, strict_map_key=False)

    def hello(self) -> dict[str, Any]:
        self.send(msgpack.packb([int(Op.HELLO), 0, PROTOCOL_VERSION, 4242, 1, "raw"]))
        reply = self.reply()
        assert reply is not None and reply[0] == 0, reply
        return reply[2]  # type: ignore[no-any-return]

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


@pytest.fixture(scope="module", autouse=True)
def frame_count() -> Iterator[None]:
    yield
    print(f"\nFIGURE: frames tried across test_bad_input.py: {Frames.tried}")


@pytest.fixture
def raw(daemon: Daemon):
    peer = RawPeer(daemon)
    yield peer
    peer.close()


def assert_healthy(daemon: Daemon, client: shmarena.Client) -> None:
    assert client.stats()["used_bytes"] == 4096
    result = daemon.cli("check")
    assert result.returncode == 0, result.stdout + result.stderr


GARBAGE = [
    b"",
    b"\xc1",
    b"\xff" * 100,
    b"\x92\x01",  # truncated array
    msgpack.packb("just a string"),
    msgpack.packb({"op": "alloc"}),
    msgpack.packb([]),
    msgpack.packb([int(Op.ALLOC)]),
    msgpack.packb([9999, 1]),
    msgpack.packb([-5, 1]),
    msgpack.packb(["alloc", 1, 4096]),
    msgpack.packb([int(Op.ALLOC), 1, 0]),
    msgpack.packb([int(Op.ALLOC), 2, -1]),
    msgpack.packb([int(Op.ALLOC), 3, 2**63]),
    msgpack.packb([int(Op.ALLOC), 4, 2**64 - 1]),
    msgpack.packb([int(Op.ALLOC), 5, "4096"]),
    msgpack.packb([int(Op.ALLOC), 6, 4096, 12, 12]),
    msgpack.packb([int(Op.ALLOC_MANY), 7, [1] * 5000]),
    msgpack.packb([int(Op.FREE), 8, [[0, 0, 0, 4096, 1]]]),
    msgpack.packb([int(Op.FREE), 9, "nope"]),
    msgpack.packb([int(Op.RECYCLE), 10, "\udcff".encode("utf-8", "surrogatepass")]),
    b"\xd9\x03\xff\xfe\xfd",  # invalid UTF-8 in a str
    msgpack.packb(msgpack.ExtType(1, b"evil")),
    pickle.dumps(["pickle", "payload"]),
    b"\x91" * 10_000 + b"\xc0",  # deep nesting
]


def test_garbage_frames_get_error_replies(daemon: Daemon, raw: RawPeer) -> None:
    client = daemon.client()
    client.alloc(4096)
    raw.hello()
    for frame in GARBAGE:
        raw.send(frame)
        reply = raw.reply()
        assert reply is not None, f"no reply to {frame[:20]!r}"
        assert reply[0] == 1, f"{frame[:20]!r} was accepted: {reply}"
    assert_healthy(daemon, client)


def test_requests_before_hello_are_refused(daemon: Daemon, raw: RawPeer) -> None:
    client = daemon.client()
    client.alloc(4096)
    raw.send(msgpack.packb([int(Op.ALLOC), 1, 4096]))
    reply = raw.reply()
    # A socket without a session is told so (protocol.py: ``session_lost``).
    assert reply[0] == 1 and reply[2] == "session_lost" and "no session" in reply[3]
    assert_healthy(daemon, client)


def test_many_frames_and_oversized_frames_are_dropped_or_refused(
    daemon: Daemon, raw: RawPeer
) -> None:
    client = daemon.client()
    client.alloc(4096)
    raw.hello()
    raw.send(*[msgpack.packb([int(Op.PING), 1])] * 100)
    assert raw.reply()[0] == 1
    raw.send(b"\x00" * (MAX_FRAME_BYTES + 1))  # over ZMQ_MAXMSGSIZE: dropped by libzmq
    assert raw.reply(timeout_ms=300) is None
    assert_healthy(daemon, client)


def test_random_bytes_fuzz(daemon: Daemon) -> None:
    client = daemon.client()
    client.alloc(4096)
    rng = random.Random(7)
    peer = RawPeer(daemon)
    try:
        peer.hello()
        for _ in range(2000):
            frame = rng.randbytes(rng.randint(0, 64))
            peer.send(frame)
            reply = peer.reply()
            assert reply is not None and reply[0] in (0, 1)
            if reply[0] == 0 and reply[2:] and isinstance(reply[2], list):
                pass  # a random frame that happens to be a valid request is fine
    finally:
        peer.close()
    # Random requests may have allocated (valid by chance); the invariants must hold.
    assert daemon.cli("check").returncode == 0
    assert client.ping()


# -- shared helpers of the tests below ----------------------------------------

# Request id of the STATS request that closes each fuzzed message: its reply
# marks the end of the replies to the fuzzed request. Never fuzzed itself.
MARKER = 0x5EED_5EED_0001
STATE_KEYS = (
    "used_bytes",
    "requested_bytes",
    "cached_bytes",
    "free_bytes",
    "retained_only_bytes",
    "pinned_bytes",
    "live_blocks",
    "owners",
    "sessions",
    "generation",
)


def is_shutdown(message: Any) -> bool:
    """The one request a fuzzer must not send: it stops the daemon on purpose."""
    return (
        isinstance(message, list)
        and bool(message)
        and type(message[0]) is int
        and message[0] == int(Op.SHUTDOWN)
    )


def one_way(frame: bytes) -> bool:
    """Whether the daemon treats the frame as a one-way request (no reply when
    it succeeds), computed as `Service.handle` does."""
    try:
        message = decode(frame)
    except shmarena.ShmArenaError:
        return False
    return (
        isinstance(message, list)
        and bool(message)
        and type(message[0]) is int
        and message[0] in ONE_WAY_OPS
    )


def may_wait(frame: bytes) -> bool:
    """Whether the frame is a request the daemon may keep until it is met or
    its wait runs out, so its reply may come after later requests' replies."""
    try:
        message = decode(frame)
    except shmarena.ShmArenaError:
        return False
    return isinstance(message, list) and bool(message) and message[0] in WAITING_OPS


def state(stats: dict[str, Any]) -> dict[str, Any]:
    return {key: stats[key] for key in STATE_KEYS}


def exchange(peer: RawPeer, *frames: bytes, timeout_ms: int = 10_000) -> tuple[list, list]:
    """Send `frames` as one message followed by a STATS marker message; the
    replies before the marker's, and the marker's own reply."""
    if frames:
        peer.send(*frames)
    peer.send(msgpack.packb([int(Op.STATS), MARKER]))
    replies = []
    while True:  # read up to the marker first, so a failure leaves no reply behind
        reply = peer.reply(timeout_ms)
        assert reply is not None, f"no reply within {timeout_ms} ms: is the daemon alive?"
        replies.append(reply)
        if isinstance(reply, list) and len(reply) >= 2 and reply[1] == MARKER:
            break
    for reply in replies:
        assert isinstance(reply, list) and len(reply) >= 2, reply
        assert reply[0] in (OK, ERR, LATE_ERR), reply
        if reply[0] != OK:
            assert len(reply) == 5 and isinstance(reply[2], str) and isinstance(reply[3], str)
            # The daemon's catch-all for its own exceptions: a bug, whatever the input.
            assert "internal error" not in reply[3], f"{frames[:1]!r:.200} -> {reply}"
    return replies[:-1], replies[-1]


class Bystander:
    """A normal client holding blocks the fuzzing must leave alone: a detached
    owner and its own session's blocks, odd sizes (no fuzzed handle can name
    them), each holding a known pattern."""

    def __init__(self, daemon: Daemon) -> None:
        self.client = daemon.client(cache=False)
        keep = self.client.owner("bystander-keep", detached=True)
        self.buffers = [keep.alloc(12345), keep.alloc(54321)]
        self.buffers += [self.client.alloc(7777), self.client.alloc((3 << 20) + 7)]
        for index, buf in enumerate(self.buffers):
            buf.view[:] = bytes([index + 1]) * buf.size
        self.rows = self._rows()
        assert len(self.rows) == 2

    def _rows(self) -> list[dict[str, Any]]:
        mine = {"bystander-keep", f"session-{self.client.session}"}
        return sorted(
            (
                {k: row[k] for k in ("name", "scope", "blocks", "bytes")}
                for row in self.client.list_owners()
                if row["name"] in mine
            ),
            key=lambda row: str(row["name"]),
        )

    def assert_untouched(self) -> None:
        assert self.client.ping()
        assert self._rows() == self.rows
        for index, buf in enumerate(self.buffers):
            assert bytes(buf.view) == bytes([index + 1]) * buf.size, f"{buf!r} changed"
        self.client.free(self.buffers)
        self.client.sync()
        self.client.recycle("bystander-keep")
        assert all(row["bytes"] == 0 for row in self._rows()), self._rows()


def assert_daemon_fine(daemon: Daemon) -> None:
    assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon died"
    result = daemon.cli("check")
    assert result.returncode == 0, result.stdout + result.stderr


# -- requests built from the message schema (hypothesis) -----------------------

# Invalid UTF-8 cannot be a Python str, so a placeholder str of the same
# length is packed and its bytes swapped afterwards (fixstr of 11 bytes: 0xab).
BAD_UTF8 = "\x00bad-utf-8\x00"
BAD_UTF8_PACKED = b"\xab" + BAD_UTF8.encode()
BAD_UTF8_BYTES = b"\xab\xff\xfe\xc0\x80\xed\xa0\x80\xf8\x88\x80\x80"
EDGE_INTS = [
    0,
    1,
    -1,
    2,
    4095,
    4096,
    4097,
    2**31,
    -(2**31),
    2**32,
    1 << GEN_SHIFT,
    2**62,
    2**63 - 1,
    2**63,
    2**64 - 1,
    -(2**63),
    MAX_PID,
    MAX_PID + 1,
    MAX_BATCH,
    MAX_BATCH + 1,
    MAX_SIZE_BYTES,
    MAX_SIZE_BYTES + 1,
    64 << 20,
    (64 << 20) + 4096,
]
HUGE_LENGTHS = [MAX_BATCH, MAX_BATCH + 1, 3 * MAX_FILLS + 3, MAX_EVENTS, MAX_EVENTS + 1]
# Every op but SHUTDOWN; those that take handles or allocate, three times as often.
FUZZED_OPS = [op for op in Op if op is not Op.SHUTDOWN] + 2 * [
    Op.ALLOC,
    Op.ALLOC_MANY,
    Op.FREE,
    Op.RETAIN,
    Op.RELEASE,
    Op.POST,
]


class Live:
    """Stands for a handle the fuzzing peer got from the daemon itself (its own
    allocations), changed by `how`; `event` makes it a flat POST event using
    that block instead. Swapped in by `SchemaFuzz` just before packing, so the
    fuzzed requests reach the paths behind a valid epoch, offset and size."""

    CHANGES = (
        "same",
        "generation+1",
        "generation-1",
        "size+1",
        "size-1",
        "offset+4096",
        "offset+1",
        "epoch+1",
        "segment=1",
    )
    EVENTS = ("", "free", "assign", "unassign", "drain")

    def __init__(self, index: int, how: str, event: str = "") -> None:
        self.index, self.how, self.event = index, how, event

    def __repr__(self) -> str:
        return f"Live({self.index}, {self.how!r}, {self.event!r})"

    def handle(self, pool: list[list[int]], epoch: int) -> list[int]:
        epoch_, segment, offset, size, gen = (
            pool[self.index % len(pool)]
            if pool
            else [
                epoch,
                0,
                0,
                4096,
                1,
            ]
        )
        how = self.how
        gen += {"generation+1": 1, "generation-1": -1}.get(how, 0)
        size += {"size+1": 1, "size-1": -1}.get(how, 0)
        offset += {"offset+4096": 4096, "offset+1": 1}.get(how, 0)
        epoch_ += how == "epoch+1"
        segment = 1 if how == "segment=1" else segment
        return [epoch_, segment, offset, size, gen]

    def items(self, pool: list[list[int]], epoch: int) -> list[int]:
        """The flat event, for a POST body."""
        h = self.handle(pool, epoch)
        return {
            "free": [FREE_EVENT, *h],
            "assign": [ASSIGN, h[2], h[3], h[4], 0],
            "unassign": [UNASSIGN, h[2], h[4]],
            "drain": [DRAIN, h[2]],
        }[self.event]


def resolve(message: Any, pool: list[list[int]], epoch: int) -> Any:
    """`message` with every Live swapped for the handle (or event) it stands for."""
    if isinstance(message, Live):
        return message.handle(pool, epoch)
    if isinstance(message, list):
        out: list[Any] = []
        for item in message:
            if isinstance(item, Live) and item.event:
                out += item.items(pool, epoch)
            else:
                out.append(resolve(item, pool, epoch))
        return out
    if isinstance(message, dict):
        return {k: resolve(v, pool, epoch) for k, v in message.items()}
    return message


def handles_in(value: Any, epoch: int) -> Iterator[list[int]]:
    """Every handle of this epoch inside a reply."""
    if isinstance(value, list):
        if len(value) == 5 and all(type(v) is int for v in value) and value[0] == epoch:
            yield value
        else:
            for item in value:
                yield from handles_in(item, epoch)


def pack(message: Any) -> bytes:
    frame = msgpack.packb(message, use_bin_type=True)
    return frame.replace(BAD_UTF8_PACKED, BAD_UTF8_BYTES)


def request_strategy(epoch: int, spared_sessions: set[int]) -> st.SearchStrategy[Any]:
    """Structurally plausible requests: known ops with arguments of the right
    kind or of any other, at their edges. Nothing built here can name a block
    or owner of a session in `spared_sessions` (the bystander's)."""
    sessions = [s for s in range(1, 40) if s not in spared_sessions]
    ints = st.one_of(
        st.sampled_from(EDGE_INTS),
        st.integers(-(2**63), 2**64 - 1),
        st.integers(0, 64).map(lambda k: k * 4096),
    )
    gens = st.one_of(
        ints,
        st.integers(0, 80),  # the daemon's own generations
        st.builds(lambda s, k: (s << GEN_SHIFT) + k, st.sampled_from(sessions), st.integers(0, 70)),
    )
    epochs = st.one_of(st.sampled_from([epoch, epoch + 1, epoch - 1]), ints)
    names = st.one_of(
        st.text(max_size=12),
        st.sampled_from(
            ["a", "fuzz", "", " ", "\n", "x" * 200, "x" * 201, "session-", "session-x", BAD_UTF8]
            + [f"session-{s}" for s in sessions]
        ),
    )
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        ints,
        st.floats(),
        st.text(max_size=16),
        st.binary(max_size=16),
        st.sampled_from(
            [BAD_UTF8, msgpack.Timestamp(1, 2), msgpack.ExtType(5, b"x"), msgpack.ExtType(127, b"")]
        ),
    )
    keys = st.one_of(
        st.none(), st.booleans(), ints, st.text(max_size=6), st.binary(max_size=6), st.tuples(ints)
    )
    values = st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=3)
        ),
        max_leaves=6,
    )

    def huge(item: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
        return st.builds(lambda x, n: [x] * n, item, st.sampled_from(HUGE_LENGTHS))

    live = st.builds(Live, st.integers(0, 63), st.sampled_from(Live.CHANGES))
    forged = st.builds(lambda *f: list(f), epochs, st.sampled_from([0, 1, -1]), ints, ints, gens)
    handle = st.one_of(forged, live)
    handles = st.one_of(
        st.lists(live, min_size=1, max_size=3),
        st.lists(st.one_of(handle, handle, values), max_size=4),
        st.builds(lambda x, n: [x] * n, handle, st.sampled_from([MAX_BATCH, MAX_BATCH + 1])),
    )
    event = st.one_of(
        st.builds(lambda o, s, g, i: [ASSIGN, o, s, g, i], ints, ints, gens, st.integers(-1, 4)),
        st.builds(lambda o, g: [UNASSIGN, o, g], ints, gens),
        st.builds(lambda h: [FREE_EVENT, *h], forged),
        st.builds(lambda o: [DRAIN, o], ints),
        st.lists(ints, max_size=3),  # unknown kinds, truncated events
    )
    live_events = st.lists(
        st.builds(
            Live,
            st.integers(0, 63),
            st.sampled_from(Live.CHANGES),
            st.sampled_from(Live.EVENTS[1:]),
        ),
        min_size=1,
        max_size=4,
    )
    events = st.one_of(
        live_events,
        st.lists(event, max_size=8).map(lambda evs: [i for ev in evs for i in ev]),
        huge(st.sampled_from([DRAIN, 0, 2**64 - 1])),
    )
    fills = st.lists(
        st.tuples(
            st.sampled_from([4096, 8192, 16384, 1 << 20, 0, -4096, 4097, 64 << 20, 128 << 20]),
            st.integers(-1, 4097),
            st.integers(-1, 4097),
        ),
        max_size=4,
    ).map(lambda triples: [i for t in triples for i in t])
    right = {
        "int": st.one_of(ints, gens),
        "str": names,
        "str or nil": st.one_of(st.none(), names),
        "bool": st.booleans(),
        "list of int": st.one_of(st.lists(ints, max_size=6), fills, huge(ints)),
        "list of handles": handles,
        "flat list of events": events,
        "bytes": st.one_of(
            st.binary(max_size=48),
            st.sampled_from([b"", bytes(MAX_PAYLOAD_BYTES), bytes(MAX_PAYLOAD_BYTES + 1)]),
        ),
        # Waits stay short: a kept request answers after its wait runs out.
        "a number of seconds": st.one_of(
            st.sampled_from([0, 0.0, -0.0, 0.02, -1, MAX_WAIT_S + 1, 2**63, float("nan")]),
            st.floats(0, 0.02),
            st.floats(),
        ),
        "a handle": handle,
        # QPUTS messages: flat [payload, [handle, ...], ...], well formed or not
        "a list": st.one_of(
            st.lists(values, max_size=4),
            st.lists(st.one_of(st.binary(max_size=16), st.lists(handle, max_size=1)), max_size=6),
        ),
    }
    # Every argument kind of every op has a strategy (a new kind needs one here).
    kinds = {kind for schema in SCHEMAS.values() for _, kind, _ in schema}
    assert kinds <= right.keys(), f"no strategy for argument kinds {kinds - right.keys()}"
    request_ids = st.one_of(
        st.integers(-(2**63), 2**64 - 1), st.sampled_from(EDGE_INTS), values
    ).filter(lambda rid: rid != MARKER)

    @st.composite
    def requests(draw: Callable[..., Any]) -> Any:
        shape = draw(st.sampled_from(["schema"] * 8 + ["bad_op", "not_a_request"]))
        rid = draw(request_ids)
        if shape == "not_a_request":
            return draw(st.one_of(values, st.lists(values, max_size=1)))
        if shape == "bad_op":
            return [draw(st.one_of(ints, values)), rid, *draw(st.lists(values, max_size=4))]
        op = draw(st.sampled_from(FUZZED_OPS))
        args = [draw(st.one_of(right[kind], right[kind], values)) for _, kind, _ in SCHEMAS[op]]
        # A valid wait over 0.02 s would hold the fuzz up; the daemon's own
        # bound (MAX_WAIT_S) is reached by the values above it.
        args = [
            0.02
            if kind == "a number of seconds" and type(a) in (int, float) and 0.02 < a <= MAX_WAIT_S
            else a
            for a, (_, kind, _) in zip(args, SCHEMAS[op], strict=True)
        ]
        # Mostly every argument; else fewer (defaults, missing ones) or one too many.
        cut = draw(st.one_of(st.just(len(args)), st.integers(0, len(args) + 1)))
        args = args[:cut] if cut <= len(args) else [*args, draw(values)]
        return [int(op), rid, *args]

    return requests().filter(lambda message: not is_shutdown(message))


class SchemaFuzz:
    """Runs fuzzed requests one by one against a live daemon and checks each
    reply; counts what it saw."""

    def __init__(self, daemon: Daemon) -> None:
        self.peer = RawPeer(daemon)
        info = self.peer.hello()
        self.session, self.epoch = info["session"], info["epoch"]
        self.pool: list[list[int]] = []  # handles of blocks this peer allocated
        self.before: dict[str, Any] | None = None
        self.wire_s = 0.0
        self.counts = {
            "requests": 0,
            "ok": 0,
            "err": 0,
            "late": 0,
            "none": 0,
            "hellos": 1,
            "bad_utf8": 0,
        }

    def run(self, message: Any) -> None:
        frame = pack(resolve(message, self.pool, self.epoch))
        assume(len(frame) <= MAX_FRAME_BYTES)  # larger frames: the oversize test
        started = time.perf_counter()
        replies, marker = exchange(self.peer, frame)
        if not replies and may_wait(frame):  # kept until its wait ran out
            late = self.peer.reply(5_000)
            assert late is not None, f"no reply to the kept {frame[:60]!r}"
            replies.append(late)
        self.wire_s += time.perf_counter() - started
        self.counts["requests"] += 1
        self.counts["bad_utf8"] += BAD_UTF8_BYTES in frame
        if one_way(frame):
            assert len(replies) <= 1, replies
            assert all(r[0] == LATE_ERR for r in replies), replies
        else:
            assert len(replies) == 1, f"{len(replies)} replies to {frame[:60]!r}: {replies}"
            assert replies[0][0] in (OK, ERR), replies
        kind = {OK: "ok", ERR: "err", LATE_ERR: "late"}[replies[0][0]] if replies else "none"
        self.counts[kind] += 1
        if kind == "ok":
            self.pool = (self.pool + list(handles_in(replies[0][2:], self.epoch)))[-64:]
        if marker[0] != OK:  # the fuzzed request ended the session (bye)
            self.session = self.peer.hello()["session"]
            self.counts["hellos"] += 1
            self.before = None
            return
        after = state(marker[2])
        if kind == "err" and self.before is not None:
            assert after == self.before, f"refused {frame[:80]!r} changed the state: {replies}"
        self.before = after

    def close(self) -> None:
        self.peer.close()


@pytest.mark.parametrize(
    "examples",
    [pytest.param(500, id="500"), pytest.param(10_000, id="10k", marks=pytest.mark.slow)],
)
def test_schema_fuzz(daemon: Daemon, examples: int) -> None:
    bystander = Bystander(daemon)
    observer = daemon.client(cache=False)
    fuzz = SchemaFuzz(daemon)
    spared = {bystander.client.session, observer.session}
    try:

        @settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,
            database=None,
            # No shrinking: replaying against a daemon whose state moved on
            # would not reproduce; the first failing request is the report.
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(message=request_strategy(bystander.client.epoch, spared))
        def fuzz_one(message: Any) -> None:
            fuzz.run(message)

        fuzz_one()
    finally:
        fuzz.close()
    print(f"\nFIGURE: schema fuzz: {fuzz.counts}, {fuzz.wire_s:.1f} s on the wire")
    assert fuzz.counts["requests"] >= examples // 2
    assert fuzz.counts["ok"] > 0 and fuzz.counts["err"] > 0  # both kinds were reached
    assert_daemon_fine(daemon)
    bystander.assert_untouched()
    assert observer.check() == []


@pytest.mark.parametrize(
    ("op", "second"),
    [(Op.FREE, "same"), (Op.FREE, "bad"), (Op.RETAIN, "bad")],
    ids=["free-same-twice", "free-bad-second", "retain-bad-second"],
)
def test_refused_request_with_a_forged_cache_handle_changes_nothing(
    daemon: Daemon, op: Op, second: str
) -> None:
    """A handle with a newer generation of a block still in a client's cache
    is taken as proof of a hand-out the daemon has not heard of yet; a request
    refused for another of its handles must not apply that hand-out either."""
    peer = RawPeer(daemon)
    try:
        info = peer.hello()
        mark = (info["session"] << GEN_SHIFT) + 1
        fill = msgpack.packb([int(Op.FILL), 1, [4096, 2, 2], mark, [], None, False])
        replies, marker = exchange(peer, fill)
        assert replies[0][0] == OK, replies
        cached = replies[0][2][0]
        before = state(marker[2])
        forged = [info["epoch"], 0, cached[0], 4096, mark + 5]  # never handed out
        other = forged if second == "same" else [info["epoch"], 0, 5, 5, 5]
        replies, marker = exchange(peer, msgpack.packb([int(op), 2, [forged, other]]))
        assert [r[0] for r in replies] == [ERR], replies
        assert state(marker[2]) == before, replies[0][3]
    finally:
        peer.close()
    assert_daemon_fine(daemon)


# -- frames per message, bytes per frame ------------------------------------------


def test_frames_per_message_at_and_over_the_limit(daemon: Daemon) -> None:
    bystander = Bystander(daemon)
    peer = RawPeer(daemon)
    try:
        peer.hello()
        _, marker = exchange(peer)
        before = state(marker[2])
        # At the limit every frame is a request of its own, answered in order.
        pings = [msgpack.packb([int(Op.PING), 100 + i]) for i in range(MAX_FRAMES)]
        replies, _ = exchange(peer, *pings)
        assert [(r[0], r[1]) for r in replies] == [(OK, 100 + i) for i in range(MAX_FRAMES)]
        replies, _ = exchange(peer, *[b""] * MAX_FRAMES)
        assert [(r[0], r[2]) for r in replies] == [(ERR, "protocol")] * MAX_FRAMES
        replies, _ = exchange(peer, pings[0], b"", pings[1])
        assert [r[0] for r in replies] == [OK, ERR, OK]
        # Over it, the whole message is one protocol error and none of its
        # requests runs, however valid each is.
        for count in (MAX_FRAMES + 1, 1000):
            allocs = [msgpack.packb([int(Op.ALLOC), 1000 + i, 4096]) for i in range(count)]
            replies, marker = exchange(peer, *allocs)
            assert [(r[0], r[2]) for r in replies] == [(ERR, "protocol")], replies
            assert state(marker[2]) == before
        replies, marker = exchange(peer, *[b""] * 1000)
        assert [(r[0], r[2]) for r in replies] == [(ERR, "protocol")], replies
        assert state(marker[2]) == before
    finally:
        peer.close()
    assert_daemon_fine(daemon)
    bystander.assert_untouched()


def test_frame_at_the_size_limit_is_read_and_one_over_drops_only_that_peer(
    daemon: Daemon,
) -> None:
    bystander = Bystander(daemon)
    dropped, other = RawPeer(daemon), RawPeer(daemon)
    try:
        dropped.hello()
        other.hello()
        # [PING, 7, "xxx..."] padded to exactly MAX_FRAME_BYTES: read, refused.
        overhead = len(msgpack.packb([int(Op.PING), 7, "x" * 70_000])) - 70_000
        at_limit = msgpack.packb([int(Op.PING), 7, "x" * (MAX_FRAME_BYTES - overhead)])
        assert len(at_limit) == MAX_FRAME_BYTES
        replies, _ = exchange(dropped, at_limit)
        assert [r[0] for r in replies] == [ERR] and "argument" in replies[0][3], replies
        # One byte more: libzmq drops the frame and the connection (ZMQ_MAXMSGSIZE).
        dropped.send(at_limit + b"\x00")
        replies, marker = exchange(other, msgpack.packb([int(Op.PING), 8]))
        assert [(r[0], r[1]) for r in replies] == [(OK, 8)] and marker[0] == OK
        # The dropped peer's socket reconnects by itself; its session was the
        # old connection's, so it is told it has none, and can say hello again.
        rid = iter(range(10_000, 20_000))

        def answered() -> list | None:
            dropped.send(msgpack.packb([int(Op.PING), next(rid)]))
            return dropped.reply(timeout_ms=200)

        reply = wait_for(answered, timeout_s=20, what="the dropped peer to be answered again")
        assert reply[0] == ERR and reply[2] == "session_lost", reply
        dropped.hello()
        replies, marker = exchange(dropped, msgpack.packb([int(Op.PING), 9]))
        assert [(r[0], r[1]) for r in replies] == [(OK, 9)] and marker[0] == OK
    finally:
        dropped.close()
        other.close()
    assert_daemon_fine(daemon)
    bystander.assert_untouched()


# -- valid requests cut short, or with bytes after them -----------------------


def test_truncated_requests_at_every_cut_point_change_nothing(daemon: Daemon) -> None:
    """Each request below would change the state (free the bystander's block,
    recycle its owner, allocate, end the session, stop the daemon ...) if it
    ran; cut at any byte, or followed by a stray byte, none may."""
    bystander = Bystander(daemon)
    peer = RawPeer(daemon)
    try:
        session = peer.hello()["session"]
        handle = list(bystander.buffers[0].handle)
        mark = (session << GEN_SHIFT) + 1
        requests = [
            [int(Op.HELLO), 1, PROTOCOL_VERSION, 4242, 1, "raw"],
            [int(Op.BYE), 2],
            [int(Op.ALLOC), 3, 4096, "cut", True],
            [int(Op.ALLOC_MANY), 4, [4096, 8192, 12288]],
            [int(Op.FREE), 5, [handle]],
            [int(Op.OWNER), 6, "cut-owner", True],
            [int(Op.RECYCLE), 7, "bystander-keep"],
            [int(Op.RETAIN), 8, [handle]],
            [int(Op.FILL), 9, [8192, 4, 1], mark, [4096], None, False],
            [int(Op.POST), 10, [FREE_EVENT, *handle]],
            [int(Op.SYNC), 11],
            [int(Op.SHUTDOWN), 12],
        ]
        _, marker = exchange(peer)
        before = state(marker[2])
        cuts = 0
        for request in requests:
            frame = msgpack.packb(request)
            bad = [frame[:cut] for cut in range(len(frame))] + [frame + b"\xc0"]
            for start in range(0, len(bad), MAX_FRAMES):
                group = bad[start : start + MAX_FRAMES]
                replies, marker = exchange(peer, *group)
                assert [(r[0], r[2]) for r in replies] == [(ERR, "protocol")] * len(group), (
                    request,
                    replies,
                )
                assert state(marker[2]) == before, request
            cuts += len(bad)
        print(f"\nFIGURE: {cuts} cut or padded frames of {len(requests)} requests, all refused")
    finally:
        peer.close()
    assert_daemon_fine(daemon)
    bystander.assert_untouched()


# -- a pickle is never unpickled -----------------------------------------------


class _Creates:
    """Unpickling an instance opens (creates) the file named at pickling time."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_pickle_that_would_create_a_file_is_never_unpickled(daemon: Daemon, tmp_path) -> None:
    marker_file = tmp_path / "unpickled"
    payload = pickle.dumps(_Creates(str(marker_file)))
    # The payload works: unpickled anywhere, it makes the file.
    subprocess.run(
        [sys.executable, "-c", "import pickle, sys; pickle.loads(bytes.fromhex(sys.argv[1]))"]
        + [payload.hex()],
        check=True,
        timeout=60,
    )
    assert marker_file.exists()
    marker_file.unlink()
    bystander = Bystander(daemon)
    peer = RawPeer(daemon)
    try:
        peer.hello()
        frames = [
            payload,
            msgpack.packb([int(Op.RECYCLE), 1, payload], use_bin_type=True),
            msgpack.packb([int(Op.ALLOC), 2, 4096, payload], use_bin_type=True),
            msgpack.packb([int(Op.FREE), 3, [payload]], use_bin_type=True),
            msgpack.packb([int(Op.POST), 4, payload], use_bin_type=True),
            msgpack.packb([int(Op.OWNER), 5, {"name": payload}], use_bin_type=True),
            msgpack.packb(msgpack.ExtType(1, payload)),
            msgpack.packb([int(Op.PING), 6, msgpack.ExtType(1, payload)]),
        ]
        for frame in frames:
            replies, marker = exchange(peer, frame)
            assert len(replies) == 1 and replies[0][0] in (ERR, LATE_ERR), replies
            assert marker[0] == OK
    finally:
        peer.close()
    assert not marker_file.exists(), "the daemon unpickled a payload"
    assert_daemon_fine(daemon)
    bystander.assert_untouched()


# -- byte-level mutations of valid requests, with the daemon's memory measured -----


def vm_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


class MutationFuzz:
    """Valid requests of every kind, mutated at the byte level (bit flips,
    edge bytes, cuts, insertions, splices), sent in pipelined batches."""

    EDGE_BYTES = bytes([0x00, 0x7F, 0x80, 0x90, 0x9F, 0xA0, 0xC0, 0xC1, 0xC2, 0xC3])
    EDGE_BYTES += bytes([0xC4, 0xCC, 0xCF, 0xD3, 0xD9, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xFF])

    def __init__(self, daemon: Daemon, seed: int) -> None:
        self.rng = random.Random(seed)
        self.peer = RawPeer(daemon)
        self.session = self.peer.hello()["session"]
        self.epoch = daemon.client(cache=False).epoch
        self.frames = 0
        self.replies = 0
        self.hellos = 1

    def seeds(self) -> list[bytes]:
        epoch, mark = self.epoch, (self.session << GEN_SHIFT) + 1
        handle = [epoch, 0, 4096, 4096, 1]
        requests: list[list[Any]] = [
            [int(Op.PING), 1],
            [int(Op.ALLOC), 2, 4096],
            [int(Op.ALLOC), 3, 12288, "rss-owner", False],
            [int(Op.ALLOC_MANY), 4, [4096, 8192, 65536], None, False],
            [int(Op.FREE), 5, [handle, handle]],
            [int(Op.OWNER), 6, "rss-owner", False],
            [int(Op.RECYCLE), 7, "rss-owner"],
            [int(Op.RETAIN), 8, [handle]],
            [int(Op.RELEASE), 9, [handle]],
            [int(Op.FILL), 10, [8192, 8, 1, 4096, 4, 0], mark, [4096], None, False],
            [int(Op.POST), 11, [ASSIGN, 0, 4096, mark + 1, 0, UNASSIGN, 0, mark + 1, DRAIN, 0]],
            [int(Op.SYNC), 12],
            [int(Op.STATS), 13],
            [int(Op.OWNERS), 14],
            [int(Op.CLIENTS), 15],
        ]
        return [msgpack.packb(request) for request in requests]

    def mutate(self, frame: bytes, pool: list[bytes]) -> bytes:
        rng, data = self.rng, bytearray(frame)
        for _ in range(rng.randint(1, 3)):
            how = rng.randrange(7)
            at = rng.randrange(len(data) + 1)
            if how == 0 and data:
                data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
            elif how == 1 and data:
                data[min(at, len(data) - 1)] = rng.choice(self.EDGE_BYTES)
            elif how == 2:
                data[at:at] = rng.randbytes(rng.randint(1, 9))
            elif how == 3:
                del data[at : at + rng.randint(1, 9)]
            elif how == 4:
                data = data[:at]
            elif how == 5:
                other = rng.choice(pool)
                data = data[:at] + other[rng.randrange(len(other)) :]
            else:
                data[at:at] = data[at : at + rng.randint(1, 16)] * rng.randint(1, 4)
        return bytes(data)

    def round(self, frames: int) -> None:
        """About `frames` mutated frames, in batches of up to 64 messages (a
        few of them multipart), each batch closed by a marker."""
        pool = self.seeds()
        sent = 0
        while sent < frames:
            batch = []
            for _ in range(64):
                parts = [self.mutate(self.rng.choice(pool), pool)]
                if self.rng.random() < 0.05:
                    parts += [self.mutate(self.rng.choice(pool), pool) for _ in range(20)]
                parts = [p for p in parts if not self._shutdown(p)]
                if parts:
                    batch.append(parts)
            for parts in batch[:-1]:
                self.peer.send(*parts)
            replies, marker = exchange(self.peer, *batch[-1])
            sent += sum(map(len, batch))
            self.replies += len(replies)
            if marker[0] != OK:  # a mutation said bye: start a new session
                self.session = self.peer.hello()["session"]
                self.hellos += 1
        self.frames += sent

    @staticmethod
    def _shutdown(frame: bytes) -> bool:
        try:
            return is_shutdown(decode(frame))
        except shmarena.ShmArenaError:
            return False

    def close(self) -> None:
        self.peer.close()


RSS_BOUND = 32 << 20


@pytest.mark.parametrize(
    ("warmup", "measured"),
    [
        pytest.param(2_000, 10_000, id="10k"),
        pytest.param(20_000, 200_000, id="200k", marks=pytest.mark.slow),
    ],
)
def test_mutation_fuzz_keeps_the_daemon_memory_bounded(
    daemon: Daemon, warmup: int, measured: int
) -> None:
    assert daemon.proc is not None
    bystander = Bystander(daemon)
    fuzz = MutationFuzz(daemon, seed=11)
    try:
        fuzz.round(warmup)
        rss_before = vm_rss_bytes(daemon.proc.pid)
        while fuzz.frames < warmup + measured:
            fuzz.round(2_000)
        rss_after = vm_rss_bytes(daemon.proc.pid)
    finally:
        fuzz.close()
    print(
        f"\nFIGURE: frames tried {fuzz.frames} (replies {fuzz.replies}, hellos {fuzz.hellos}), "
        f"daemon RSS before/after {rss_before / 2**20:.1f}/{rss_after / 2**20:.1f} MiB "
        f"(measured over the last {fuzz.frames - warmup} frames)"
    )
    assert rss_after - rss_before < RSS_BOUND, (rss_before, rss_after)
    assert_daemon_fine(daemon)
    bystander.assert_untouched()
