"""The text of a "no space" error, shared by the arena (shm/arena.py) and the
backing files (shm/backing.py): what could not be sized, the free space where,
and what to do. A leaf, so neither of them imports the other for it."""

from __future__ import annotations

import errno
import os

from shmarena.config import format_size


def no_space_message(what: str, directory: str, size_bytes: int, exc: OSError, advice: str) -> str:
    """Why `what` could not be given `size_bytes` in `directory`, with the free
    space there, and what to do."""
    try:
        st = os.statvfs(directory)
        available, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        free = f"{format_size(available)} free of {format_size(total)}"
    except OSError:
        free = "free space unknown"
    reason = (
        "not enough space"
        if exc.errno in (errno.ENOSPC, errno.ENOMEM)
        else os.strerror(exc.errno or 0)
    )
    return (
        f"cannot size {what} to {format_size(size_bytes)}: {reason} on {directory} ({free}); "
        f"{advice}"
    )
