"""A drop-in for `multiprocessing.shared_memory`: SharedMemory and ShareableList
whose segments are blocks of a shmarena arena, not files in /dev/shm.

Each segment is one block allocated under a detached owner named
`shm-<name>` and published (writable) under `<name>`, so any process attached
to the same daemon finds it by name. The block survives its creator, like a
POSIX segment, until someone calls `unlink()` (which recycles the owner) or
`shmarena recycle shm-<name>`. Every process's view holds a retain on the
block, so an `unlink()` never takes the bytes away from a view still in use:
they are reused only after the last view is gone (or its process died).
No per-segment /dev/shm entry exists, so a killed process leaks none.

This module owns the mapping from the stdlib's names and errors to ours; it
must never touch the arena except through the client.
"""

from __future__ import annotations

import contextlib
import errno
import operator
import os
import struct
import types
from collections.abc import Iterable, Iterator
from typing import Any

from shmarena.client.buffer import Buffer
from shmarena.client.client import Client
from shmarena.client.default import default_client
from shmarena.errors import NameExists, UnknownName, UnknownOwner
from shmarena.limits import MAX_NAME, MAX_OWNER_NAME

__all__ = ["ShareableList", "SharedMemory"]

OWNER_PREFIX = "shm-"
NAME_PREFIX = "smp_"
# A segment's name is a published name and, with OWNER_PREFIX, an owner name.
MAX_SEGMENT_NAME = min(MAX_NAME, MAX_OWNER_NAME - len(OWNER_PREFIX))


def _make_name() -> str:
    """A fresh segment name, like the stdlib's psm_xxxx."""
    return NAME_PREFIX + os.urandom(6).hex()


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a shared memory name must be a str, got {type(name).__name__}")
    if "\0" in name:
        raise ValueError(
            f"shared memory name {name!r:.60} contains an embedded null character; remove it"
        )
    if not name or len(name) > MAX_SEGMENT_NAME or not name.isprintable():
        raise ValueError(
            f"shared memory name {name!r:.60} is not usable: a name must be 1-"
            f"{MAX_SEGMENT_NAME} printable characters"
        )
    return name


