"""Reading a journal file (`shmarena.shm.journal.scan`): which damage is a torn
write a crash can leave (an incomplete last frame: dropped, and reported) and
which is not (a complete frame that fails its checksum or does not decode:
refused, naming the file, the byte and what to do). Real files in tmp_path."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from shmarena.errors import DaemonStartError
from shmarena.shm.journal import TABLE_FORMAT, encode_frame, scan

IDENTITY = b"i" * 16


def frames() -> list[bytes]:
    return [
        encode_frame({"k": "head", "format": TABLE_FORMAT, "identity": IDENTITY}),
        encode_frame({"k": "snap", "n": 1, "payload": "x" * 100}),
        encode_frame({"k": "delta", "n": 2, "payload": "y" * 100}),
        encode_frame({"k": "delta", "n": 3, "payload": "z" * 100}),
    ]


def write(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "arena.table"
    path.write_bytes(data)
    return str(path)


def test_an_intact_journal_reads_whole(tmp_path: Path) -> None:
    path = write(tmp_path, b"".join(frames()))
    found = scan(path)
    assert [r["n"] for r in found.records] == [1, 2, 3]
    assert (found.torn_bytes, found.problem) == (0, "")


@pytest.mark.parametrize("keep", [1, 5, 12, 40])
def test_an_incomplete_last_frame_is_a_torn_tail_and_dropped(tmp_path: Path, keep: int) -> None:
    whole = frames()
    good = b"".join(whole[:3])
    path = write(tmp_path, good + whole[3][:keep])
    found = scan(path)
    assert found.identity == IDENTITY
    assert [r["n"] for r in found.records] == [1, 2]
    assert (found.good_bytes, found.torn_bytes) == (len(good), keep)


def test_a_complete_last_frame_with_a_wrong_checksum_is_refused(tmp_path: Path) -> None:
    whole = frames()
    start = len(b"".join(whole[:3]))
    last = bytearray(whole[3])
    last[-5] ^= 0x01  # one bit of the payload
    path = write(tmp_path, b"".join(whole[:3]) + bytes(last))
    with pytest.raises(DaemonStartError) as caught:
        scan(path)
    message = str(caught.value)
    for words in (path, f"byte {start}", "checksum", "not a torn write", "untouched"):
        assert words in message, message


def test_a_complete_last_frame_that_does_not_decode_is_refused(tmp_path: Path) -> None:
    whole = frames()
    start = len(b"".join(whole[:3]))
    payload = b"\xc1"  # a byte msgpack never uses; its checksum is right
    bad = struct.pack("<4sII", b"SHJR", len(payload), zlib.crc32(payload)) + payload
    path = write(tmp_path, b"".join(whole[:3]) + bad)
    with pytest.raises(DaemonStartError) as caught:
        scan(path)
    message = str(caught.value)
    for words in (path, f"byte {start}", "does not decode", "untouched"):
        assert words in message, message
