"""Buffer: a zero-copy view of one block of the arena, plus its Handle.

A Buffer is a slice of the one mapping of the arena this process holds, so
making one costs no system call. `view` is exactly the requested size, made
the first time it is asked for.

No view outlives its block in this process (the *pin* rule). The view a
Buffer hands out exports from a private slice of the mapping, its *pin*: every
slice, cast, numpy array or reader chunk made from the view keeps the pin
busy, and `pin.release()` raises BufferError exactly while one of them lives.
So a free (or recycle, or release) checks: the Buffer's own view and its pin
are released, and if that fails, views derived from them still live: the
block is *pinned* (the daemon is told, PIN) instead of reused, and the client
unpins it (UNPIN) once the pin object dies, from a weak reference's callback
(see client/registry.py). Either way the Buffer is done from then on: `view`,
`ndarray` and `handle` raise StaleHandle.
"""

from __future__ import annotations

from pickle import PickleBuffer
from typing import TYPE_CHECKING, Any

from shmarena.client import registry
from shmarena.errors import StaleHandle, lifetime_error
from shmarena.protocol import Handle
from shmarena.shm.segments import OFFSET_MASK, SEGMENT_SHIFT, SEGMENT_SPAN

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
        "_pin",
        "_state",
        "_cache",
        "_handle",
        "_sealed",
        "_owner",
        "_gone",
        "__weakref__",  # client/registry.py finds Buffers by address without keeping them
    )

    # _state: "owned" (allocated here), "attached" (no reference), "retained",
    # or "done" (freed, released, recycled; _gone says which). _cache: the
    # client cache it came from, if any. _handle: made when first read; from
    # then on another process may know the block. _view / _pin: the view
    # handed out and the slice it exports from, None until `view` is first
    # used. _owner: the owner's name when allocated through an Owner (None:
    # the session's own owner), so a recycle here finds its Buffers.

    def __init__(
        self,
        client: Client,
        epoch: int,
        offset: int,
        size: int,
        gen: int,
        state: str,
        cache: Cache | None,
    ) -> None:
        self._client = client
        self._epoch = epoch
        self._offset = offset
        self._size = size
        self._gen = gen
        self._view: memoryview | None = None
        self._pin: memoryview | None = None
        self._state = state
        self._cache = cache
        self._handle: Handle | None = None
        self._sealed = False
        self._owner: str | None = None
        self._gone = ""

    @property
    def handle(self) -> Handle:
        """Names this block for other processes (`client.attach(handle)`)."""
        handle = self._handle
        if handle is None:
            if self._state == "done":
                raise self._done_error("handle")
            cache = self._cache
            if cache is not None and not cache.escape(self._offset, self._gen):
                self._done("recycled")  # given back through another process
                raise self._done_error("handle")
            handle = self._make_handle()
        return handle

    def _make_handle(self) -> Handle:
        """The handle, unchecked: for letting go of a reference this process
        still holds on a block whose Buffer is done (a recycled, retained one)."""
        handle = self._handle
        if handle is None:
            address = self._offset
            handle = Handle(
                self._epoch, address >> SEGMENT_SHIFT, address & OFFSET_MASK, self._size, self._gen
            )
            self._handle = handle
        return handle

    @property
    def view(self) -> memoryview:
        """Writable memoryview of exactly `size` bytes, shared with every
        process that attaches the same handle. While it (or anything made
        from it) lives, a free of the block is deferred (see the module's
        docstring). StaleHandle once the Buffer was freed, released or its
        owner recycled."""
        view = self._view
        if view is not None:
            return view
        # The hot case inline: a block of this process's cache, in segment 0.
        offset, cache = self._offset, self._cache
        if cache is not None and offset < SEGMENT_SPAN and self._state == "owned":
            # Still out under our generation: not given back through another process.
            entry = cache.out.get(offset)
            if entry is not None and entry[0] == self._gen:
                pin = cache.view[offset : offset + self._size]
                # Exports from `pin`, so pin.release() fails while anything made from it lives.
                view = memoryview(PickleBuffer(pin))
                if self._sealed:
                    view = view.toreadonly()
                self._pin, self._view = pin, view
                cache.viewed[offset] = self  # so a recycle or a notice here finds it
                return view
        return self._make_view()

    def _make_view(self) -> memoryview:
        if self._state == "done":
            raise self._done_error("view")
        offset, size, cache, client = self._offset, self._size, self._cache, self._client
        if self._epoch != client.epoch:  # the mapping at hand is another arena's
            raise StaleHandle(
                f"Buffer.view: this Buffer is from arena epoch {self._epoch}, the daemon "
                f"{client.name!r} now serves epoch {client.epoch}: it was restarted and the "
                "block no longer exists; allocate a new buffer",
                epoch=self._epoch,
                daemon_epoch=client.epoch,
            )
        if cache is not None:
            entry = cache.out.get(offset)
            if entry is None or entry[0] != self._gen:
                # given back through another process, or its session closed
                self._done("closed" if client._closed else "recycled")
                raise self._done_error("view")
        if offset < SEGMENT_SPAN and client._arena_view is not None:
            pin = client._arena_view[offset : offset + size]
        else:
            pin = client._view_at(offset, size)
        # Exports from `pin`, so pin.release() fails while anything made from it lives.
        view = memoryview(PickleBuffer(pin))
        if self._sealed:
            view = view.toreadonly()
        self._pin, self._view = pin, view
        if self._state == "owned":
            client._viewed[offset] = self  # so a recycle or a notice here finds it
        return view

    def _release_views(self) -> memoryview | None:
        """Release this Buffer's own view and pin; the pin if views made from
        them still live (the block must stay pinned), else None."""
        view, pin = self._view, self._pin
        if view is None or pin is None:
            return None
        self._view = self._pin = None
        try:
            view.release()
            pin.release()
        except BufferError:
            return pin
        return None

    def _done_error(self, what: str) -> StaleHandle:
        gone = self._gone or "freed"  # "freed", "released", "recycled" or "closed"
        rule = "owner_recycled" if gone == "recycled" else "use_after_free"
        return lifetime_error(
            rule,
            f"Buffer.{what} of the buffer at offset {self.offset:#x} ({self._size} bytes)",
            f"it was {gone} already, so it has no bytes any more (its block may be another "
            "allocation's by now); views made before that stay valid: the block is pinned "
            "until the last of them is gone",
            offset=self._offset,
            generation=self._gen,
        )

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
        if self._view is not None:
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
            raise self._done_error("ndarray")
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
        view = self.view  # the array exports from it: it pins the block while it lives
        registry.register(self)  # so pickling names this block instead of copying it
        return np.frombuffer(view, dtype=dt, count=count).reshape(shape_t)

    def free(self) -> None:
        """Give the block back: to this process's cache if it came from there
        (no message), else to the daemon without waiting. While views made
        from `view` live in this process, the block is pinned instead and
        freed by itself once the last is gone. StaleHandle if it was freed or
        recycled already."""
        cache = self._cache
        if cache is not None and cache is self._client._cache:  # not the parent's, after fork
            cache.take_back(self)
        else:
            self._client._free_buffer(self)

    def release(self) -> None:
        """Drop this process's reference on an attached block (see
        `Client.attach(handle, retain=True)`)."""
        self._client.release(self)

    def _done(self, gone: str = "freed") -> None:
        """From now on the Buffer refuses `view`, `ndarray` and `handle`."""
        self._state = "done"
        self._gone = gone
        if self._view is not None:
            self._release_views()

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
