"""The persistent allocation table of a file-backed arena: an append-only
journal of checksummed records next to the arena file (`PATH.table`). I/O only;
what the records say is `shmarena.daemon.table`'s business.

A journal file is a sequence of frames, each ``"SHJR" | length u32 | crc32
u32 | msgpack payload``. The first frame names the arena (format, identity);
the second is a snapshot of the whole table; every later one a delta of
what changed since. Every record after the first carries ``n``, its commit
number: one more than the record before it, across rewrites too, so the
arena file's commit stamp (backing.py) can tell a current table from an
older copy. Format 1 had no ``n`` (and shorter session images); it is still
read, and rewritten as format 2 at start. `append` adds one frame with one `write` and, unless
durability is ``none``, an `fdatasync` before the caller sends any reply
that depends on it.

A crash can tear only the frame being appended, and only by cutting it short:
a last frame whose header or payload runs past the end of the file is a torn
tail (never acknowledged, so never needed), dropped at start and reported. A
frame that is all there but fails its checksum or does not decode is damage
(disk, or an edit), wherever it is: the table is refused, since the changes
in it may have been acknowledged.
Compaction writes a fresh journal (header + snapshot) under a temporary
name, syncs it, and renames it over the old one: either file alone is a
complete table, so a crash at any moment leaves one of them in place.

Crash points (`--debug-crash-at POINT[#N]`) kill the daemon with SIGKILL at
the Nth time it reaches POINT, for tests of exactly these claims.
"""

from __future__ import annotations

import os
import signal
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

from shmarena.errors import DaemonStartError

FRAME_MAGIC = b"SHJR"
_FRAME = struct.Struct("<4sII")
TABLE_FORMAT = 2
READ_FORMATS = (1, 2)
MAX_RECORD_BYTES = 1 << 30

CRASH_POINTS = (
    "commit.before_write",  # changes made in memory, nothing written
    "commit.mid_write",  # half of the frame written
    "commit.after_write",  # frame written, not yet synced
    "commit.after_sync",  # synced, replies not yet sent
    "snapshot.mid_write",  # half of the new journal written
    "snapshot.before_rename",  # new journal complete and synced, old one still in place
    "snapshot.after_rename",  # new journal in place, directory not yet synced
)


def fsync_dir(directory: str) -> None:
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CrashPoints:
    """Kill this process at the Nth arrival at a named point (tests only)."""

    def __init__(self, spec: str | None) -> None:
        self.point, self.count = "", 0
        if spec:
            point, _, nth = spec.partition("#")
            if point not in CRASH_POINTS or (nth and not nth.isdigit()):
                raise ValueError(
                    f"--debug-crash-at {spec!r}: not POINT[#N] with POINT one of "
                    + ", ".join(CRASH_POINTS)
                )
            self.point, self.count = point, int(nth or 1)

    def reach(self, point: str) -> None:
        if point == self.point:
            self.count -= 1
            if self.count <= 0:
                os.kill(os.getpid(), signal.SIGKILL)


def encode_frame(record: Any) -> bytes:
    payload: bytes = msgpack.packb(record, use_bin_type=True)
    return _FRAME.pack(FRAME_MAGIC, len(payload), zlib.crc32(payload)) + payload


@dataclass
class Scan:
    """What reading a journal found."""

    identity: bytes
    records: list[Any]
    good_bytes: int  # length of the intact prefix
    torn_bytes: int  # bytes after it (a frame a crash cut short)
    problem: str  # why reading stopped early, or ""


class _Damaged(Exception):
    """A complete frame that is wrong: not something a crash leaves."""


def _frames(data: bytes) -> Iterator[tuple[int, Any | None, str]]:
    """(end offset, record, problem) per frame; record None ends the scan.
    _Damaged for a complete frame that fails its checksum or decoding."""
    position = 0
    while position < len(data):
        if len(data) - position < _FRAME.size:
            yield position, None, "a frame header cut short"
            return
        magic, length, crc = _FRAME.unpack_from(data, position)
        start = position + _FRAME.size
        if magic != FRAME_MAGIC or length > MAX_RECORD_BYTES:
            yield position, None, f"no frame at byte {position}"
            return
        if start + length > len(data):
            yield position, None, f"a frame at byte {position} cut short"
            return
        payload = data[start : start + length]
        if zlib.crc32(payload) != crc:
            raise _Damaged(
                f"the frame at byte {position} is complete ({_FRAME.size + length} bytes) but "
                "its checksum is wrong"
            )
        try:
            record = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception as exc:  # noqa: BLE001 - msgpack raises many kinds; all mean damage
            raise _Damaged(
                f"the frame at byte {position} is complete and its checksum is right, but it "
                f"does not decode ({exc})"
            ) from None
        position = start + length
        yield position, record, ""


