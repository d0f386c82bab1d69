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

Its states and their changes are the table of client/lifecycle.py. A Buffer
knows its Client and the Cache it came from only as objects it was given:
this module imports neither.
"""

from __future__ import annotations

from pickle import PickleBuffer
from typing import TYPE_CHECKING, Any

from shmarena.client import registry
from shmarena.client.lifecycle import DONE, OWNED, RETAINED, State, move
from shmarena.errors import StaleHandle
from shmarena.protocol import Handle
from shmarena.shm.segments import OFFSET_MASK, SEGMENT_SHIFT, SEGMENT_SPAN

if TYPE_CHECKING:
    from shmarena.client.base import ClientBase
    from shmarena.client.cache import Cache

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
        "_address",
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

    # _state: a lifecycle.State, changed by lifecycle.move only (one inlined
    # exception: Buffer.free's hot path); _gone says how a done Buffer ended.
    # _address: segment << SEGMENT_SHIFT | offset. _cache: the
    # client cache it came from, if any. _handle: made when first read; from
    # then on another process may know the block. _view / _pin: the view
    # handed out and the slice it exports from, None until `view` is first
    # used. _owner: the owner's name when allocated through an Owner (None:
    # the session's own owner), so a recycle here finds its Buffers.

    def __init__(
        self,
        client: ClientBase,
        epoch: int,
        address: int,
        size: int,
        gen: int,
        state: State,
        cache: Cache | None,
    ) -> None:
        self._client = client
        self._epoch = epoch
        self._address = address
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
            move(self, "use", "handle")
            cache = self._cache
            if cache is not None and not cache.escape(self._address, self._gen):
                self._done("recycle")  # given back through another process
                move(self, "use", "handle")  # refused: it is done
            handle = self._make_handle()
        return handle

    def _make_handle(self) -> Handle:
        """The handle, unchecked: for letting go of a reference this process
        still holds on a block whose Buffer is done (a recycled, retained one)."""
        handle = self._handle
        if handle is None:
            address = self._address
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
        address, cache = self._address, self._cache
        if cache is not None and address < SEGMENT_SPAN and self._state is OWNED:
            # Still out under our generation: not given back through another process.
            entry = cache.out.get(address)
            if entry is not None and entry[0] == self._gen:
                pin = cache.view[address : address + self._size]
                # Exports from `pin`, so pin.release() fails while anything made from it lives.
                view = memoryview(PickleBuffer(pin))
                if self._sealed:
                    view = view.toreadonly()
                self._pin, self._view = pin, view
                self._client._viewed[address] = self  # so a recycle or a notice here finds it
                return view
        return self._make_view()

    def _make_view(self) -> memoryview:
        move(self, "use", "view")
        address, size, cache, client = self._address, self._size, self._cache, self._client
        if self._epoch != client.epoch:  # the mapping at hand is another arena's
            raise StaleHandle(
                f"Buffer.view: this Buffer is from arena epoch {self._epoch}, the daemon "
                f"{client.name!r} now serves epoch {client.epoch}: it was restarted and the "
                "block no longer exists; allocate a new buffer",
                epoch=self._epoch,
                daemon_epoch=client.epoch,
            )
        if cache is not None and not cache.is_out(address, self._gen):
            # given back through another process, or its session closed
            self._done("close" if client._closed else "recycle")
            move(self, "use", "view")  # refused: it is done
        if address < SEGMENT_SPAN and client._arena_view is not None:
            pin = client._arena_view[address : address + size]
        else:
            pin = client._view_at(address, size)
        # Exports from `pin`, so pin.release() fails while anything made from it lives.
        view = memoryview(PickleBuffer(pin))
        if self._sealed:
            view = view.toreadonly()
        self._pin, self._view = pin, view
        if self._state is OWNED:
            client._viewed[address] = self  # so a recycle or a notice here finds it
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

    @property
    def size(self) -> int:
        """The size asked for, in bytes (the block may be larger)."""
        return self._size

    @property
    def offset(self) -> int:
        """Where the block starts in its segment."""
        return self._address & OFFSET_MASK

    @property
    def segment(self) -> int:
        """The arena segment the block lies in (0 unless the arena grew)."""
        return self._address >> SEGMENT_SHIFT

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
        """Attached with a reference this process holds (`release()` drops it)."""
        return self._state == RETAINED

    def ndarray(self, shape: Any = None, dtype: Any = "uint8") -> Any:
        """A numpy array over the same bytes (no copy). `shape` defaults to as
        many items of `dtype` as fit. Needs numpy (`pip install shmarena[numpy]`)."""
        try:
            import numpy as np
        except ImportError:
            raise ImportError("Buffer.ndarray needs numpy: pip install 'shmarena[numpy]'") from None
        move(self, "use", "ndarray")
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
        cache, client = self._cache, self._client
        if cache is None or cache is not client._cache:  # not the parent's, after fork
            client._free_buffer(self)
            return
        if self._handle is not None or self._state is not OWNED:
            client._take_back(self, cache)  # its handle may be elsewhere, or it is done
            return
        view = self._view
        if view is not None:  # views were made: they may outlive the Buffer
            pin = self._pin
            self._view = self._pin = None
            client._viewed.pop(self._address, None)
            try:
                view.release()
                pin.release()  # type: ignore[union-attr]
            except BufferError:  # views made from them live on: the block is pinned
                self._view, self._pin = view, pin
                client._take_back(self, cache)
                return
        # The hot path: the table's ("owned", "free") -> "done", inlined (the
        # state was just checked). The cache refuses a block that is not out
        # under our generation.
        cache.give_back(self._address, self._gen)
        self._state = DONE

    def release(self) -> None:
        """Drop this process's reference on an attached block (see
        `Client.attach(handle, retain=True)`)."""
        self._client.release(self)

    def _done(self, event: str = "free") -> None:
        """End the Buffer by `event` ("free", "release", "recycle", "close";
        see lifecycle.py): from now on it refuses `view`, `ndarray` and `handle`."""
        move(self, event)
        if self._view is not None:
            self._release_views()

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._state == OWNED:
            self.free()
        elif self._state == RETAINED:
            self.release()

    def __repr__(self) -> str:
        where = f"segment={self.segment} " if self.segment else ""
        return f"<shmarena.Buffer {self._state} {where}offset={self.offset:#x} size={self._size}>"
