"""Buffer: a zero-copy view of one block of the arena, plus its Handle.

A Buffer is a slice of the one mapping of the arena this process holds, so
making one costs no system call. `view` is exactly the requested size. After
`free()` the Buffer's own view is released, so using it raises instead of
silently touching memory that may belong to someone else by then (views the
caller derived from it cannot be revoked: drop them first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shmarena.client import registry
from shmarena.protocol import Handle
from shmarena.shm.segments import OFFSET_MASK, SEGMENT_SHIFT

if TYPE_CHECKING:
    from shmarena.client.cache import Cache
    from shmarena.client.client import Client

__all__ = ["Buffer", "Handle"]


class Buffer:
    """One block of the arena as a writable memoryview.

    `handle` names it for other processes (`client.attach(handle)`). Free it
    with `free()` (or `client.free(buf)`, or by recycling its owner); an
    attached, retained Buffer is let go with `release()`.
    """

    __slots__ = (
        "_client",
        "_epoch",
        "_offset",
        "_size",
        "_gen",
        "_view",
        "_state",
        "_cache",
        "_handle",
        "_sealed",
        "__weakref__",  # client/registry.py finds Buffers by address without keeping them
    )

    # _state: "owned" (allocated here), "attached" (no reference), "retained",
    # or "done" (freed or released). _cache: the client cache it came from, if
    # any. _handle: made when first read; from then on another process may
    # know the block.

    def __init__(
        self,
        client: Client,
        epoch: int,
        offset: int,
        size: int,
        gen: int,
        view: memoryview,
        state: str,
        cache: Cache | None,
    ) -> None:
        self._client = client
        self._epoch = epoch
        self._offset = offset
        self._size = size
        self._gen = gen
        self._view = view
        self._state = state
        self._cache = cache
        self._handle: Handle | None = None
        self._sealed = False

    @property
    def handle(self) -> Handle:
        """Names this block for other processes (`client.attach(handle)`)."""
        handle = self._handle
        if handle is None:
            if self._cache is not None:
                self._cache.escape(self._offset, self._gen)
            address = self._offset
            handle = Handle(
                self._epoch, address >> SEGMENT_SHIFT, address & OFFSET_MASK, self._size, self._gen
            )
            self._handle = handle
        return handle

    @property
    def view(self) -> memoryview:
        """Writable memoryview of exactly `size` bytes, shared with every
        process that attaches the same handle."""
        return self._view

    @property
    def size(self) -> int:
        return self._size

    @property
    def offset(self) -> int:
        """Where the block starts in its segment."""
        return self._offset & OFFSET_MASK

    @property
    def segment(self) -> int:
        """The arena segment the block lies in (0 unless the arena grew)."""
        return self._offset >> SEGMENT_SHIFT

    @property
    def sealed(self) -> bool:
        """Published sealed (`client.publish`): its views are read-only."""
        return self._sealed

    def _seal(self) -> None:
        self._sealed = True
        self._view = self._view.toreadonly()

    @property
    def retained(self) -> bool:
        return self._state == "retained"

    def ndarray(self, shape: Any = None, dtype: Any = "uint8") -> Any:
        """A numpy array over the same bytes (no copy). `shape` defaults to as
        many items of `dtype` as fit. Needs numpy (`pip install shmarena[numpy]`)."""
        try:
            import numpy as np
        except ImportError:
            raise ImportError("Buffer.ndarray needs numpy: pip install 'shmarena[numpy]'") from None
        if self._state == "done":
            raise ValueError("the buffer was freed or released: it has no bytes to view")
        dt = np.dtype(dtype)
        if shape is None:
            count = self._size // dt.itemsize
            shape_t: tuple[int, ...] = (count,)
        else:
            shape_t = (shape,) if isinstance(shape, int) else tuple(shape)
            count = 1
            for dim in shape_t:
                count *= dim
            if count * dt.itemsize > self._size:
                raise ValueError(
                    f"shape {shape_t} of {dt} needs {count * dt.itemsize} bytes, "
                    f"the buffer has {self._size}"
                )
        registry.register(self)  # so pickling names this block instead of copying it
        start = self._offset & OFFSET_MASK
        base = self._client._ndarray_base(self._offset >> SEGMENT_SHIFT)
        raw = base[start : start + count * dt.itemsize]
        array = raw.view(dt).reshape(shape_t)
        if self._sealed:
            array.flags.writeable = False
        return array

    def free(self) -> None:
        """Give the block back: to this process's cache if it came from there
        (no message), else to the daemon without waiting. StaleHandle if it was
        freed or recycled already."""
        cache = self._cache
        if cache is not None and cache is self._client._cache:  # not the parent's, after fork
            cache.take_back(self)
        else:
            self._client._free_buffer(self)

    def release(self) -> None:
        """Drop this process's reference on an attached block (see
        `Client.attach(handle, retain=True)`)."""
        self._client.release(self)

    def _done(self) -> None:
        self._state = "done"
        try:
            self._view.release()
        except BufferError:
            pass  # the caller still holds a view made from ours

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._state == "owned":
            self.free()
        elif self._state == "retained":
            self.release()

    def __repr__(self) -> str:
        where = f"segment={self.segment} " if self.segment else ""
        return f"<shmarena.Buffer {self._state} {where}offset={self.offset:#x} size={self._size}>"
