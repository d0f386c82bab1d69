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

import contextlib
import errno
import fcntl
import mmap
import os
import secrets
import stat
from dataclasses import dataclass
from typing import Any

import posix_ipc

from shmarena.config import format_size
from shmarena.errors import DaemonStartError, ShmArenaError
from shmarena.rundir import check_owner
from shmarena.shm import gens
from shmarena.shm.nospace import no_space_message

SHM_MOUNT = "/dev/shm"


def shm_path(shm_name: str) -> str:
    return f"{SHM_MOUNT}/{shm_name.lstrip('/')}"


@dataclass(frozen=True)
class Pages:
    """How a segment's pages are made. The default is plain tmpfs pages in
    /dev/shm, allocated in full by fallocate."""

    kind: str = "shm"  # "shm", "hugetlbfs" (a file in `directory`) or "memfd"
    directory: str = SHM_MOUNT  # the hugetlbfs mount, for kind "hugetlbfs"
    page_bytes: int = mmap.PAGESIZE  # sizes are rounded up to this
    thp: bool = False  # transparent huge pages: madvise before any page exists
    numa_policy: int = 0  # numa.MPOL_BIND or MPOL_INTERLEAVE; 0: none
    numa_nodes: tuple[int, ...] = ()
    prefault: bool = False  # map every page into the daemon at start

    def round(self, size_bytes: int) -> int:
        page = self.page_bytes
        return -(-size_bytes // page) * page


@dataclass
class Arena:
    """A segment the daemon created and holds (fd open and, for named ones,
    flocked)."""

    shm_name: str
    size_bytes: int
    fd: int
    mapping: mmap.mmap
    path: str = ""  # a file in a hugetlbfs mount; "" for shm and memfd
    kind: str = "shm"
    numa: dict[str, Any] | None = None  # how the pages were bound, if they were

    @classmethod
    def create(
        cls, shm_name: str, size_bytes: int, gid: int | None = None, pages: Pages = Pages()
    ) -> Arena:
        """Create the segment (removing one left by a dead daemon), bind it
        to its NUMA nodes, allocate it in full, lock it and map it. Mode 0600,
        or 0660 owned by group `gid`. DaemonStartError says what went wrong;
        nothing is left behind on failure."""
        mode = 0o600 if gid is None else 0o660
        path = ""
        if pages.kind == "memfd":
            fd = os.memfd_create(shm_name.lstrip("/"))
        elif pages.kind == "hugetlbfs":
            path = os.path.join(pages.directory, shm_name.lstrip("/"))
            fd = _create_file(path, mode)
        else:
            fd = _create_shm(shm_name, mode)
        mapping = None
        try:
            if gid is not None:
                os.fchown(fd, -1, gid)
            os.fchmod(fd, mode)
            if pages.kind != "memfd":
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, size_bytes)
            try:
                flags, protection = mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
                mapping = mmap.mmap(fd, size_bytes, flags, protection)
            except OSError as exc:  # hugetlbfs reserves its pages here
                if exc.errno not in (errno.ENOMEM, errno.ENOSPC):
                    raise
                message = _no_space_message(shm_name, size_bytes, exc, pages)
                raise DaemonStartError(message) from None
            numa = _bind(mapping, size_bytes, pages) if pages.numa_policy else None
            if pages.thp:
                mapping.madvise(mmap.MADV_HUGEPAGE)
                _populate(mapping, size_bytes, shm_name, pages)  # fallocate'd pages are never huge
            else:
                try:
                    os.posix_fallocate(fd, 0, size_bytes)
                except OSError as exc:
                    message = _no_space_message(shm_name, size_bytes, exc, pages)
                    raise DaemonStartError(message) from None
                if pages.prefault:
                    _populate(mapping, size_bytes, shm_name, pages)
        except BaseException:
            if mapping is not None:
                mapping.close()
            os.close(fd)
            if pages.kind == "hugetlbfs":
                _unlink_file(path)
            elif pages.kind == "shm":
                _unlink_quietly(shm_name)
            raise
        return cls(shm_name, size_bytes, fd, mapping, path, pages.kind, numa)

    @property
    def locator(self) -> dict[str, object]:
        """How a client maps this segment: by shm name, or by a path (a
        hugetlbfs file, or the daemon's memfd under /proc)."""
        if self.kind == "shm":
            return {"shm": self.shm_name, "size": self.size_bytes}
        path = self.path or f"/proc/{os.getpid()}/fd/{self.fd}"
        return {"path": path, "offset": 0, "size": self.size_bytes}

    @property
    def where(self) -> str:
        if self.kind == "shm":
            return shm_path(self.shm_name)
        return self.path or f"memfd {self.shm_name.lstrip('/')} (/proc/{os.getpid()}/fd/{self.fd})"

    def close(self, unlink: bool = True) -> None:
        """Unmap (if no view is left), release the lock and remove the segment."""
        # a view is still exported; the mapping goes with the process
        with contextlib.suppress(BufferError):
            self.mapping.close()
        if unlink:
            if self.kind == "shm":
                _unlink_quietly(self.shm_name)
            elif self.path:
                _unlink_file(self.path)
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _create_shm(shm_name: str, mode: int) -> int:
    remove_stale(shm_name)
    try:
        shm = posix_ipc.SharedMemory(shm_name, posix_ipc.O_CREX, mode=mode, size=0)
    except posix_ipc.ExistentialError:
        raise DaemonStartError(
            f"shared memory {shm_path(shm_name)} appeared while starting; "
            "another daemon with the same name is starting: stop it or pick another --name"
        ) from None
    return int(shm.fd)