def _intact_frame_after(data: bytes, position: int) -> int | None:
    """The offset of a well-formed frame (magic, length, checksum) somewhere
    after `position`, or None."""
    start = data.find(FRAME_MAGIC, position + 1)
    while start != -1:
        if len(data) - start >= _FRAME.size:
            _, length, crc = _FRAME.unpack_from(data, start)
            end = start + _FRAME.size + length
            if end <= len(data) and zlib.crc32(data[start + _FRAME.size : end]) == crc:
                return start
        start = data.find(FRAME_MAGIC, start + 1)
    return None


def scan(path: str) -> Scan:
    """Read a journal file. DaemonStartError when it is missing or does not
    even start like one; a damaged tail is reported in the result."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DaemonStartError(
            f"allocation table {path} is missing, so which blocks are allocated is unknown; "
            "the arena file was left untouched. Put back the table this arena was last "
            "written with (an older copy is refused), or restore the arena file and its "
            "table together from one backup, or remove both to start afresh"
        ) from None
    records: list[Any] = []
    good, problem = 0, ""
    identity = b""
    try:
        found = list(_frames(data))
    except _Damaged as exc:
        raise DaemonStartError(
            f"allocation table {path} is damaged: {exc}; a crash leaves at most an "
            "incomplete last frame, so this is damage (disk, or an edit), not a torn write, "
            "and the changes in that frame may have been acknowledged. Both files were left "
            "untouched; restore the arena file and its table together from one backup, or "
            "remove both to start afresh"
        ) from None
    for end, record, why in found:
        if record is None:
            problem = why
            later = _intact_frame_after(data, end)
            if later is not None:
                raise DaemonStartError(
                    f"allocation table {path} is damaged: {why}, but an intact frame follows "
                    f"at byte {later}; a crash tears only the last frame, so this is damage "
                    "(disk, or an edit), not a torn write. Both files were left untouched; "
                    "restore the arena file and its table together from one backup, or "
                    "remove both to start afresh"
                )
            break
        if not records:
            if (
                not isinstance(record, dict)
                or record.get("k") != "head"
                or record.get("format") not in READ_FORMATS
            ):
                raise DaemonStartError(
                    f"{path} is not a shmarena allocation table of format "
                    f"{' or '.join(map(str, READ_FORMATS))}; it was left untouched"
                )
            identity = bytes(record.get("identity", b""))
        records.append(record)
        good = end
    if not records:
        raise DaemonStartError(
            f"allocation table {path} is empty or unreadable ({problem or 'no frames'}); "
            "the files were left untouched"
        )
    return Scan(identity, records[1:], good, len(data) - good, problem)


class Journal:
    """The open journal a daemon appends to."""

    def __init__(self, path: str, identity: bytes, sync: bool, crash: CrashPoints) -> None:
        self.path = path
        self.identity = identity
        self.sync = sync  # fdatasync after each append
        self.crash = crash
        self.fd = -1
        self.bytes = 0
        self.appends = 0
        self.syncs = 0
        self.snapshot_bytes = 0
        self.commit = 0  # the number of the last record written (its "n")

    def rewrite(self, snapshot: dict[str, Any]) -> None:
        """Start a fresh journal holding only `snapshot` (compaction)."""
        data = encode_frame(
            {"k": "head", "format": TABLE_FORMAT, "identity": self.identity}
        ) + encode_frame({**snapshot, "n": self.commit + 1})
        temp = self.path + ".new"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(self.fd) if self.fd >= 0 else None
            if st is not None:
                os.fchmod(fd, st.st_mode & 0o777)
                os.fchown(fd, -1, st.st_gid)
            half = len(data) // 2
            _write_all(fd, data[:half])
            self.crash.reach("snapshot.mid_write")
            _write_all(fd, data[half:])
            os.fsync(fd)
            self.crash.reach("snapshot.before_rename")
        except BaseException:
            os.close(fd)
            raise
        os.rename(temp, self.path)
        self.crash.reach("snapshot.after_rename")
        fsync_dir(os.path.dirname(self.path))
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd
        os.lseek(fd, 0, os.SEEK_END)
        self.bytes = self.snapshot_bytes = len(data)
        self.commit += 1

    def append(self, record: dict[str, Any]) -> None:
        frame = encode_frame({**record, "n": self.commit + 1})
        self.crash.reach("commit.before_write")
        if self.crash.point == "commit.mid_write":
            half = len(frame) // 2
            _write_all(self.fd, frame[:half])
            self.crash.reach("commit.mid_write")
            _write_all(self.fd, frame[half:])
        else:
            _write_all(self.fd, frame)
        self.crash.reach("commit.after_write")
        if self.sync:
            os.fdatasync(self.fd)
            self.syncs += 1
        self.crash.reach("commit.after_sync")
        self.bytes += len(frame)
        self.appends += 1
        self.commit += 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
