"""The hand-made frame of a small all-in-band Queue message (shmarena/pickling.py)
is byte for byte msgpack's, and its reader refuses anything else."""

from __future__ import annotations

import msgpack
import pytest

from shmarena.pickling import _FORMAT, _in_band_payload, _in_band_stream


@pytest.mark.parametrize("size", [0, 1, 255, 256, 1040, 65535, 65536, 70_000])
def test_an_in_band_payload_is_msgpacks_and_reads_back(size: int) -> None:
    stream = bytes(i % 251 for i in range(size))
    payload = _in_band_payload(stream)
    assert payload == msgpack.packb([_FORMAT, stream, None, []], use_bin_type=True)
    found = _in_band_stream(payload)
    assert found is not None and bytes(found) == stream


def test_other_payloads_are_not_read_as_in_band() -> None:
    good = _in_band_payload(b"abc")
    others = [
        b"",
        good[:-1],
        good + b"\x00",
        good[:3] + b"\x09" + good[4:],  # a length past the end
        msgpack.packb([_FORMAT, b"abc", None, [0, 0, 3, 1]], use_bin_type=True),
        msgpack.packb([_FORMAT + 1, b"abc", None, []], use_bin_type=True),
        msgpack.packb([_FORMAT, "abc", None, []], use_bin_type=True),  # str, not bin
    ]
    for payload in others:
        assert _in_band_stream(payload) is None, payload