def _create_file(path: str, mode: int) -> int:
    """A new file at `path` (a hugetlbfs mount), after removing one a dead
    daemon left there."""
    _remove_stale_file(path)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise DaemonStartError(
            f"{path} appeared while starting; another daemon with the same name is "
            "starting: stop it or pick another --name"
        ) from None
    except OSError as exc:
        raise DaemonStartError(f"cannot create {path}: {exc.strerror}") from None


def _unlink_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _bind(mapping: mmap.mmap, size_bytes: int, pages: Pages) -> dict[str, Any]:
    """Set the NUMA policy of a mapping no page of which exists yet."""
    from shmarena.shm import numa

    before = numa.resident_pages(mapping, size_bytes)
    nodes = list(pages.numa_nodes)
    try:
        via = numa.mbind(numa.address_of(mapping), size_bytes, pages.numa_policy, nodes)
    except OSError as exc:
        raise DaemonStartError(
            f"cannot bind the arena to NUMA node(s) {numa.format_cpulist(nodes)}: "
            f"mbind failed: {exc.strerror}"
        ) from None
    return {
        "policy": numa.POLICY_NAMES.get(pages.numa_policy, str(pages.numa_policy)),
        "nodes": nodes,
        "via": via,
        "resident_pages_at_bind": before,
    }


MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14


def _populate(mapping: mmap.mmap, size_bytes: int, shm_name: str, pages: Pages) -> None:
    """Fault every page of the mapping in (allocating it if it did not exist)."""
    try:
        mapping.madvise(MADV_POPULATE_WRITE)
        return
    except OSError as exc:
        if exc.errno in (errno.ENOMEM, errno.EFAULT, errno.ENOSPC):
            raise DaemonStartError(
                _no_space_message(shm_name, size_bytes, OSError(errno.ENOSPC, "full"), pages)
            ) from None
        if exc.errno != errno.EINVAL:
            raise
    step = mmap.PAGESIZE  # an older kernel: touch one byte per page
    for offset in range(0, size_bytes, step):
        mapping[offset] = mapping[offset]


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


def remove_stale_segments(shm_name: str, directory: str = SHM_MOUNT) -> list[str]:
    """Remove the added segments (``NAME.1``, ``NAME.2``, ...) and the
    generation tables (``NAME.gens``, ``NAME.1.gens``, ...) that a daemon
    which died left in `directory` (/dev/shm, or a hugetlbfs mount); the
    paths removed. DaemonStartError when a live daemon still holds one."""
    base = shm_name.lstrip("/") + "."
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    table = gens.TABLE_SUFFIX
    for entry in sorted(names):
        rest = entry[len(base) :]
        if directory == SHM_MOUNT and rest == table[1:]:  # segment 0's generation table
            rest = "0"
        elif directory == SHM_MOUNT and rest.endswith(table):  # an added segment's
            rest = rest[: -len(table)]
        if not (entry.startswith(base) and rest.isdigit()):
            continue
        path = os.path.join(directory, entry)
        if remove_stale("/" + entry) if directory == SHM_MOUNT else _remove_stale_file(path):
            removed.append(path)
    return removed


