"""Message shapes: what parse_request accepts and how it refuses."""

from __future__ import annotations

import msgpack
import pytest

from shmarena.errors import InvalidRequest, ProtocolError
from shmarena.limits import MAX_BATCH
from shmarena.protocol import Handle, Op, decode, encode, parse_request


def test_alloc_request_parses_with_defaults() -> None:
    request = parse_request([int(Op.ALLOC), 7, 4096])
    assert request == (Op.ALLOC, 7, (4096, None, False, 0.0, ""))


def test_handles_become_handle_tuples() -> None:
    request = parse_request([int(Op.FREE), 1, [[5, 0, 4096, 100, 3]]])
    assert request.args[0] == [Handle(5, 0, 4096, 100, 3)]


@pytest.mark.parametrize(
    "message",
    [
        None,
        [],
        [1],
        "hello",
        {"op": 1},
        [int(Op.PING), "not-an-id"],
    ],
)
def test_not_a_request_is_a_protocol_error(message: object) -> None:
    with pytest.raises(ProtocolError):
        parse_request(message)


@pytest.mark.parametrize(
    "message",
    [
        [999, 1],
        [-1, 1],
        [int(Op.ALLOC), 1],
        [int(Op.ALLOC), 1, "4096"],
        [int(Op.ALLOC), 1, 4096.0],
        [int(Op.ALLOC), 1, True],
        [int(Op.ALLOC), 1, 4096, 17],
        [int(Op.ALLOC), 1, 4096, None, "yes"],
        [int(Op.ALLOC), 1, 4096, None, False, "extra"],
        [int(Op.FREE), 1, [[1, 2, 3]]],
        [int(Op.FREE), 1, [[1, 2, 3, 4, "5"]]],
        [int(Op.ALLOC_MANY), 1, [1] * (MAX_BATCH + 1)],
        [int(Op.RECYCLE), 1, b"bytes-not-str"],
    ],
)
def test_bad_arguments_are_invalid_requests(message: list[object]) -> None:
    with pytest.raises(InvalidRequest):
        parse_request(message)


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xc1", b"\x92\x01", b"\xd9\x02\xff\xfe", b"\x80\x04\x95junk-pickle."],
)
def test_undecodable_frames_are_protocol_errors(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(payload)


def test_extension_types_are_refused() -> None:
    payload = msgpack.packb(msgpack.ExtType(42, b"x"))
    with pytest.raises(ProtocolError, match="extension type 42"):
        decode(payload)


def test_round_trip() -> None:
    message = [int(Op.ALLOC), 3, 65536, "batch-1", True]
    assert decode(encode(message)) == message