class SharedMemory:
    """A named block of shared memory, created or attached by name, with the
    API of `multiprocessing.shared_memory.SharedMemory`.

    `create=True` makes a new segment of `size` bytes (FileExistsError if the
    name is taken; a fresh `smp_...` name when `name` is None); otherwise the
    segment `name` is attached (FileNotFoundError if there is none; `size` is
    then ignored). `buf` is a writable memoryview of exactly the requested
    size, and `size` reports that size (the stdlib may round up to a page).
    `close()` lets go of this process's view; `unlink()` destroys the segment
    for everyone (views still in use stay valid until they are gone).
    `client` chooses the daemon; by default the process default (see
    `shmarena.set_default`: the first connect's daemon, else the
    environment's). `track` is accepted for the 3.13 signature and changes
    nothing: there is no resource tracker to tell.
    """

    def __init__(
        self,
        name: str | None = None,
        create: bool = False,
        size: int = 0,
        *,
        track: bool = True,  # noqa: ARG002 - the 3.13 signature; no tracker to tell
        client: Client | None = None,
    ) -> None:
        size = _check_size(size, create)
        if name is None and not create:
            raise ValueError(
                "'name' can only be None if create=True: pass the name of the segment to attach"
            )
        self._client = client if client is not None else default_client()
        self._buf: memoryview | None = None
        self._block: Buffer | None = None
        if not create:
            assert name is not None
            self._name = _check_name(name)
            block = self._attach(self._name)
        elif name is not None:
            self._name = _check_name(name)
            block = self._create(self._name, size)
        else:
            while True:  # a random name is taken only by bad luck: draw again
                self._name = _make_name()
                try:
                    block = self._create(self._name, size)
                    break
                except FileExistsError:
                    continue
        self._block = block
        self._size = block.size
        # Released on a worker thread once the last view made from `buf`
        # (slices, numpy arrays, ...) is gone: the retain keeps the bytes
        # from being reused while any of them could still write to them.
        from shmarena.client.registry import export  # ctypes: paid on first use only

        self._buf = export(block, then="release")

    def _create(self, name: str, size: int) -> Buffer:
        client = self._client
        owner_name = OWNER_PREFIX + name
        block = client.owner(owner_name, detached=True).alloc(size)
        retained = False
        try:
            client.retain(block)  # before anyone can see it: an unlink cannot win the race
            retained = True
            client.publish(name, block, sealed=False)
        except NameExists:
            _let_go(block, retained)
            self._drop_owner_if_not_ours(name, owner_name)
            raise FileExistsError(
                errno.EEXIST,
                f"shared memory {name!r} exists already in shmarena daemon "
                f"{client.name!r}: attach it with SharedMemory({name!r}), or unlink it first",
                name,
            ) from None
        except BaseException:
            _let_go(block, retained)  # nobody knows the name yet: nothing else is lost
            raise
        return block

    def _drop_owner_if_not_ours(self, name: str, owner_name: str) -> None:
        # The name is held by a block outside `owner_name` (published with
        # the native API): the owner we just made holds nothing; remove it.
        rows = [row for row in self._client.names(name) if row["name"] == name]
        if rows and rows[0].get("owner") != owner_name:
            with contextlib.suppress(UnknownOwner):
                self._client.recycle(owner_name)

    def _attach(self, name: str) -> Buffer:
        try:
            return self._client.lookup(name)
        except UnknownName:
            raise FileNotFoundError(
                errno.ENOENT,
                f"no shared memory {name!r} in shmarena daemon {self._client.name!r}: "
                "create it with create=True, or check the name (`shmarena names`)",
                name,
            ) from None

    @property
    def buf(self) -> memoryview | None:
        """A writable memoryview of the segment's bytes; None after `close()`."""
        return self._buf

    @property
    def name(self) -> str:
        """The segment's name, to attach it from another process."""
        return self._name

    @property
    def size(self) -> int:
        """The size asked for at creation, in bytes (never rounded up)."""
        return self._size

    def close(self) -> None:
        """Let go of this process's view. The segment stays for others until
        `unlink()`; views made from `buf` keep their bytes valid until they
        are gone, instead of making close() raise BufferError as the stdlib
        does."""
        view, self._buf = self._buf, None
        self._block = None
        if view is not None:
            # arrays over it still exist: the export releases once they go
            with contextlib.suppress(BufferError):
                view.release()

    def unlink(self) -> None:
        """Destroy the segment: its name goes at once, its bytes once the
        last view of any process is gone. FileNotFoundError if it was
        unlinked already. Call it once, from any one process."""
        name = _check_name(self._name)
        try:
            self._client.recycle(OWNER_PREFIX + name)
        except UnknownOwner:
            raise FileNotFoundError(
                errno.ENOENT,
                f"shared memory {name!r} does not exist (unlinked already?) in shmarena "
                f"daemon {self._client.name!r}",
                name,
            ) from None

    def __enter__(self) -> SharedMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # By name and daemon: the receiving process attaches (with a retain
        # of its own), like the stdlib's SharedMemory(name).
        client = self._client
        return (_rebuild, (type(self), self._name, self._size, client.name, client.runtime_dir))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r}, size={self._size})"


def _let_go(block: Buffer, retained: bool) -> None:
    """Release and free a block this process just made (best effort: if the
    daemon is gone, so is the block)."""
    client = block._client
    # Any error at all: this cleanup runs on another error's way out and must not hide it.
    with contextlib.suppress(Exception):
        if retained:
            client.release(block.handle)
        client.free(block)


def _rebuild(cls: type[SharedMemory], name: str, size: int, daemon: str, run_dir: str) -> Any:
    return cls(name, False, size, client=default_client(daemon, run_dir))


def _check_size(size: int, create: bool) -> int:
    try:
        size = operator.index(size)
    except TypeError:
        raise TypeError(f"'size' must be an int of bytes, got {type(size).__name__}") from None
    if size < 0:
        raise ValueError(f"'size' must be a positive integer of bytes, got {size}")
    if create and size == 0:
        raise ValueError(
            "'size' must be a positive number different from zero to create a segment, got 0"
        )
    return size