def _remove_stale_file(path: str) -> bool:
    """Remove the file at `path` if no live daemon holds it (flock); True
    when there was one. DaemonStartError when a live daemon holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DaemonStartError(
            f"{path} is held by a running shmarena daemon; stop it with "
            "`shmarena shutdown` or pick another --name"
        ) from None
    finally:
        os.close(fd)
    _unlink_file(path)
    return True


def _unlink_quietly(shm_name: str) -> None:
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory(shm_name)


def _no_space_message(shm_name: str, size_bytes: int, exc: OSError, pages: Pages) -> str:
    if pages.kind == "hugetlbfs":
        from shmarena.shm.hugepages import survey

        pool = survey().pools.get(pages.page_bytes)
        free = pool.available if pool else 0
        need = -(-size_bytes // pages.page_bytes)
        return (
            f"cannot size arena {os.path.join(pages.directory, shm_name.lstrip('/'))} to "
            f"{format_size(size_bytes)}: it needs {need} huge pages of "
            f"{format_size(pages.page_bytes)}, {free} are free; reserve more "
            "(/proc/sys/vm/nr_hugepages), or use a smaller --size or --max-size"
        )
    if pages.kind == "memfd":
        return (
            f"cannot give the arena memfd {format_size(size_bytes)} of memory: "
            f"{os.strerror(exc.errno or 0)}; use a smaller --size"
        )
    mount = os.path.dirname(shm_path(shm_name))
    return no_space_message(
        f"arena {shm_path(shm_name)}", mount, size_bytes, exc,
        f"start the daemon with a smaller --size, free space in {mount}, "
        "or enlarge the mount (docker: --shm-size)",
    )  # fmt: skip


def map_segment(
    shm_name: str, size_bytes: int, populate: bool = False, owner_uid: int | None = None
) -> mmap.mmap:
    """Map an existing segment read-write (for clients). Errors name the path
    and, for permissions, its mode and owner. With `owner_uid` (the daemon's
    uid), a segment of another uid is refused, not mapped.

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
        check_owner(shm.fd, shm_path(shm_name), owner_uid)
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


class GenTable:
    """A segment's generation table (shm/gens.py) as the daemon holds it: a
    shm object or memfd made with the segment, or, beside a backing file, a
    file that outlives the daemon (clients that resume after a restart keep
    their mapping of it)."""

    def __init__(
        self, fd: int, mapping: mmap.mmap, locator: dict[str, Any], min_block: int, arena: Arena
    ) -> None:
        self.fd = fd
        self.mapping = mapping
        self.words = memoryview(mapping).cast("Q")
        self.locator = locator
        self.shift = min_block.bit_length() - 1
        self._arena = arena  # what to close (and, for shm, unlink)

    @classmethod
    def create(
        cls, shm_name: str, segment_bytes: int, min_block: int, gid: int | None, kind: str
    ) -> GenTable:
        """A new, zeroed table for a segment of `segment_bytes` (its kind:
        memfd for a memfd segment, shm otherwise), named after the segment."""
        size = gens.table_bytes(segment_bytes, min_block, mmap.PAGESIZE)
        pages = Pages("memfd" if kind == "memfd" else "shm")
        arena = Arena.create(shm_name + gens.TABLE_SUFFIX, size, gid, pages)
        locator = {**arena.locator, "serial": secrets.randbits(62)}
        return cls(arena.fd, arena.mapping, locator, min_block, arena)

    @classmethod
    def beside(cls, path: str, segment_bytes: int, min_block: int, gid: int | None) -> GenTable:
        """The table of a backing file: the file `path`, created if missing,
        kept (with its words) across restarts; the daemon rebuilds it from
        its recovered ledger at start."""
        size = gens.table_bytes(segment_bytes, min_block, mmap.PAGESIZE)
        mode = 0o600 if gid is None else 0o660
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
        except OSError as exc:
            raise DaemonStartError(
                f"cannot open the generation table {path} beside the backing file: "
                f"{exc.strerror}; make its directory writable for the daemon's user"
            ) from None
        try:
            if gid is not None:
                os.fchown(fd, -1, gid)
            os.fchmod(fd, mode)
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, 0)  # another size of arena or block: start from zeros
                os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            raise DaemonStartError(f"cannot size the generation table {path}: {exc}") from None
        arena = Arena(path, size, fd, mapping, "", "file")
        locator = {"path": path, "offset": 0, "size": size, "serial": 0}
        return cls(fd, mapping, locator, min_block, arena)

    def mark(self, offset: int, generation: int, reason: int) -> None:
        """Write the word of the block at `offset` (within the segment): live
        under `generation`, or let go for `reason` unless a newer hand-out
        is live there (see gens.may_kill)."""
        index = offset >> self.shift
        words = self.words
        if reason == gens.LIVE:
            words[index] = generation
        elif gens.may_kill(words[index], generation):
            words[index] = gens.dead_word(generation, reason)

    def close(self, unlink: bool = True) -> None:
        self.words.release()
        self._arena.close(unlink)
