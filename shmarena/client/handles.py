"""Handles as users pass them: checked and normalised before anything is
sent or looked up, and the refusal of a block from another arena epoch."""

from __future__ import annotations

from typing import Any

from shmarena.client.buffer import Buffer
from shmarena.errors import InvalidRequest, StaleHandle
from shmarena.protocol import Handle

_HANDLE_FIELD_LIMIT = 1 << 63


def as_handle(value: Any) -> Handle:
    """`value` as a Handle (a Handle, or a 5-tuple or list of ints);
    InvalidRequest if it is none, or a field does not fit in 64 bits."""
    if type(value) is Handle:  # the common case, checked without a loop (attach's hot path)
        e, s, o, z, g = value
        if (
            type(e) is type(s) is type(o) is type(z) is type(g) is int
            and min(value) >= -_HANDLE_FIELD_LIMIT
            and max(value) < 2 * _HANDLE_FIELD_LIMIT
        ):
            return value
    if isinstance(value, Handle):
        handle = value
    elif isinstance(value, (tuple, list)) and len(value) == 5:
        handle = Handle(*(int(v) for v in value))
    else:
        raise InvalidRequest(f"not a shmarena handle: {value!r:.80}")
    bad = [
        f"{name} {field:#x}"
        for name, field in zip(Handle._fields, handle, strict=True)
        if not (type(field) is int and -_HANDLE_FIELD_LIMIT <= field < 2 * _HANDLE_FIELD_LIMIT)
    ]
    if bad:  # it could not even be sent: the daemon would refuse it anyway
        raise InvalidRequest(
            f"not a shmarena handle: {', '.join(bad)} does not fit in 64 bits; nothing was done",
            handle=[repr(f)[:40] for f in handle],
        )
    return handle


def handle_of(item: Buffer | Handle) -> Handle:
    """The handle of a Buffer, or `item` checked as a handle."""
    return item.handle if isinstance(item, Buffer) else as_handle(item)


def other_epoch(epoch: int, current: int, what: str) -> StaleHandle:
    """The refusal of `what` on a block of arena epoch `epoch` (not `current`)."""
    return StaleHandle(
        f"{what}: the block is from arena epoch {epoch}, the daemon serves epoch {current}: "
        "it was restarted since and that block no longer exists (its bytes are no longer "
        "shared with anyone); nothing was done",
        epoch=epoch,
        daemon_epoch=current,
    )
