"""numpy arrays in the arena: make them, copy into them, and name them for
other processes with a short string token.

An array made here wraps an exported view of its block (`registry.export`),
so the block lives exactly as long as the array and every view derived from
it; the last one gone frees it (an array made by `Client.ndarray`) or
releases this process's reference (one made by `attach_array`). A token
names bytes, not a reference: the block must still be alive when the
receiver attaches (see `share`). numpy is optional: it is imported inside the
functions, never at module import.
"""

from __future__ import annotations

import ast
from typing import TYPE_CHECKING, Any

from shmarena.client import registry
from shmarena.client.ndarrays import ndarray, ndarray_like, numpy_or_error, refuse_objects
from shmarena.errors import StaleHandle, lifetime_error
from shmarena.protocol import Handle

if TYPE_CHECKING:
    from shmarena.client.client import Client

__all__ = ["attach_array", "default_client", "ndarray", "ndarray_like", "share"]

TOKEN_PREFIX = "shmarena:1:"
# After the prefix: epoch, segment, offset, size, generation, first, shape,
# strides, flags, descr. The descr comes last and the split stops before it,
# so a field name with a colon in it cannot break the token.
_FIELDS = 10


def default_client() -> Client:
    """The client `attach_array` uses when given none: the process default
    of `shmarena.client.default` (set_default's client, else a shared one of
    the first connect's daemon, else of $SHMARENA_NAME / $SHMARENA_RUNTIME_DIR;
    made anew in a forked child)."""
    from shmarena.client.default import default_client as shared  # it imports client.py

    return shared()


def _extent(array: Any) -> tuple[int, int]:
    """The lowest and one-past-highest address of the bytes `array` touches."""
    low = high = int(array.__array_interface__["data"][0])
    if array.size == 0:
        return low, high
    for n, stride in zip(array.shape, array.strides, strict=True):
        if stride > 0:
            high += stride * (n - 1)
        else:
            low += stride * (n - 1)
    return low, high + array.itemsize


def share(array: Any) -> str:
    """A token naming the arena bytes of `array` (a numpy array made by
    `client.ndarray`, `client.ndarray_like`, `Buffer.ndarray`,
    `attach_array`, or any view of one) for `attach_array` in any process of
    the host: "shmarena:1:" then the block's handle, where the array starts in
    it, shape, strides, "w" or "r" (read-only) and the dtype's descr. Nothing is
    copied and no reference is taken: the token is valid while the block is
    alive, so the sharer keeps its array (or a view of it) until the receiver
    has attached, and from then on the receiver's retained array keeps the
    block by itself. ValueError if the array's data is not in an arena block
    this process knows: copy it in with `client.ndarray_like(array)` first."""
    np = numpy_or_error("shmarena.share")
    if not isinstance(array, np.ndarray):
        raise TypeError(
            f"shmarena.share takes a numpy array, not {type(array).__name__}; "
            "for a Buffer send buf.handle instead"
        )
    refuse_objects(array.dtype, "shmarena.share")
    low, high = _extent(array)
    found = registry.find(low, high - low, registry.LIVE_STATES)
    if found is None:
        inside = any(start <= low < end for start, end in registry.mapping_ranges())
        where = (
            "inside the arena mapping, but in no block this process made an array or "
            "Buffer for (or that block was freed)"
            if inside
            else "in this process's own memory, not in the arena"
        )
        raise ValueError(
            f"shmarena.share: the array's data at {low:#x} ({high - low} bytes, "
            f"{array.dtype} {array.shape}) lies {where}; copy it in with "
            "client.ndarray_like(array) and share that"
        )
    buf, start = found
    handle = buf.handle
    first = start + int(array.__array_interface__["data"][0]) - low
    writable = array.flags.writeable and not buf.sealed
    descr = np.lib.format.dtype_to_descr(array.dtype)
    fields = [
        *map(str, handle),
        str(first),
        ",".join(map(str, array.shape)),
        ",".join(map(str, array.strides)),
        "w" if writable else "r",
        repr(descr),
    ]
    return TOKEN_PREFIX + ":".join(fields)


def _parse(np: Any, token: str) -> tuple[Handle, int, tuple[int, ...], tuple[int, ...], bool, Any]:
    try:
        if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
            raise ValueError("no shmarena:1: prefix")
        parts = token[len(TOKEN_PREFIX) :].split(":", _FIELDS - 1)
        if len(parts) != _FIELDS or parts[8] not in ("w", "r"):
            raise ValueError(f"{len(parts)} fields, expected {_FIELDS}")
        handle = Handle(*(int(p) for p in parts[:5]))
        first = int(parts[5])
        shape = tuple(int(n) for n in parts[6].split(",")) if parts[6] else ()
        strides = tuple(int(n) for n in parts[7].split(",")) if parts[7] else ()
        if len(shape) != len(strides):
            raise ValueError("shape and strides differ in length")
        dtype = np.lib.format.descr_to_dtype(ast.literal_eval(parts[9]))
    except (ValueError, TypeError, SyntaxError) as error:
        shown = token if len(str(token)) <= 120 else str(token)[:117] + "..."
        raise ValueError(
            f"shmarena.attach_array: {shown!r} is not an array token ({error}); "
            "tokens are made by shmarena.share(array)"
        ) from None
    return handle, first, shape, strides, parts[8] == "w", dtype


def attach_array(token: str, *, client: Client | None = None) -> Any:
    """The array a `share` token names, over the same bytes (no copy), in
    this or any other process of the host, with its dtype, shape, strides and
    start preserved, read-only if the shared array was. The block is retained
    for this process while the array or any view of it lives, and released
    automatically after the last is gone (or when the process dies). Uses
    `client`, else `default_client()`. StaleHandle if the block is gone
    already (the sharer dropped its array before this attach)."""
    np = numpy_or_error("shmarena.attach_array")
    handle, first, shape, strides, writable, dtype = _parse(np, token)
    client = client or default_client()
    if handle.epoch != client.epoch:
        raise StaleHandle(
            f"shmarena.attach_array: the token is from arena epoch {handle.epoch}, but "
            f"{client.name!r} serves epoch {client.epoch}: it was made under another daemon, "
            "or before this one restarted; attach with a client of the sharer's daemon",
            epoch=handle.epoch,
            daemon_epoch=client.epoch,
        )
    try:
        buf = client.attach(handle, retain=True)
    except StaleHandle as error:
        details = dict(error.details)
        details.pop("rule", None)
        daemon_said = str(error).split(". Rule:")[0]
        gone = "the block of this token is gone"
        if details.get("reason") == "session_ended":
            gone += f": its sharer (process {details.get('pid')}) exited"
        raise lifetime_error(
            "token_outlived",
            "shmarena.attach_array",
            f"{gone} (the daemon: {daemon_said})",
            **details,
        ) from error
    registry.register(buf)
    view = registry.export(buf, then="release")
    array = np.ndarray(shape, dtype=dtype, buffer=view, offset=first, strides=strides)
    if not writable:
        array.flags.writeable = False
    return array
