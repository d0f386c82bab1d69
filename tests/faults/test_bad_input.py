"""Any bytes on the daemon's socket: an error reply or a dropped frame, never a
crash, never a change of state. `shmarena check` proves it afterwards."""

from __future__ import annotations

import pickle
import random

import msgpack
import pytest
import zmq

import shmarena
from shmarena.protocol import MAX_FRAME_BYTES, PROTOCOL_VERSION, Op
from tests.conftest import Daemon


class RawPeer:
    """A bare DEALER that speaks (or mangles) the wire protocol by hand."""

    def __init__(self, daemon: Daemon) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(f"ipc://{daemon.socket_path}")

    def send(self, *frames: bytes) -> None:
        self.socket.send_multipart(list(frames))

    def reply(self, timeout_ms: int = 5000) -> list | None:
        if not self.socket.poll(timeout_ms):
            return None
        return msgpack.unpackb(self.socket.recv(), raw=False, strict_map_key=False)

    def hello(self) -> None:
        self.send(msgpack.packb([int(Op.HELLO), 0, PROTOCOL_VERSION, 4242, 1, "raw"]))
        assert self.reply()[0] == 0

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


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
    assert reply[0] == 1 and reply[2] == "protocol" and "hello" in reply[3]
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