# -- ShareableList ----------------------------------------------------------
#
# Our layout (not the stdlib's): a header of two int64s, the magic and the
# item count N; then N slot records of four int64s (kind, used length, offset
# of the slot in the data area, slot size); then the data area. A slot is 8
# bytes for int, float, bool and None, and for str/bytes its encoded length
# rounded up to a multiple of 8 (at least 8). Storing the used length keeps
# trailing NUL bytes of str and bytes, which the stdlib strips, so no spare
# byte is needed: a copy of a list has the same slots as the list.

_MAGIC = 0x31_4C_53_50_4D_48_53  # "SHMPSL1", little-endian
_HEADER = struct.Struct("<qq")
_RECORD = struct.Struct("<qqqq")
_KIND_INT, _KIND_FLOAT, _KIND_BOOL, _KIND_NONE, _KIND_STR, _KIND_BYTES = range(6)
_SCALARS: dict[type, tuple[int, str]] = {
    int: (_KIND_INT, "q"),
    float: (_KIND_FLOAT, "d"),
    bool: (_KIND_BOOL, "xxxxxxx?"),
    type(None): (_KIND_NONE, "xxxxxx?x"),
}
_ENCODING = "utf8"
_ALIGN = 8


def _encode(value: Any) -> tuple[int, bytes | None]:
    """(kind, encoded bytes for str/bytes); TypeError for what cannot be stored."""
    if isinstance(value, str):
        return _KIND_STR, value.encode(_ENCODING)
    if isinstance(value, bytes):
        return _KIND_BYTES, value
    scalar = _SCALARS.get(type(value))
    if scalar is None:
        raise TypeError(
            f"a ShareableList holds int, float, bool, str, bytes and None; "
            f"got {type(value).__name__} {value!r:.40}"
        )
    return scalar[0], None


