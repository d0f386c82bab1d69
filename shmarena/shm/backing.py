"""A file that holds an arena across daemon runs (`--backing PATH`). I/O only.

Layout: one header page, then the arena's bytes (clients map the file from
`data_offset`, so block offsets are the same as in a shm arena). The header
is written once, when the file is made, and names the file for what it is:

    magic "SHMARENA", format, header size, data offset, data size,
    min block, allocator, identity (16 random bytes), creation time, the
    daemon name it was made for, and a CRC-32 of all of it.

Which blocks are allocated lives in the journal next to it (`PATH.table`,
see journal.py), which repeats the identity, so a table is never read
against another arena's bytes.

The header page also holds a *commit stamp* (at STAMP_OFFSET, outside the
checksummed fields): the number of the last journal frame known to be on
disk, rewritten after each synced commit and each snapshot. A table can be
swapped for an older copy on its own, the arena file cannot be swapped
without its data, so a table that ends before the stamp is older than the
bytes it would describe and is refused. The stamp is written to the page
cache only (no sync of its own: a few microseconds per commit); since it is
written after the frame it names is synced, what reaches the disk is never
ahead of the table, and a stamp lost with the power only makes the check
weaker, never wrong. Files made before the stamp existed have zeros there
(no stamp) and get one at their next start.

A file is made under a temporary name (PATH.making) and renamed into place only once its
header, its full size (`posix_fallocate`) and its table are on disk: a crash
while making one leaves no half-made arena at PATH. A file at PATH that is
not exactly what the header says (torn, foreign, truncated, of another
format, size or block size) is refused with `DaemonStartError` and not
written to.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import re
import struct
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from shmarena.config import DEFAULT_MIN_BLOCK_BYTES, format_size
from shmarena.errors import DaemonStartError, ShmArenaError
from shmarena.rundir import check_owner
from shmarena.shm.journal import fsync_dir
from shmarena.shm.nospace import no_space_message

MAGIC = b"SHMARENA"
FORMAT = 1
HEADER_BYTES = 4096
# magic, format, header bytes, data offset, data bytes, min block, allocator,
# identity, created at, name; then the CRC-32 of those bytes.
_LAYOUT = struct.Struct("<8sIIQQQ16s16sd64s")
_CRC = struct.Struct("<I")
STAMP_OFFSET = 2048
STAMP_MAGIC = b"SHCOMMIT"
_STAMP = struct.Struct("<8sQI")  # magic, commit number, CRC-32 of the two


@dataclass(frozen=True)
class Header:
    """The fixed header at the start of an arena file: where the data lies, how it
    is carved, who made it and when. `pack`/`read_header` turn it to bytes and back."""

    data_offset: int
    data_bytes: int
    min_block_bytes: int
    allocator: str
    identity: bytes
    created_at: float
    name: str
    format: int = FORMAT
    commit: int | None = None  # the commit stamp (None: none yet); not in `pack`

    def pack(self) -> bytes:
        body = _LAYOUT.pack(
            MAGIC,
            self.format,
            HEADER_BYTES,
            self.data_offset,
            self.data_bytes,
            self.min_block_bytes,
            self.allocator.encode()[:16],
            self.identity,
            self.created_at,
            self.name.encode()[:64],
        )
        page = body + _CRC.pack(zlib.crc32(body))
        return page + bytes(HEADER_BYTES - len(page))


class NotAnArena(ValueError):
    """The bytes are not a header this release can use; the message says why."""


def pack_stamp(commit: int) -> bytes:
    body = STAMP_MAGIC + commit.to_bytes(8, "little")
    return body + _CRC.pack(zlib.crc32(body))


def parse_stamp(page: bytes) -> int | None:
    """The commit stamp in a header page; None if there is none (zeros);
    NotAnArena if something else is there."""
    raw = page[STAMP_OFFSET : STAMP_OFFSET + _STAMP.size]
    if len(raw) < _STAMP.size or not any(raw):
        return None
    magic, commit, crc = _STAMP.unpack(raw)
    if magic != STAMP_MAGIC or crc != zlib.crc32(raw[:16]):
        raise NotAnArena(f"its commit stamp at byte {STAMP_OFFSET} is damaged")
    return int(commit)


def parse_header(page: bytes, file_bytes: int) -> Header:
    """The header of a backing file, or NotAnArena saying what is wrong."""
    if len(page) < _LAYOUT.size + _CRC.size:
        raise NotAnArena(
            f"it is {file_bytes} bytes, too short for a shmarena header ({HEADER_BYTES} bytes)"
        )
    body = page[: _LAYOUT.size]
    fields = _LAYOUT.unpack(body)
    magic, fmt, header_bytes, data_offset, data_bytes, min_block, alloc, ident, created, name = (
        fields
    )
    if magic != MAGIC:
        raise NotAnArena(f"it does not start with {MAGIC.decode()!r} (found {magic!r})")
    (crc,) = _CRC.unpack_from(page, _LAYOUT.size)
    if crc != zlib.crc32(body):
        raise NotAnArena("its header checksum does not match (a torn or damaged header)")
    if fmt != FORMAT:
        raise NotAnArena(
            f"it has format {fmt}, this shmarena reads format {FORMAT}; "
            "use the release that made it"
        )
    if header_bytes != HEADER_BYTES or data_offset < HEADER_BYTES or data_offset % 4096:
        raise NotAnArena(f"its header says data starts at {data_offset}, which is not valid")
    if file_bytes != data_offset + data_bytes:
        raise NotAnArena(
            f"it is {file_bytes} bytes, its header says {data_offset + data_bytes} "
            f"(header {data_offset} + arena {data_bytes}): truncated or extended"
        )
    return Header(
        data_offset,
        data_bytes,
        min_block,
        alloc.rstrip(b"\0").decode(errors="replace"),
        ident,
        created,
        name.rstrip(b"\0").decode(errors="replace"),
        fmt,
        parse_stamp(page),
    )


def table_path(path: str) -> str:
    return path + ".table"


@dataclass
class Backing:
    """An open backing file, flocked by this daemon."""

    path: str
    fd: int
    header: Header
    created: bool  # made by this start (else found and checked)

    def stamp(self, commit: int) -> None:
        """Record that journal frame `commit` is on disk (see the module doc)."""
        os.pwrite(self.fd, pack_stamp(commit), STAMP_OFFSET)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def read_header(path: str) -> Header:
    """The header of the file at `path` (no lock taken), or DaemonStartError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise DaemonStartError(f"cannot open backing file {path}: {exc.strerror}") from None
    try:
        return _check(path, fd)
    finally:
        os.close(fd)


