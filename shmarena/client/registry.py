"""Which arena block a piece of memory lies in, and memory that lets go of
its block when the last view of it is gone.

The registry maps the blocks this process made Buffers for (direct allocs,
attaches, `Buffer.ndarray`, `client.ndarray`, unpickled buffers) by where they
lie in their segment's mapping, so pickling and `share` can tell that an
array's bytes are already in the arena and name them by handle instead of
copying them. Entries hold weak references: the registry never keeps a Buffer
alive, and an entry disappears with its Buffer.

`export(buf, ...)` wraps a Buffer's bytes in a buffer exporter (a ctypes array
over the same address that keeps the Buffer) whose finalizer runs when the
last memoryview, numpy array or pyarrow buffer made from it is gone. The
finalizer must never take a lock or talk to the daemon (it may run inside any
code, a lock holder's included): it only puts the Buffer on a SimpleQueue
(documented as safe in finalizers), and one thread per process sends the
releases and frees. The weak-reference callbacks that unpin a block when the
last view of it dies (client/buffer.py, the pin rule) queue their work here
the same way (`queue_unpin`).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import os
import queue
import threading
import weakref
from typing import TYPE_CHECKING, Any

from shmarena.client.lifecycle import ATTACHED, DONE, LIVE_STATES, OWNED, State
from shmarena.client.mappings import MAPPINGS
from shmarena.protocol import Op
from shmarena.shm.segments import OFFSET_MASK, SEGMENT_SHIFT

if TYPE_CHECKING:
    from shmarena.client.buffer import Buffer
    from shmarena.client.client import Client

__all__ = [
    "LIVE_STATES",
    "address_of",
    "export",
    "find",
    "mapping_ranges",
    "queue_unpin",
    "register",
    "start_worker",
]


# -- addresses ---------------------------------------------------------------


class _PyBuffer(ctypes.Structure):
    # The C Py_buffer struct (stable since Python 3.3).
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.py_object),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.POINTER(ctypes.c_ssize_t)),
        ("strides", ctypes.POINTER(ctypes.c_ssize_t)),
        ("suboffsets", ctypes.POINTER(ctypes.c_ssize_t)),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None
_PYBUF_SIMPLE = 0
_PYBUF_ANY_CONTIGUOUS = 0x0080 | 0x0040 | 0x0020 | 0x0008  # C|F|ANY contiguous, with strides


def address_of(obj: Any) -> int:
    """The address of the first byte of a contiguous buffer-protocol object.
    The export is released before this returns, so nothing stays pinned."""
    view = _PyBuffer()
    _get_buffer(obj, ctypes.byref(view), _PYBUF_SIMPLE)
    try:
        return int(view.buf or 0)
    finally:
        _release_buffer(ctypes.byref(view))


# -- the registry ------------------------------------------------------------

# mapping key -> {offset in segment: weakrefs to the Buffers over that block};
# sorted offsets per key, rebuilt when the dict changed (lookups are rare,
# registrations are not). One block may have several live Buffers in a
# process (its owner's, and a retained one from attaching its own share):
# each is kept, so the entry outlives whichever of them dies first.
_BLOCKS: dict[tuple[str, int], dict[int, list[weakref.ref[Buffer]]]] = {}
_SORTED: dict[tuple[str, int], list[int]] = {}
# mapping key -> (the mapping's memoryview, its address), to notice a remap
_BASES: dict[tuple[str, int], tuple[memoryview, int]] = {}


def register(buf: Buffer) -> None:
    """Remember where `buf`'s block lies, so that memory inside it is found
    by `find`. Costs a dict insert and a weak reference."""
    key = buf._client._keys.get(buf._address >> SEGMENT_SHIFT)
    if key is None:
        return
    offset = buf._address & OFFSET_MASK
    blocks = _BLOCKS.get(key)
    if blocks is None:
        blocks = _BLOCKS[key] = {}
    refs = blocks.get(offset)
    if refs is not None and any(ref() is buf for ref in refs):
        return

    def forget(
        ref: weakref.ref[Buffer],
        blocks: dict[int, Any] = blocks,
        sorted_offsets: dict[tuple[str, int], list[int]] = _SORTED,  # globals may be gone at exit
    ) -> None:
        # Runs when the Buffer dies, anywhere: plain dict and list operations only.
        refs = blocks.get(offset)
        if refs is None:
            return
        refs[:] = [r for r in refs if r is not ref]
        if not refs and blocks.get(offset) is refs:
            del blocks[offset]
            sorted_offsets.pop(key, None)

    if refs is None:
        refs = blocks[offset] = []
        _SORTED.pop(key, None)
    refs.append(weakref.ref(buf, forget))


def _base(key: tuple[str, int]) -> tuple[int, int] | None:
    found = MAPPINGS.get(key)
    if found is None:
        return None
    view = found[1]
    known = _BASES.get(key)
    if known is None or known[0] is not view:
        known = _BASES[key] = (view, address_of(view))
    return known[1], len(view)


def mapping_ranges() -> list[tuple[int, int]]:
    """(start, end) addresses of every arena segment this process has mapped."""
    ranges = []
    for key in list(MAPPINGS):
        base = _base(key)
        if base is not None:
            ranges.append((base[0], base[0] + base[1]))
    return ranges


def find(
    address: int, nbytes: int, states: tuple[State, ...] = (OWNED, ATTACHED)
) -> tuple[Buffer, int] | None:
    """The live registered Buffer whose block holds the bytes [address,
    address + nbytes), and where they start in it; None if no such block is
    known (the memory is elsewhere, or in a block made without a Buffer that
    registered). Only Buffers in one of `states` count."""
    for key in list(_BLOCKS):
        base = _base(key)
        if base is None or not base[0] <= address < base[0] + base[1]:
            continue
        blocks = _BLOCKS[key]
        offsets = _SORTED.get(key)
        if offsets is None:
            offsets = _SORTED[key] = sorted(blocks)
        local = address - base[0]
        i = bisect.bisect_right(offsets, local)
        while i > 0:  # the nearest start below may be a dead entry: look further down
            i -= 1
            live = [b for b in map(_deref, blocks.get(offsets[i], ())) if b is not None]
            if not live:
                continue
            start = local - offsets[i]
            for buf in live:
                if start + nbytes <= buf._size and buf._state in states:
                    return buf, start
            if start < live[0]._size:
                return None  # inside a live block, but not wholly, or not usable
        return None
    return None


def _deref(ref: weakref.ref[Buffer]) -> Buffer | None:
    buf = ref()
    return None if buf is None or buf._state == DONE else buf


# -- exporters that let go of their block ------------------------------------

# ("release" | "free", Buffer), or ("unpin", (client, session, address, generation))
_ACTIONS: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
_WORKER: list[Any] = [None, 0]  # thread, pid it runs in
_WORKER_LOCK = threading.Lock()
_CLASSES: dict[int, Any] = {}


def _exporter_class(size: int) -> Any:
    """A ctypes array class of `size` bytes whose instances queue their
    action (see `export`) when they die."""
    cls = _CLASSES.get(size)
    if cls is None:

        class Exporter(ctypes.c_char * size):  # type: ignore[misc]
            # `_then`: "release", "free" or "" (nothing to do); `_pid`: the
            # process that may act on the Buffer (not a forked child).
            def __del__(self) -> None:
                then = self.__dict__.get("_then")
                if then and self._pid == os.getpid():
                    _ACTIONS.put((then, self._buf))

        cls = Exporter
        if len(_CLASSES) < 1024:
            _CLASSES[size] = cls
    return cls


def export(buf: Buffer, then: str = "") -> memoryview:
    """A writable byte memoryview of `buf`'s whole block that keeps `buf` (and
    so the mapping) alive. When the last view derived from it is gone,
    `then` = "release" releases the Buffer, "free" frees it, "" does nothing;
    both happen on a worker thread, shortly after."""
    if then:
        start_worker()
    view = buf.view
    exporter = _exporter_class(buf._size).from_address(address_of(view))
    exporter._buf = buf
    exporter._pin = view[:]  # the mapping stays even if buf's own view is released
    exporter._pid = os.getpid()
    exporter._then = then
    return memoryview(exporter).cast("B")


def queue_unpin(client: Client, session: int, address: int, generation: int) -> None:
    """For a weak reference's callback: have the worker unpin a block. Takes
    no lock (SimpleQueue.put is safe anywhere)."""
    _ACTIONS.put(("unpin", (client, session, address, generation)))


def start_worker() -> None:
    thread, pid = _WORKER
    if thread is not None and pid == os.getpid() and thread.is_alive():
        return
    with _WORKER_LOCK:
        thread, pid = _WORKER
        if thread is not None and pid == os.getpid() and thread.is_alive():
            return
        thread = threading.Thread(target=_work, name="shmarena-release", daemon=True)
        _WORKER[:] = [thread, os.getpid()]
        thread.start()


def _work() -> None:
    """Send what finalizers queued: releases batched per client (one round
    trip for many), frees one by one (they cost no round trip)."""
    me = os.getpid()
    while True:
        batch = [_ACTIONS.get()]
        if os.getpid() != me:
            return
        # This thread is the queue's only reader: not empty, get_nowait succeeds.
        while len(batch) < 1024 and not _ACTIONS.empty():
            batch.append(_ACTIONS.get_nowait())
        releases: dict[int, list[Buffer]] = {}
        for then, buf in batch:
            if then == "unpin":
                client, session, address, generation = buf
                # Failing, the client is gone or closing: so is its session, and its pins.
                with contextlib.suppress(Exception):
                    client._unpin(session, address, generation)
                continue
            if buf._client._closed:
                continue
            # A recycle here makes a Buffer done, but a reference it holds
            # (a retain) is still this process's to release.
            if buf._state == DONE and (then == "free" or buf._gone != "recycled"):
                continue
            if then == "free":
                # Failing, it was freed or recycled meanwhile, or the daemon is
                # gone: nothing to give back. The worker must go on either way.
                with contextlib.suppress(Exception):
                    buf.free()
            else:
                releases.setdefault(id(buf._client), []).append(buf)
        for bufs in releases.values():
            _release_all(bufs)
        bufs = batch = releases = buf = client = None  # type: ignore[assignment]  # keep none alive


def _release_all(bufs: list[Buffer]) -> None:
    client = bufs[0]._client
    try:
        client._request(Op.RELEASE, [list(b._make_handle()) for b in bufs])
    except Exception:  # noqa: BLE001 - any refusal: retried one by one below
        # All or none: one bad handle (its session ended, say) refuses the
        # batch, so try each on its own; what fails has nothing to release.
        for buf in bufs:
            with contextlib.suppress(Exception):
                client._request(Op.RELEASE, [list(buf._make_handle())])
    for buf in bufs:
        buf._done("release")
