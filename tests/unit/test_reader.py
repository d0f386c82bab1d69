"""BufferReader: a chain of buffers read as one stream, checked against
io.BytesIO over the joined bytes for random chunkings and random calls."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmarena import BufferReader
from shmarena.client.registry import address_of

KINDS = ("bytes", "bytearray", "memoryview", "uint8", "int32", "fortran")


def as_kind(data: bytes, kind: str) -> object:
    """`data` as a buffer of the given kind, with the same bytes in memory order."""
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(bytearray(data))
    if kind == "uint8":
        return np.frombuffer(data, dtype=np.uint8).copy()
    if kind == "int32" and len(data) % 4 == 0:
        return np.frombuffer(data, dtype="<i4").copy().reshape(-1, 1)
    if kind == "fortran" and len(data) % 2 == 0 and len(data) > 0:
        # A Fortran-ordered (2, n) array whose memory holds `data` in order.
        return np.frombuffer(data, dtype=np.uint8).copy().reshape(-1, 2).T
    return data


@st.composite
def chunked(draw: st.DrawFn) -> tuple[bytes, list[object]]:
    pieces = draw(st.lists(st.binary(max_size=40), max_size=8))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=len(pieces), max_size=len(pieces)))
    return b"".join(pieces), [as_kind(p, k) for p, k in zip(pieces, kinds, strict=True)]


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.integers(-1, 50)),
        st.tuples(st.just("readinto"), st.integers(0, 50)),
        st.tuples(st.just("readview"), st.integers(-1, 50)),
        st.tuples(st.just("seek"), st.integers(0, 2), st.integers(-60, 60)),
        st.tuples(st.just("chunk"), st.integers(1, 30)),
        st.tuples(st.just("next")),
        st.tuples(st.just("readline")),
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(chunked(), OPS)
def test_any_calls_on_any_chunking_read_like_bytesio(case, ops) -> None:
    joined, buffers = case
    reader, model = BufferReader(buffers), io.BytesIO(joined)
    assert len(reader) == reader.nbytes == len(joined)
    for op, *args in ops:
        if op == "read":
            assert reader.read(args[0]) == model.read(args[0])
        elif op == "readinto":
            mine, theirs = bytearray(args[0]), bytearray(args[0])
            assert reader.readinto(mine) == model.readinto(theirs)
            assert mine == theirs
        elif op == "readview":
            assert bytes(reader.readview(args[0])) == model.read(args[0])
        elif op == "seek":
            whence, offset = args
            target = {0: 0, 1: model.tell(), 2: len(joined)}[whence] + offset
            if target < 0:
                with pytest.raises(ValueError, match="before the start"):
                    reader.seek(offset, whence)
            else:
                assert reader.seek(offset, whence) == model.seek(offset, whence)
        elif op == "chunk":
            chunk = next(reader.chunks(args[0]), memoryview(b""))
            assert 0 < chunk.nbytes <= args[0] or model.tell() >= len(joined)
            assert bytes(chunk) == model.read(chunk.nbytes)
        elif op == "next":
            chunk = next(reader, None)
            expect = model.read(chunk.nbytes) if chunk is not None else model.read()
            assert (bytes(chunk) if chunk is not None else b"") == expect
        elif op == "readline":
            assert reader.readline() == model.readline()
        assert reader.tell() == model.tell()
    assert reader.read() == model.read()


@settings(max_examples=200, deadline=None)
@given(chunked(), st.integers(0, 300))
def test_iterating_from_any_position_yields_the_rest_in_original_memory(case, start) -> None:
    joined, buffers = case
    reader = BufferReader(buffers)
    reader.seek(start)
    chunks = list(reader)
    assert b"".join(bytes(c) for c in chunks) == joined[start:]
    assert all(c.nbytes > 0 for c in chunks) and reader.tell() == max(start, len(joined))
    assert list(reader) == []


@settings(max_examples=200, deadline=None)
@given(chunked(), st.integers(1, 64))
def test_chunks_of_at_most_max_bytes_cover_the_stream(case, max_bytes) -> None:
    joined, buffers = case
    chunks = list(BufferReader(buffers).chunks(max_bytes))
    assert b"".join(bytes(c) for c in chunks) == joined
    assert all(0 < c.nbytes <= max_bytes for c in chunks)


def test_chunks_and_readview_within_one_buffer_are_slices_of_it() -> None:
    first, second = bytearray(b"abcdefgh"), np.arange(16, dtype=np.uint8)
    reader = BufferReader([first, second])
    head = next(reader)
    assert address_of(head) == address_of(first) and head.nbytes == 8
    reader.seek(10)
    view = reader.readview(4)
    assert address_of(view) == address_of(second) + 2 and view.readonly
    second[2] = 99  # the view sees the original memory change
    assert view[0] == 99


def test_readview_across_buffers_is_a_joined_copy() -> None:
    first, second = bytearray(b"abcd"), bytearray(b"efgh")
    reader = BufferReader([first, second])
    reader.seek(2)
    view = reader.readview(4)
    assert bytes(view) == b"cdef" and reader.tell() == 6
    first[2] = ord("X")
    assert bytes(view) == b"cdef"  # a copy: not affected


def test_readinto_copies_only_into_the_callers_buffer_across_boundaries() -> None:
    reader = BufferReader([b"ab", b"", b"cde", bytearray(b"f")])
    target = np.zeros(2, dtype="<u4")  # a buffer of another format: written as bytes
    assert reader.readinto(target) == 6
    assert target.tobytes()[:6] == b"abcdef"


def test_empty_reader_and_empty_buffers() -> None:
    reader = BufferReader([b"", bytearray(), memoryview(b"")])
    assert len(reader) == 0 and reader.read() == b"" and list(reader) == []
    assert reader.readview(10).nbytes == 0 and reader.readinto(bytearray(3)) == 0


def test_a_fortran_array_is_read_in_memory_order() -> None:
    a = np.asfortranarray(np.arange(6, dtype=np.uint8).reshape(2, 3))
    assert BufferReader([a]).read() == a.tobytes(order="F")


def test_a_non_contiguous_buffer_is_refused_with_the_remedy() -> None:
    strided = np.arange(10, dtype=np.uint8)[::2]
    with pytest.raises(ValueError, match=r"buffer #1 .*not contiguous.*ascontiguousarray"):
        BufferReader([b"ok", strided])


def test_stream_protocol_flags_and_close() -> None:
    reader = BufferReader([b"abc"])
    assert reader.readable() and reader.seekable() and not reader.writable()
    assert isinstance(reader, io.RawIOBase)
    chunk = next(iter(BufferReader([b"xyz"])))
    reader.close()
    for call in (reader.read, reader.tell, lambda: reader.seek(0), reader.readview):
        with pytest.raises(ValueError, match="closed"):
            call()
    assert bytes(chunk) == b"xyz"  # chunks handed out stay valid


def test_seek_rejects_a_bad_whence() -> None:
    with pytest.raises(ValueError, match="whence"):
        BufferReader([b"abc"]).seek(0, 7)


def test_works_with_buffered_reader_and_readall() -> None:
    parts = [bytes([i]) * (i * 37 % 200 + 1) for i in range(50)]
    buffered = io.BufferedReader(BufferReader(parts), buffer_size=64)
    assert buffered.read(10) == b"".join(parts)[:10]
    assert buffered.read() == b"".join(parts)[10:]
    assert BufferReader(parts).readall() == b"".join(parts)
