"""BufferReader: one readable, seekable byte stream over a chain of buffers,
read in order without ever joining them.

It holds a byte memoryview of each buffer (a shmarena Buffer's `view`, or
any object with the buffer protocol: bytes, bytearray, memoryview, numpy
arrays) and a position in the logical stream they make end to end. The only
copies are those the caller asks for: `readinto` copies into the caller's
buffer, `read` into a new bytes object, and `readview` when the bytes it is
asked for span two buffers. Iteration, `chunks` and a `readview` within one
buffer hand out slices of the original memory.
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["BufferReader"]


def _byte_view(obj: Any, index: int) -> memoryview:
    """A flat, unsigned-byte memoryview of `obj`'s memory, in memory order."""
    from shmarena.client.buffer import Buffer

    if isinstance(obj, Buffer):
        obj = obj.view
    view = obj if isinstance(obj, memoryview) else memoryview(obj)
    if view.nbytes == 0:
        return memoryview(b"")  # a view with a zero in its shape cannot be cast
    if view.format == "B" and view.ndim == 1 and view.contiguous:
        return view
    if view.c_contiguous:
        return view.cast("B")
    if view.f_contiguous and hasattr(obj, "__array_interface__"):
        # A Fortran-ordered array's transpose is C-contiguous over the same bytes.
        return memoryview(obj.T).cast("B")
    raise ValueError(
        f"BufferReader: buffer #{index} ({type(obj).__name__}, shape {view.shape}, strides "
        f"{view.strides}) is not contiguous, so its bytes are not one run of memory; pass a "
        "contiguous copy (numpy.ascontiguousarray(x)) or the array it is a view of"
    )


class BufferReader(io.RawIOBase):
    """A read-only, seekable binary stream over `buffers` taken end to end,
    without joining them: Buffers, memoryviews, bytes, bytearrays, numpy arrays
    (any contiguous buffer-protocol object). `read`, `readinto`, `readall`,
    `readline`, `seek` and `tell` work on the logical stream; iterating yields
    zero-copy memoryview chunks (the rest of each buffer) from the current
    position, advancing it; `chunks(max_bytes)` does the same in pieces of at
    most `max_bytes`; `readview(n)` returns the next n bytes as a memoryview,
    a slice of the original memory when they lie in one buffer and a joined
    copy when they span several. `len(reader)` and `nbytes` are the total size.
    The reader keeps the buffers alive until it is closed; chunks it handed
    out stay valid after that, as they hold their memory themselves."""

    def __init__(self, buffers: Iterable[Any]) -> None:
        super().__init__()
        views = [_byte_view(b, i) for i, b in enumerate(buffers)]
        # Empty buffers add nothing to the stream; leaving them out means every
        # buffer in _views has at least one byte, which the lookups rely on.
        self._views = [v for v in views if v.nbytes]
        self._starts: list[int] = []
        total = 0
        for view in self._views:
            self._starts.append(total)
            total += view.nbytes
        self._nbytes = total
        self._pos = 0

    @property
    def nbytes(self) -> int:
        """The length of the whole stream in bytes (wherever the position is)."""
        return self._nbytes

    def __len__(self) -> int:
        return self._nbytes

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on a closed BufferReader")

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move to `offset` from the start (SEEK_SET), the current position
        (SEEK_CUR) or the end (SEEK_END); past the end is allowed and reads
        nothing there. Returns the new position."""
        self._check_open()
        if whence == io.SEEK_SET:
            base = 0
        elif whence == io.SEEK_CUR:
            base = self._pos
        elif whence == io.SEEK_END:
            base = self._nbytes
        else:
            raise ValueError(f"BufferReader.seek: whence must be 0, 1 or 2, not {whence!r}")
        pos = base + offset.__index__()
        if pos < 0:
            raise ValueError(
                f"BufferReader.seek: position {pos} (offset {offset} from {base}) is before "
                "the start of the stream"
            )
        self._pos = pos
        return pos

    def _locate(self, pos: int) -> tuple[int, int]:
        """The buffer holding stream position `pos` (< nbytes), and where in it."""
        i = bisect.bisect_right(self._starts, pos) - 1
        return i, pos - self._starts[i]

    def readinto(self, b: Any) -> int:
        """Copy up to len(b) bytes from the position into `b`, across buffer
        boundaries; returns how many (0 at the end)."""
        self._check_open()
        target = memoryview(b)
        if target.format != "B" or target.ndim != 1:
            target = target.cast("B")
        want = min(target.nbytes, self._nbytes - self._pos)
        if want <= 0:
            return 0
        i, within = self._locate(self._pos)
        done = 0
        while done < want:
            view = self._views[i]
            step = min(view.nbytes - within, want - done)
            target[done : done + step] = view[within : within + step]
            done += step
            i, within = i + 1, 0
        self._pos += done
        return done

    def readview(self, n: int = -1) -> memoryview:
        """The next `n` bytes (all the rest if n < 0; fewer at the end) as a
        read-only memoryview, advancing the position: a slice of the original
        buffer when they lie in one, else a copy joining them."""
        self._check_open()
        left = max(self._nbytes - self._pos, 0)
        n = left if n < 0 else min(n, left)
        if n == 0:
            return memoryview(b"")
        i, within = self._locate(self._pos)
        view = self._views[i]
        if within + n <= view.nbytes:
            self._pos += n
            return view[within : within + n].toreadonly()
        joined = bytearray(n)
        self.readinto(joined)
        return memoryview(joined).toreadonly()

    def chunks(self, max_bytes: int | None = None) -> Iterator[memoryview]:
        """Zero-copy memoryview slices of the buffers from the position to the
        end, each the rest of one buffer or at most `max_bytes`, advancing the
        position as each is handed out (so a seek in between is followed)."""
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"BufferReader.chunks: max_bytes must be positive, not {max_bytes}")
        while True:
            chunk = self._next_chunk(max_bytes)
            if chunk is None:
                return
            yield chunk

    def _next_chunk(self, max_bytes: int | None) -> memoryview | None:
        self._check_open()
        if self._pos >= self._nbytes:
            return None
        i, within = self._locate(self._pos)
        view = self._views[i]
        end = view.nbytes if max_bytes is None else min(view.nbytes, within + max_bytes)
        self._pos += end - within
        return view[within:end]

    def __iter__(self) -> Iterator[memoryview]:  # type: ignore[override]
        self._check_open()
        return self

    def __next__(self) -> memoryview:  # type: ignore[override]
        chunk = self._next_chunk(None)
        if chunk is None:
            raise StopIteration
        return chunk

    def close(self) -> None:
        """Close the stream and drop its references to the buffers (so their
        blocks can be freed); chunks already handed out stay valid."""
        super().close()
        self._views = []
        self._starts = []

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"at {self._pos}"
        return f"<shmarena.BufferReader {len(self._views)} buffers, {self._nbytes} bytes, {state}>"