def _check(path: str, fd: int) -> Header:
    size = os.fstat(fd).st_size
    try:
        return parse_header(os.pread(fd, HEADER_BYTES, 0), size)
    except NotAnArena as exc:
        raise DaemonStartError(
            f"backing file {path} is not a usable shmarena arena: {exc}. It was left "
            "untouched; give another --backing path, or remove the file if it is yours "
            "and holds nothing you need"
        ) from None


def open_backing(
    path: str,
    size_bytes: int | None,
    min_block_bytes: int | None,
    allocator: str | None,
    name: str,
    gid: int | None = None,
) -> Backing:
    """Open the backing file at `path`, making it (with its empty table, by
    `make_table(path, header)`) if there is none. `size_bytes` None means
    "whatever the file has"; anything else must match a file that exists."""
    path = os.path.abspath(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return _create(path, size_bytes, min_block_bytes, allocator, name, gid)
    except OSError as exc:
        raise DaemonStartError(f"cannot open backing file {path}: {exc.strerror}") from None
    try:
        _lock(path, fd)
        header = _check(path, fd)
        wanted = {
            "--size": (size_bytes, header.data_bytes),
            "--min-block": (min_block_bytes, header.min_block_bytes),
            "--allocator": (allocator, header.allocator),
        }
        for option, (asked, found) in wanted.items():
            if asked is not None and asked != found:
                shown = format_size(found) if isinstance(found, int) else found
                asked_shown = format_size(asked) if isinstance(asked, int) else asked
                raise DaemonStartError(
                    f"backing file {path} holds an arena with {option} {shown}, "
                    f"the daemon was started with {option} {asked_shown}; start it with "
                    f"{option} {shown} (or leave the option out), or use another file. "
                    "The file was left untouched"
                )
    except BaseException:
        os.close(fd)
        raise
    return Backing(path, fd, header, created=False)


def _lock(path: str, fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DaemonStartError(
            f"backing file {path} is in use by another shmarena daemon; stop it first "
            "(`shmarena --name NAME shutdown`) or use another file"
        ) from None


def _create(
    path: str,
    size_bytes: int | None,
    min_block_bytes: int | None,
    allocator: str | None,
    name: str,
    gid: int | None,
) -> Backing:
    if size_bytes is None:
        raise DaemonStartError(
            f"backing file {path} does not exist; give --size to make a new arena there"
        )
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise DaemonStartError(
            f"cannot make backing file {path}: directory {directory} does not exist"
        )
    header = Header(
        HEADER_BYTES, size_bytes, min_block_bytes or DEFAULT_MIN_BLOCK_BYTES,
        allocator or "extents", uuid.uuid4().bytes,
        time.time(), name,
    )  # fmt: skip
    temp = f"{path}.making"
    _remove_stale_temp(temp)
    mode = 0o600 if gid is None else 0o660
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        if gid is not None:
            os.fchown(fd, -1, gid)
            os.fchmod(fd, mode)
        try:
            os.posix_fallocate(fd, 0, HEADER_BYTES + size_bytes)
        except OSError as exc:
            raise DaemonStartError(_no_space(path, size_bytes, exc)) from None
        os.pwrite(fd, header.pack(), 0)
        os.fsync(fd)
        _lock(temp, fd)
    except BaseException:
        os.close(fd)
        _unlink(temp)
        raise
    return Backing(temp, fd, header, created=True)


def _remove_stale_temp(temp: str) -> None:
    """A file half made by a start that crashed is removed; one that another
    starting daemon holds (flocked) is not."""
    try:
        fd = os.open(temp, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        _lock(temp, fd)
    finally:
        os.close(fd)
    _unlink(table_path(temp))
    _unlink(temp)


def publish(backing: Backing, path: str) -> None:
    """Move a just-made file (and its table) to its real name, durably."""
    os.rename(table_path(backing.path), table_path(path))
    os.rename(backing.path, path)
    fsync_dir(os.path.dirname(path))
    backing.path = path


def discard(backing: Backing) -> None:
    """Remove a file made by this start that never went into service."""
    if backing.created and backing.path.endswith(".making"):
        _unlink(table_path(backing.path))
        _unlink(backing.path)
    backing.close()


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _no_space(path: str, size_bytes: int, exc: OSError) -> str:
    return no_space_message(
        f"backing file {path}", os.path.dirname(path), size_bytes, exc,
        "use a smaller --size or another directory",
    )  # fmt: skip


def mount_of(path: str) -> tuple[str, str, bool]:
    """(mount point, filesystem type, DAX) of the mount holding `path`, read
    from /proc/self/mountinfo."""
    try:
        with open("/proc/self/mountinfo") as f:
            text = f.read()
    except OSError:
        return ("/", "unknown", False)
    return parse_mountinfo(text, os.path.realpath(path))


def mount_entries(text: str) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(mount point, fs type, options) for each line of mountinfo `text`;
    the options of the mount and of its super block, ``key=value`` or ``flag``
    (value ""). Octal escapes in the point (``\\040`` for a space) are undone."""
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 6 or len(tail) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        words = (fields[5] + "," + tail[2]).split(",")
        yield point, tail[0], {w.partition("=")[0]: w.partition("=")[2] for w in words}


def parse_mountinfo(text: str, real_path: str) -> tuple[str, str, bool]:
    """The longest mount point of `text` (mountinfo lines) holding
    `real_path`: (point, fs type, DAX); DAX when its mount or super options
    say ``dax`` or ``dax=always`` (ext4 and xfs on persistent memory)."""
    best, length = ("/", "unknown", False), -1
    for point, fstype, options in mount_entries(text):
        inside = real_path == point or real_path.startswith(point.rstrip("/") + "/")
        if inside and len(point) > length:
            dax = options.get("dax", None) in ("", "always")
            best, length = (point, fstype, dax), len(point)
    return best


def map_file(
    path: str, size_bytes: int, offset: int, populate: bool = False, owner_uid: int | None = None
) -> mmap.mmap:
    """Map a backing file's arena (for clients), like `arena.map_segment`.
    The path may be a link the daemon named (its memfd under /proc): what is
    checked is the file opened, a regular file of `owner_uid`."""

    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ShmArenaError(f"backing file {path} does not exist; is the daemon running?") from None
    except PermissionError:
        st = os.stat(path)
        raise ShmArenaError(
            f"permission denied mapping {path} (mode {oct(st.st_mode & 0o777)}, owned by uid "
            f"{st.st_uid}, this process runs as uid {os.getuid()}); run as the daemon's user, "
            "or start the daemon with --group"
        ) from None
    try:
        check_owner(fd, path, owner_uid)
        actual = os.fstat(fd).st_size
        if actual < offset + size_bytes:
            raise ShmArenaError(
                f"backing file {path} is {actual} bytes, the daemon said {offset + size_bytes}"
            )
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        return mmap.mmap(fd, size_bytes, flags, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
    finally:
        os.close(fd)
