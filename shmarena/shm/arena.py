"""Creating, mapping and removing the arena's shared memory. I/O only.

Only the daemon creates and unlinks an arena. It sizes the segment with
`posix_fallocate`, so a `/dev/shm` that cannot hold it fails here, at start,
with a message, instead of a SIGBUS in some client later. It also keeps the
segment's descriptor open under an exclusive `flock`, which is how a second
daemon tells a live arena (refuse) from one left by a dead daemon (remove).

Clients map an arena once per process (`map_segment`) and never unmap while
views exist; they never unlink. Nothing here decides policy.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
from dataclasses import dataclass

import posix_ipc

from shmarena.config import format_size
from shmarena.errors import DaemonStartError, ShmArenaError

SHM_MOUNT = "/dev/shm"


def shm_path(shm_name: str) -> str:
    return f"{SHM_MOUNT}/{shm_name.lstrip('/')}"


@dataclass
class Arena:
    """A segment the daemon created and holds (fd open and flocked)."""

    shm_name: str
    size_bytes: int
    fd: int
    mapping: mmap.mmap

    @classmethod
    def create(cls, shm_name: str, size_bytes: int, gid: int | None = None) -> Arena:
        """Create the segment (removing one left by a dead daemon), fallocate it
        in full, lock it and map it. Mode 0600, or 0660 owned by group `gid`.
        DaemonStartError says what went wrong; nothing is left behind on failure."""
        mode = 0o600 if gid is None else 0o660
        remove_stale(shm_name)
        try:
            shm = posix_ipc.SharedMemory(shm_name, posix_ipc.O_CREX, mode=mode, size=0)
        except posix_ipc.ExistentialError:
            raise DaemonStartError(
                f"shared memory {shm_path(shm_name)} appeared while starting; "
                "another daemon with the same name is starting: stop it or pick another --name"
            ) from None
        fd = shm.fd
        try:
            if gid is not None:
                os.fchown(fd, -1, gid)
            os.fchmod(fd, mode)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                os.posix_fallocate(fd, 0, size_bytes)
            except OSError as exc:
                raise DaemonStartError(_no_space_message(shm_name, size_bytes, exc)) from None
            mapping = mmap.mmap(fd, size_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            _unlink_quietly(shm_name)
            raise
        return cls(shm_name, size_bytes, fd, mapping)

    def close(self, unlink: bool = True) -> None:
        """Unmap (if no view is left), release the lock and remove the segment."""
        try:
            self.mapping.close()
        except BufferError:
            pass  # a view is still exported; the mapping goes with the process
        if unlink:
            _unlink_quietly(self.shm_name)
        try:
            os.close(self.fd)
        except OSError:
            pass


def remove_stale(shm_name: str) -> bool:
    """Remove a segment of this name if no live daemon holds it.

    Returns True when a stale segment was removed; raises DaemonStartError when
    a live daemon (possibly with another runtime dir) still holds it.
    """
    try:
        shm = posix_ipc.SharedMemory(shm_name)
    except posix_ipc.ExistentialError:
        return False
    except posix_ipc.PermissionsError:
        raise DaemonStartError(
            f"{shm_path(shm_name)} exists and belongs to another user; pick another --name"
        ) from None
    try:
        fcntl.flock(shm.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DaemonStartError(
            f"{shm_path(shm_name)} is held by a running shmarena daemon (perhaps one with "
            "another runtime dir); stop it with `shmarena shutdown` or pick another --name"
        ) from None
    finally:
        shm.close_fd()
    _unlink_quietly(shm_name)
    return True


def _unlink_quietly(shm_name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(shm_name)
    except posix_ipc.ExistentialError:
        pass


def _no_space_message(shm_name: str, size_bytes: int, exc: OSError) -> str:
    mount = os.path.dirname(shm_path(shm_name))
    return no_space_message(
        f"arena {shm_path(shm_name)}", mount, size_bytes, exc,
        f"start the daemon with a smaller --size, free space in {mount}, "
        "or enlarge the mount (docker: --shm-size)",
    )  # fmt: skip


def no_space_message(what: str, directory: str, size_bytes: int, exc: OSError, advice: str) -> str:
    """Why `what` could not be given `size_bytes` in `directory`, with the free
    space there, and what to do."""
    try:
        st = os.statvfs(directory)
        available, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        free = f"{format_size(available)} free of {format_size(total)}"
    except OSError:
        free = "free space unknown"
    reason = "not enough space" if exc.errno == errno.ENOSPC else os.strerror(exc.errno or 0)
    return (
        f"cannot size {what} to {format_size(size_bytes)}: {reason} on {directory} ({free}); "
        f"{advice}"
    )


def map_segment(shm_name: str, size_bytes: int, populate: bool = False) -> mmap.mmap:
    """Map an existing segment read-write (for clients). Errors name the path
    and, for permissions, its mode and owner.

    `populate` maps every page at once (MAP_POPULATE): about 0.1-0.2 ms per MiB
    up front (the daemon's fallocate has already allocated the pages), after
    which a first touch costs tens of nanoseconds instead of 2-4 us per page."""
    try:
        shm = posix_ipc.SharedMemory(shm_name)
    except posix_ipc.ExistentialError:
        raise ShmArenaError(
            f"arena {shm_path(shm_name)} does not exist; is the daemon running?"
        ) from None
    except posix_ipc.PermissionsError:
        raise ShmArenaError(_permission_message(shm_name)) from None
    try:
        actual = os.fstat(shm.fd).st_size
        if actual < size_bytes:
            raise ShmArenaError(
                f"arena {shm_path(shm_name)} is {actual} bytes, the daemon said {size_bytes}"
            )
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        return mmap.mmap(shm.fd, size_bytes, flags, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        shm.close_fd()


def _permission_message(shm_name: str) -> str:
    path = shm_path(shm_name)
    try:
        st = os.stat(path)
        found = f"mode {stat.filemode(st.st_mode)} owned by uid {st.st_uid}"
    except OSError:
        found = "mode unknown"
    return (
        f"permission denied mapping {path} ({found}, this process runs as uid {os.getuid()}); "
        "run as the daemon's user, or start the daemon with --group"
    )
