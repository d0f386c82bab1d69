"""Pickling with the large buffers in the arena (pickle protocol 5, out of band).

`dumps(obj)` pickles `obj`; every buffer the pickler sees of at least
`threshold` bytes (numpy arrays, pandas and Arrow columns, bytes, bytearray:
whatever reduces to a `PickleBuffer`) goes into an arena block, and only its
handle goes into the bytes `dumps` returns. A buffer that already lies in an
arena block (an array made by `client.ndarray`, one received from a Queue) is
not copied at all: its block is named instead. `loads(data)` in any process
returns objects whose large buffers view the arena.

Who frees what (the lifetime rule):

- `dumps` puts the blocks it fills under a fresh *detached* owner, so the
  message outlives its sender. `loads` retains every block of the message for
  this process and recycles that owner: from then on the blocks live exactly as
  long as the loaded objects (and every view made from them) do, or until this
  process ends. A message is therefore loaded once; `loads(data, keep=True)`
  leaves the owner for further loads, and `discard(data)` recycles a message
  that will never be loaded.
- A buffer `dumps` found in the arena is named, not copied, and stays the
  sender's: the sender keeps it alive until the receiver has loaded it (the
  receiver's retain then keeps it). Loading it after it was freed raises
  StaleHandle.
- Loaded buffers that share their block with the sender are read-only; the
  ones `dumps` copied into blocks of their own are writable, as a plain
  unpickled copy would be.

`pack`/`unpack` are the same machinery without the envelope, for
`shmarena.Queue`, which hands the handles to the daemon separately.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import msgpack

from shmarena.client import registry
from shmarena.client.buffer import Buffer
from shmarena.client.default import default_client
from shmarena.errors import (
    InvalidRequest,
    ShmArenaError,
    StaleHandle,
    UnknownOwner,
    lifetime_error,
)
from shmarena.protocol import Handle, Op

if TYPE_CHECKING:
    from shmarena.client.client import Client

__all__ = [
    "DEFAULT_THRESHOLD",
    "Packed",
    "discard",
    "dumps",
    "free_all",
    "loads",
    "pack",
    "release_all",
    "retain_all",
    "unpack",
]

DEFAULT_THRESHOLD = 64 << 10  # below this a copy into the pickle costs less than a block
_INLINE_STREAM = 64 << 10  # a longer pickle stream goes into a block of its own
_FORMAT = 1
_MAGIC = "shmarena-pickle"


class Packed(NamedTuple):
    """What `pack` made: the small `payload`, the `handles` of every block it
    names (each once), and the Buffers it allocated and filled (`made`, the
    caller's to free or hand over)."""

    payload: bytes
    handles: list[Handle]
    made: list[Buffer]


class _Pickler(pickle.Pickler):
    """Sends large bytes and bytearrays out of band as well: by default the
    pickler writes them into the stream, which costs a copy on each side."""

    def __init__(self, file: io.BytesIO, threshold: int, **kwargs: Any) -> None:
        super().__init__(file, protocol=5, **kwargs)
        self.threshold = threshold

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if (kind is bytes or kind is bytearray) and len(obj) >= self.threshold:
            return kind, (pickle.PickleBuffer(obj),)
        return NotImplemented


def pack(
    obj: Any,
    client: Client,
    threshold: int = DEFAULT_THRESHOLD,
    alloc: Any = None,
    named: list[Buffer] | None = None,
) -> Packed:
    """Pickle `obj` with its buffers of `threshold` bytes or more in the arena.
    `alloc(sizes) -> list[Buffer]` makes the blocks (default: this session's,
    in one round trip); on any failure the blocks made so far are freed.
    `named`, if given, gets the Buffers of the blocks named in place (found
    in the arena already, not copied): a Queue asks whose they are."""
    if threshold < 1:
        raise ValueError(f"threshold must be at least 1 byte, got {threshold}")
    # The common small message first, with the plain pickler: a pickle shorter
    # than `threshold` that sent no buffer out of band holds no buffer the
    # full path below would place in a block, so it is what that path makes.
    seen: list[pickle.PickleBuffer] = []
    quick = pickle.dumps(obj, protocol=5, buffer_callback=seen.append)
    if not seen and len(quick) < threshold and len(quick) <= _INLINE_STREAM:
        return Packed(_in_band_payload(quick), [], [])
    del seen, quick
    outside: list[tuple[memoryview, tuple[Buffer, int] | None]] = []

    def place(picklebuffer: pickle.PickleBuffer) -> bool:
        try:
            raw = picklebuffer.raw()
        except BufferError:
            return True  # not contiguous: the pickler copies it into the stream
        if raw.nbytes < threshold:
            raw.release()
            return True
        found = registry.find(registry.address_of(raw), raw.nbytes, registry.LIVE_STATES)
        outside.append((raw, found))
        if found is not None and named is not None:
            named.append(found[0])
        return False  # out of band: placed below, in this order

    stream = io.BytesIO()
    _Pickler(stream, threshold, buffer_callback=place).dump(obj)
    data = stream.getbuffer()
    try:
        return _place(client, data, outside, alloc)
    finally:
        data.release()
        for raw, _ in outside:
            raw.release()


def _place(
    client: Client,
    data: memoryview,
    outside: list[tuple[memoryview, tuple[Buffer, int] | None]],
    alloc: Any,
) -> Packed:
    big_stream = data.nbytes > _INLINE_STREAM
    if not outside and not big_stream:  # the common small message: all in band
        return Packed(msgpack.packb([_FORMAT, bytes(data), None, []], use_bin_type=True), [], [])
    copies = [raw for raw, found in outside if found is None]
    sizes = [raw.nbytes for raw in copies]
    if big_stream:
        sizes.append(data.nbytes)
    made: list[Buffer] = []
    if sizes:
        made = alloc(sizes) if alloc is not None else client.alloc_many(sizes)
    try:
        handles: list[Handle] = []
        index: dict[Handle, int] = {}

        def name(buf: Buffer) -> int:
            handle = buf.handle
            if handle not in index:
                index[handle] = len(handles)
                handles.append(handle)
            return index[handle]

        views: list[int] = []
        fresh = iter(made)
        for raw, found in outside:
            if found is None:
                buf = next(fresh)
                buf.view[: raw.nbytes] = raw.cast("B")
                views += [name(buf), 0, raw.nbytes, int(raw.readonly)]
            else:
                buf, start = found
                # Shared with the sender from now on: the receiver only reads.
                views += [name(buf), start, raw.nbytes, 1]
        if big_stream:
            buf = next(fresh)
            buf.view[: data.nbytes] = data
            body: list[Any] = [_FORMAT, None, [name(buf), 0, data.nbytes], views]
        else:
            body = [_FORMAT, bytes(data), None, views]
        return Packed(msgpack.packb(body, use_bin_type=True), handles, made)
    except BaseException:
        free_all(made)
        raise


def unpack(payload: bytes, buffers: list[Buffer]) -> Any:
    """The object `pack` pickled, given the Buffers its handles name (in the
    same order), each retained for this process: every buffer of the result
    views its block, and each Buffer is released when the last view of it is
    gone. A Buffer no view needs is released at once."""
    if not buffers:  # the common small message: all in band
        stream = _in_band_stream(payload)
        if stream is not None:
            return pickle.loads(stream)
        plain = _unpacked(payload, _in_band)
        if plain is not None:
            return pickle.loads(plain[1])
    body = _decode(payload, len(buffers))
    exports: dict[int, memoryview] = {}

    def view_of(i: int, start: int, nbytes: int, readonly: bool) -> memoryview:
        whole = exports.get(i)
        if whole is None:
            registry.register(buffers[i])  # so it is named, not copied, if sent on
            whole = exports[i] = registry.export(buffers[i], then="release")
        part = whole[start : start + nbytes]
        return part.toreadonly() if readonly else part

    _, stream, stream_ref, flat = body
    views = [
        view_of(flat[k], flat[k + 1], flat[k + 2], bool(flat[k + 3]))
        for k in range(0, len(flat), 4)
    ]
    if stream_ref is not None:
        stream = view_of(stream_ref[0], stream_ref[1], stream_ref[2], True)
    viewed = set(exports)
    try:
        return pickle.loads(stream, buffers=views)
    finally:
        # Drop our references: the stream's block goes back once loaded.
        del stream, views
        exports.clear()
        for i, buf in enumerate(buffers):  # named by the message but viewed by nothing
            if i not in viewed and buf._state == "retained":
                buf.release()


# A payload of `pack` that names no block is msgpack's [_FORMAT, stream, nil,
# []]: the fixarray and _FORMAT (a fixint) before the stream's bin header, nil
# and an empty fixarray after it. Small messages are framed and unframed here
# by hand, byte for byte what msgpack makes (a test checks), without building
# and walking the list.
_IN_BAND_HEAD = bytes((0x94, _FORMAT))
_IN_BAND_TAIL = b"\xc0\x90"
_BIN_HEADS = ((0xC4, 1), (0xC5, 2), (0xC6, 4))  # bin 8, 16, 32: length bytes


def _in_band_payload(stream: bytes) -> bytes:
    """msgpack.packb([_FORMAT, stream, None, []], use_bin_type=True)."""
    size = len(stream)
    for kind, width in _BIN_HEADS:
        if size < 1 << (8 * width):
            head = _IN_BAND_HEAD + bytes((kind,)) + size.to_bytes(width, "big")
            return b"".join((head, stream, _IN_BAND_TAIL))
    raise ValueError(f"a pickle of {size} bytes is too long for msgpack's bin type")


def _in_band_stream(payload: bytes) -> memoryview | None:
    """The stream of a payload `_in_band_payload` made, or None for any other
    bytes (a payload naming blocks, or anything malformed)."""
    if payload[:2] != _IN_BAND_HEAD or payload[-2:] != _IN_BAND_TAIL or len(payload) < 5:
        return None
    for kind, width in _BIN_HEADS:
        if payload[2] == kind:
            start = 3 + width
            size = int.from_bytes(payload[3:start], "big")
            if start + size + 2 != len(payload):
                return None
            return memoryview(payload)[start : start + size]
    return None


def _unpacked(data: bytes | bytearray | memoryview, valid: Callable[[Any], bool]) -> Any:
    """`data` decoded, or None unless it decodes to something `valid`
    (any bytes at all may arrive here)."""
    try:
        value = msgpack.unpackb(data, raw=False)
        return value if valid(value) else None
    except Exception:  # noqa: BLE001 - msgpack raises many kinds; all mean "not ours"
        return None


def _in_band(body: Any) -> bool:
    """`body` is a payload of `pack` that names no block."""
    return (
        type(body) is list
        and len(body) == 4
        and body[0] == _FORMAT
        and type(body[1]) is bytes
        and body[2] is None
        and body[3] == []
    )


def _decode(payload: bytes, count: int) -> list[Any]:
    body = _unpacked(
        payload,
        lambda b: (
            isinstance(b, list)
            and len(b) == 4
            and b[0] == _FORMAT
            and isinstance(b[3], list)
            and len(b[3]) % 4 == 0
        ),
    )
    if body is None:
        raise InvalidRequest(
            f"not a shmarena pickle payload ({len(payload)} bytes, format {_FORMAT} expected); "
            "it must come from shmarena.dumps or a shmarena.Queue of the same version"
        )
    refs = body[3][0::4] + ([body[2][0]] if body[2] else [])
    if any(not isinstance(i, int) or not 0 <= i < count for i in refs):
        raise InvalidRequest(
            f"the payload names {max(refs, default=0) + 1} blocks but {count} came with it"
        )
    return body  # type: ignore[no-any-return]


def free_all(bufs: list[Buffer]) -> None:
    """Free what is not freed yet; a block recycled with its owner meanwhile,
    or a session the daemon reclaimed already, has nothing to give back."""
    for buf in bufs:
        if buf._state != "done":
            with contextlib.suppress(ShmArenaError):
                buf.free()


def retain_all(
    client: Client, handles: list[Handle], what: str = "load", message_owner: str | None = None
) -> list[Buffer]:
    """Buffers over the blocks `handles` name, each retained for this process
    in one round trip (all or none: StaleHandle if one was freed already,
    saying which lifetime rule was broken; `what` names the call, and
    `message_owner` the owner `dumps` put the message's own blocks under)."""
    if not handles:
        return []
    try:
        client._request(Op.RETAIN, [list(h) for h in handles])
    except StaleHandle as error:
        raise _load_refused(error, what, message_owner) from error
    return [client._buffer(list(h), "retained") for h in handles]


def _load_refused(error: StaleHandle, what: str, message_owner: str | None) -> StaleHandle:
    """A load's refused retain, said as the rule its sender or receiver broke,
    from what the daemon knows of the block (details "reason", "owner")."""
    details = dict(error.details)
    reason, owner = details.get("reason"), details.get("owner")
    daemon_said = str(error).split(". Rule:")[0]
    if reason == "recycled" and message_owner is not None and owner == message_owner:
        rule = "loaded_twice"
        found = (
            f"the message's owner {owner!r} was recycled: the message was loaded before "
            "(without keep=True) or discarded"
        )
    elif reason == "session_ended":
        rule = "producer_exited"
        found = (
            f"its producer (process {details.get('pid')}) exited before this load, and "
            "the blocks it held went with it"
        )
    elif reason in ("freed", "recycled"):
        rule = "freed_before_load"
        found = (
            f"a block it names in place was freed by its producer (owner {owner!r}) "
            "before this load"
        )
    elif message_owner is not None:
        rule = "loaded_twice"
        found = (
            "a block of the message is gone: it was loaded before (without keep=True), "
            "discarded, or its producer freed it"
        )
    else:
        rule = "freed_before_load"
        found = "a block it names is gone: its producer freed it or exited before this load"
    details.pop("rule", None)
    return lifetime_error(rule, what, f"{found} (the daemon: {daemon_said})", **details)


def release_all(bufs: list[Buffer]) -> None:
    """Release the retained ones among `bufs` (as free_all, quietly)."""
    for buf in bufs:
        if buf._state == "retained":
            with contextlib.suppress(ShmArenaError):
                buf.release()


# -- dumps / loads -----------------------------------------------------------


def _client(client: Client | None) -> Client:
    return client if client is not None else default_client()


def dumps(obj: Any, *, client: Client | None = None, threshold: int = DEFAULT_THRESHOLD) -> bytes:
    """`obj` pickled, its buffers of `threshold` bytes or more in the arena
    under a detached owner of its own (see the module's lifetime rule). Small
    objects cost no round trip. `client` chooses the daemon (default: the
    process default, see `shmarena.set_default`); load the message from a
    client of the same daemon."""
    client = _client(client)
    owner: list[Any] = []

    def alloc(sizes: list[int]) -> list[Buffer]:
        made = client.owner(f"pickle-{os.getpid()}-{uuid.uuid4().hex[:12]}", detached=True)
        owner.append(made)
        try:
            return made.alloc_many(sizes)
        except BaseException:
            made.recycle()
            raise

    packed = pack(obj, client, threshold, alloc)
    envelope = {
        _MAGIC: _FORMAT,
        "owner": owner[0].name if owner else None,
        "handles": [list(h) for h in packed.handles],
        "payload": packed.payload,
    }
    return msgpack.packb(envelope, use_bin_type=True)  # type: ignore[no-any-return]


def _envelope(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    envelope = _unpacked(
        data,
        lambda e: (
            isinstance(e, dict)
            and e.get(_MAGIC) == _FORMAT
            and isinstance(e.get("owner"), (str, type(None)))
            and isinstance(e.get("payload"), bytes)
            and isinstance(e.get("handles"), list)
            and all(
                isinstance(h, list) and len(h) == 5 and all(type(x) is int for x in h)
                for h in e["handles"]
            )
        ),
    )
    if envelope is None:
        raise InvalidRequest(
            f"these {len(data)} bytes are not from shmarena.dumps (format {_FORMAT}); "
            "load plain pickles with pickle.loads"
        )
    return envelope  # type: ignore[no-any-return]


def loads(
    data: bytes | bytearray | memoryview, *, client: Client | None = None, keep: bool = False
) -> Any:
    """The object `dumps` made, its large buffers viewing the arena (no copy).
    Retains the message's blocks for this process and recycles the message's
    owner unless `keep` (see the module's lifetime rule). StaleHandle if a
    block was freed before this: its message says why (loaded before without
    `keep=True`, freed by its producer, or its producer exited). `client`:
    as for `dumps` (a client of the daemon the message was made in)."""
    envelope = _envelope(data)
    client = _client(client)
    handles = [Handle(*h) for h in envelope["handles"]]
    buffers = retain_all(client, handles, "shmarena.loads", envelope["owner"])
    try:
        obj = unpack(envelope["payload"], buffers)
    except BaseException:
        release_all(buffers)
        raise
    if envelope["owner"] is not None and not keep:
        # loaded before, or discarded: our retains keep the blocks
        with contextlib.suppress(UnknownOwner):
            client.recycle(envelope["owner"])
    return obj


def discard(data: bytes | bytearray | memoryview, *, client: Client | None = None) -> None:
    """Give back the blocks of a message that will never be loaded (recycle
    its owner). Loads that already happened keep their objects. `client`: as
    for `loads`."""
    envelope = _envelope(data)
    if envelope["owner"] is not None:
        with contextlib.suppress(UnknownOwner):  # loaded (without keep) or discarded already
            _client(client).recycle(envelope["owner"])