class ShareableList:
    """A fixed-length list of int, float, bool, str, bytes and None in one
    SharedMemory segment, with the API of the stdlib's ShareableList.

    `ShareableList(sequence)` creates a segment (named `name`, or a fresh
    name); `ShareableList(name=...)` attaches an existing one. An item may be
    replaced by one of another type, but a str or bytes must fit the slot of
    the item first stored there (ValueError "exceeds available storage").
    `shm` is the SharedMemory; call `shm.close()` and `shm.unlink()` as with
    the stdlib.
    """

    def __init__(self, sequence: Iterable[Any] | None = None, *, name: str | None = None) -> None:
        if name is None or sequence is not None:
            items = list(sequence or ())
            encoded = [_encode(item) for item in items]
            slots = [max(_ALIGN, -(-len(raw or b"") // _ALIGN) * _ALIGN) for _, raw in encoded]
            size = _HEADER.size + _RECORD.size * len(items) + sum(slots)
            self.shm = SharedMemory(name, create=True, size=size)
            try:
                self._write_layout(items, encoded, slots)
            except BaseException:  # an int beyond 64 bits, say: leave no segment behind
                self.shm.close()
                self.shm.unlink()
                raise
        else:
            self.shm = SharedMemory(name)
            self._read_layout()

    @classmethod
    def _attached(cls, shm: SharedMemory) -> ShareableList:
        self = cls.__new__(cls)
        self.shm = shm
        self._read_layout()
        return self

    def _write_layout(self, items: list[Any], encoded: list[Any], slots: list[int]) -> None:
        buf = self._view()
        _HEADER.pack_into(buf, 0, _MAGIC, len(items))
        self._count = len(items)
        self._data = _HEADER.size + _RECORD.size * len(items)
        offset = 0
        self._slots: list[tuple[int, int]] = []
        for position, ((kind, _), slot) in enumerate(zip(encoded, slots, strict=True)):
            _RECORD.pack_into(buf, self._record_at(position), kind, 0, offset, slot)
            self._slots.append((offset, slot))
            offset += slot
        for position, item in enumerate(items):
            self[position] = item

    def _read_layout(self) -> None:
        buf = self._view()
        magic, count = _HEADER.unpack_from(buf, 0) if len(buf) >= _HEADER.size else (0, 0)
        if magic != _MAGIC:
            self.shm.close()  # nothing of ours to keep it open for
            raise ValueError(
                f"shared memory {self.shm.name!r} does not hold a shmarena ShareableList "
                "(its header is not one); attach it as SharedMemory instead"
            )
        self._count = count
        self._data = _HEADER.size + _RECORD.size * count
        self._slots = []
        for position in range(count):
            _, _, offset, slot = _RECORD.unpack_from(buf, self._record_at(position))
            self._slots.append((offset, slot))

    def _view(self) -> memoryview:
        buf = self.shm.buf
        if buf is None:
            raise ValueError(f"the SharedMemory {self.shm.name!r} of this list is closed")
        return buf

    def _record_at(self, position: int) -> int:
        return _HEADER.size + _RECORD.size * position

    def _position(self, position: int, what: str) -> int:
        index = operator.index(position)
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError(f"{what} out of range")
        return index

    def __getitem__(self, position: int) -> Any:
        index = self._position(position, "index")
        buf = self._view()
        kind, used, offset, _ = _RECORD.unpack_from(buf, self._record_at(index))
        start = self._data + offset
        if kind == _KIND_INT:
            return struct.unpack_from("<q", buf, start)[0]
        if kind == _KIND_FLOAT:
            return struct.unpack_from("<d", buf, start)[0]
        if kind == _KIND_BOOL:
            return buf[start + 7] != 0
        if kind == _KIND_NONE:
            return None
        raw = bytes(buf[start : start + used])
        return raw.decode(_ENCODING) if kind == _KIND_STR else raw

    def __setitem__(self, position: int, value: Any) -> None:
        index = self._position(position, "assignment index")
        kind, raw = _encode(value)
        offset, slot = self._slots[index]
        buf = self._view()
        start = self._data + offset
        if raw is not None:
            if len(raw) > slot:
                raise ValueError(
                    f"bytes/str item exceeds available storage: item {index} has a slot of "
                    f"{slot} bytes, the new value needs {len(raw)}; a ShareableList cannot "
                    "grow a slot, make a new list for longer values"
                )
            buf[start : start + len(raw)] = raw
            buf[start + len(raw) : start + slot] = bytes(slot - len(raw))
            used = len(raw)
        else:
            if kind == _KIND_INT:
                struct.pack_into("<q", buf, start, value)  # struct.error beyond 64 bits
            elif kind == _KIND_FLOAT:
                struct.pack_into("<d", buf, start, value)
            else:
                buf[start : start + _ALIGN] = bytes(_ALIGN)
                if kind == _KIND_BOOL:
                    buf[start + 7] = 1 if value else 0
            used = _ALIGN
        _RECORD.pack_into(buf, self._record_at(index), kind, used, offset, slot)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Any]:
        for position in range(self._count):
            yield self[position]

    def _format_of(self, position: int) -> str:
        kind, _, _, slot = _RECORD.unpack_from(self._view(), self._record_at(position))
        if kind in (_KIND_STR, _KIND_BYTES):
            return f"{slot}s"
        return next(fmt for k, fmt in _SCALARS.values() if k == kind)

    @property
    def format(self) -> str:
        """The struct format of the items as stored now (the stdlib's notation:
        "q" int, "d" float, "xxxxxxx?" bool, "xxxxxx?x" None, "<n>s" str/bytes)."""
        return "".join(self._format_of(i) for i in range(self._count))

    def count(self, value: Any) -> int:
        """How many items equal `value`."""
        return sum(1 for item in self if item == value)

    def index(self, value: Any) -> int:
        """The position of the first item equal to `value`; ValueError if none."""
        for position, item in enumerate(self):
            if item == value:
                return position
        raise ValueError(f"{value!r} not in this container")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # By name only, as the stdlib: the pickle's size does not grow with the list.
        client = self.shm._client
        return (_rebuild_list, (type(self), self.shm.name, client.name, client.runtime_dir))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)}, name={self.shm.name!r})"

    __class_getitem__ = classmethod(types.GenericAlias)  # type: ignore[var-annotated]


def _rebuild_list(cls: type[ShareableList], name: str, daemon: str, run_dir: str) -> ShareableList:
    return cls._attached(SharedMemory(name, client=default_client(daemon, run_dir)))
