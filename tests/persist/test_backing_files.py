"""A file-backed arena (`--backing PATH`) across daemon runs, with real daemon
and client processes: the blocks of a detached owner and their bytes survive a
SIGKILL and a clean stop (ext4 and tmpfs); a file that is not exactly a usable
arena is refused with a message and left byte for byte as it was; and what
`--durability none` and `--durability sync` promise holds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

import shmarena
from shmarena.shm.backing import _LAYOUT, STAMP_OFFSET, read_header
from shmarena.shm.journal import encode_frame, scan
from tests.conftest import Daemon, subprocess_env, unique_name, wait_for

# Sizes of the blocks kept across restarts: some the client could cache
# (<= 1 MiB), some only the daemon hands out, none a multiple of the page.
SIZES = [4096, 5000, 65536, 300_001, 1 << 20, (1 << 20) + 1, 3 << 20, 5_000_123]
OWNER = "kept"


class BackedDaemon(Daemon):
    """A conftest Daemon that can also be killed and inspected. With size ""
    it starts without --size (an existing backing file knows its own)."""

    def kill(self) -> None:
        """SIGKILL: no final snapshot, socket and lock stay behind. The test's
        own probe clients are closed first (closing them later, with no daemon
        left to answer, would wait for their timeout)."""
        assert self.proc is not None
        for client in self.clients:
            client.close()
        self.clients.clear()
        self.proc.kill()
        self.proc.wait(timeout=10)

    def inspect(self, path: str) -> tuple[int, dict]:
        result = self.cli("inspect", path, "--json", "--blocks")
        return result.returncode, json.loads(result.stdout) if result.stdout.strip() else {}


StartBacked = Callable[..., BackedDaemon]


@pytest.fixture
def start_backed(run_dir: str) -> Iterator[StartBacked]:
    """Start daemons on a backing file; like make_daemon, all are stopped
    (SIGTERM) and checked clean afterwards. A daemon killed by the test is
    already dead; its socket and lock are removed by the next one of its name."""
    started: list[BackedDaemon] = []

    def start(
        path: str, *extra: str, size: str | None = "32M", name: str | None = None
    ) -> BackedDaemon:
        daemon = BackedDaemon(name or unique_name(), run_dir, size or "", ["--backing", path])
        daemon.extra += extra
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.stop()
    for daemon in started:
        daemon.assert_clean()


@pytest.fixture(params=["ext4", "tmpfs"])
def backing_dir(request: pytest.FixtureRequest, tmp_path) -> Iterator[tuple[str, str]]:
    """(directory, expected file system type) for a backing file."""
    if request.param == "ext4":
        yield str(tmp_path), "ext4"
        return
    path = tempfile.mkdtemp(dir="/dev/shm", prefix="shma-bk-")
    try:
        yield path, "tmpfs"
    finally:
        shutil.rmtree(path, ignore_errors=True)


def pattern(index: int, size: int) -> bytes:
    """Bytes that differ per block and per position (a 251-byte cycle)."""
    cycle = bytes((k * 7 + index * 31 + 1) % 251 for k in range(251))
    return (cycle * (size // 251 + 1))[:size]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_blocks(daemon: Daemon, sizes: list[int]) -> list[tuple[int, ...]]:
    """Allocate `sizes` in the detached owner OWNER, fill each whole buffer
    with its pattern, close the client; the handles as plain tuples."""
    with shmarena.connect(daemon.name, runtime_dir=daemon.run_dir) as client:
        owner = client.owner(OWNER, detached=True)
        handles = []
        for index, size in enumerate(sizes):
            buf = owner.alloc(size)
            buf.view[:] = pattern(index, size)
            handles.append(tuple(buf.handle))
        client.sync()
    return handles


# A new client process: attach every handle, print the sha256 of each block
# and the daemon's epoch as one JSON line.
READER = r"""
import hashlib, json, sys
import shmarena

handles = json.loads(sys.argv[1])
with shmarena.connect() as client:
    digests = [hashlib.sha256(client.attach(h).view).hexdigest() for h in handles]
    print(json.dumps({"digests": digests, "epoch": client.stats()["epoch"]}))
"""


def read_back(daemon: Daemon, handles: list[tuple[int, ...]]) -> dict:
    proc = daemon.python(
        READER, json.dumps(handles), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"reader failed:\n{err}"
    return json.loads(out)


# -- 1. restart keeps data ------------------------------------------------------


def test_detached_blocks_survive_sigkill_and_clean_stop(
    backing_dir: tuple[str, str], start_backed: StartBacked
) -> None:
    # backing_dir comes first so that it is removed only after the daemons stopped.
    directory, fs = backing_dir
    path = os.path.join(directory, "arena.bin")
    first = start_backed(path, size="32M")
    stats = first.client().stats()
    fs_seen, epoch = stats["backing_fs"], stats["epoch"]
    if fs == "ext4" and fs_seen == "tmpfs":
        pytest.skip("tmp_path is on tmpfs here, not on a disk file system")
    if fs == "tmpfs":
        assert fs_seen == "tmpfs"
    handles = write_blocks(first, SIZES)
    expected = [digest(pattern(i, size)) for i, size in enumerate(SIZES)]
    total = sum(SIZES)

    recovery: dict[str, float] = {}
    previous = first
    for how in ("sigkill", "sigterm"):
        if how == "sigkill":
            previous.kill()
        else:
            previous.stop()
        code, report = previous.inspect(path)
        assert code == 0, report.get("problems")
        assert report["clean"] is (how == "sigterm")
        (owner,) = [o for o in report["owners"] if o["name"] == OWNER]
        assert owner["scope"] == "detached" and owner["blocks"] == len(SIZES)

        again = start_backed(path, size=None, name=first.name)
        stats = again.client().stats()
        assert stats["epoch"] == epoch
        assert stats["recovered"]["created"] is False
        assert stats["recovered"]["blocks"] == len(SIZES)
        assert stats["recovered"]["owners"] == 1
        assert stats["requested_bytes"] == total
        recovery[how] = stats["recovered"]["seconds"]

        seen = read_back(again, handles)
        assert seen["epoch"] == epoch
        assert seen["digests"] == expected
        previous = again

    client = previous.client()
    assert client.recycle(OWNER).blocks == len(SIZES)
    assert client.check() == []
    assert client.stats()["used_bytes"] == 0
    print(
        f"FIGURE: backing {fs_seen}: {len(SIZES)} blocks, {total} bytes kept; recovery "
        f"{recovery['sigkill'] * 1000:.2f} ms after SIGKILL, "
        f"{recovery['sigterm'] * 1000:.2f} ms after SIGTERM"
    )


# -- 2. bad files refused, left untouched ---------------------------------------


@dataclass
class ValidArenas:
    """Sound 4 MiB arenas with a detached owner's blocks, made once per module
    and copied for each case: two stopped cleanly (their tables are a snapshot
    only), one SIGKILLed after several allocations (a snapshot and deltas)."""

    first: str
    second: str
    crashed: str


@pytest.fixture(scope="module")
def valid_arenas() -> Iterator[ValidArenas]:
    store = tempfile.mkdtemp(prefix="shma-valid-", dir="/tmp")
    run_dir = tempfile.mkdtemp(prefix="shma-", dir="/tmp")
    try:
        paths = []
        for label in ("first", "second", "crashed"):
            path = os.path.join(store, f"{label}.bin")
            daemon = BackedDaemon(unique_name(), run_dir, "4M", ["--backing", path])
            try:
                daemon.start()
                write_blocks(daemon, [4096, 70_000, 1 << 20, 8192, 12_345, 200_000])
                if label == "crashed":
                    daemon.kill()  # its socket and lock go with run_dir
            finally:
                daemon.stop()
            if label != "crashed":
                daemon.assert_clean()
            paths.append(path)
        yield ValidArenas(*paths)
    finally:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def copy_arena(source: str, path: str) -> None:
    shutil.copyfile(source, path)
    shutil.copyfile(source + ".table", path + ".table")


def flip_header(path: str) -> None:
    """Invert bytes 60..199: the identity, time, name and CRC fields and some padding."""
    with open(path, "r+b") as f:
        page = bytearray(f.read(200))
        for i in range(60, 200):
            page[i] ^= 0xFF
        f.seek(0)
        f.write(page)


def damaged_stamp(path: str) -> None:
    """Garbage where the commit stamp lives (outside the checksummed fields)."""
    with open(path, "r+b") as f:
        f.seek(STAMP_OFFSET)
        f.write(b"\xa5" * 20)


def truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) - 4096)


def other_format(path: str) -> None:
    """Format 2 with a correct CRC: only the version is wrong."""
    with open(path, "r+b") as f:
        body = bytearray(f.read(_LAYOUT.size))
        struct.pack_into("<I", body, 8, 2)
        f.seek(0)
        f.write(bytes(body) + struct.pack("<I", zlib.crc32(body)))


def random_file(path: str) -> None:
    os.unlink(path + ".table")
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20))


def empty_file(path: str) -> None:
    os.unlink(path + ".table")
    open(path, "wb").close()


def no_table(path: str) -> None:
    os.unlink(path + ".table")


def table_frames(path: str) -> list[tuple[int, int]]:
    """(start, total length) of each journal frame: "SHJR", length, crc, payload."""
    with open(path, "rb") as f:
        data = f.read()
    frames, position = [], 0
    while position + 12 <= len(data):
        magic, length, _ = struct.unpack_from("<4sII", data, position)
        assert magic == b"SHJR"
        frames.append((position, 12 + length))
        position += 12 + length
    return frames


def snapshot_cut(path: str) -> None:
    """The table keeps its head frame and half of its snapshot frame. A crash
    cannot leave this (a snapshot is written aside, synced, then renamed)."""
    table = path + ".table"
    start, length = table_frames(table)[1]
    os.truncate(table, start + length // 2)


def middle_frame_damaged(path: str) -> None:
    """One byte flipped in the first delta's payload; intact frames follow.
    A crash tears only the frame being appended, the last one."""
    table = path + ".table"
    frames = table_frames(table)
    assert len(frames) >= 5, frames
    start, length = frames[2]
    with open(table, "r+b") as f:
        f.seek(start + length - 3)
        byte = f.read(1)[0]
        f.seek(start + length - 3)
        f.write(bytes([byte ^ 0xFF]))


def last_frame_damaged(path: str) -> None:
    """One byte flipped in the last frame's payload: the frame is complete,
    so this is not what a crash leaves (that is an incomplete last frame)."""
    table = path + ".table"
    start, length = table_frames(table)[-1]
    with open(table, "r+b") as f:
        f.seek(start + length - 3)
        byte = f.read(1)[0]
        f.seek(start + length - 3)
        f.write(bytes([byte ^ 0xFF]))


@dataclass(frozen=True)
class BadCase:
    damage: str  # name of a function above, or "" for a sound file
    args: tuple[str, ...]  # daemon options besides --backing
    words: tuple[str, ...]  # what the message must say
    damaged: bool = True  # inspect exits 1
    source: str = "first"  # which valid arena it starts from


CASES = {
    "torn-header": BadCase("flip_header", ("--size", "4M"), ("checksum", "torn or damaged")),
    "damaged-stamp": BadCase("damaged_stamp", (), ("commit stamp at byte 2048", "damaged")),
    "truncated": BadCase("truncate", ("--size", "4M"), ("truncated", "header says")),
    "other-format": BadCase("other_format", ("--size", "4M"), ("format 2", "reads format 1")),
    "random": BadCase("random_file", ("--size", "4M"), ("does not start with 'SHMARENA'",)),
    "empty": BadCase("empty_file", ("--size", "4M"), ("0 bytes", "too short")),
    "missing-table": BadCase("no_table", ("--size", "4M"), (".table is missing",)),
    "foreign-table": BadCase("foreign_table", (), ("belongs to another arena", ".table")),
    "other-size": BadCase("", ("--size", "8M"), ("--size 4 MiB", "--size 8 MiB"), False),
    "other-min-block": BadCase(
        "", ("--min-block", "64K"), ("--min-block 4 KiB", "--min-block 64 KiB"), False
    ),
    "table-snapshot-cut": BadCase("snapshot_cut", (), (".table", "no complete snapshot")),
    "table-middle-frame-damaged": BadCase(
        "middle_frame_damaged", (), (".table", "damaged", "checksum is wrong"), True, "crashed"
    ),
    "table-last-frame-damaged": BadCase(
        "last_frame_damaged", (), (".table", "checksum is wrong", "not a torn"), True, "crashed"
    ),
}


def fingerprint(path: str) -> dict[str, tuple[str, int, int]]:
    """sha256, size and mtime of the file and its table, whichever exist."""
    found = {}
    for p in (path, path + ".table"):
        if os.path.exists(p):
            st = os.stat(p)
            with open(p, "rb") as f:
                found[p] = (digest(f.read()), st.st_size, st.st_mtime_ns)
    return found


def start_expecting_refusal(path: str, args: tuple[str, ...], run_dir: str, name: str) -> str:
    """Start a daemon on `path` that should refuse it: its exit code must be 1
    within 30 s. One that binds its socket instead has accepted the file: it is
    stopped and the test fails. Returns its stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmarena", "daemon", "--backing", path, *args],
        env=subprocess_env(run_dir, name),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    socket = os.path.join(run_dir, f"{name}.sock")
    try:
        wait_for(
            lambda: proc.poll() is not None or os.path.exists(socket),
            timeout_s=30,
            what="the daemon to refuse the file",
        )
        if proc.poll() is None:
            proc.terminate()
            out, err = proc.communicate(timeout=10)
            pytest.fail(f"the daemon accepted {path} and served it:\n{out}{err}")
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, f"exit {proc.returncode}\n{out}{err}"
    return err


@pytest.mark.parametrize("case", list(CASES))
def test_unusable_file_is_refused_and_left_untouched(
    case: str, valid_arenas: ValidArenas, tmp_path, run_dir: str
) -> None:
    bad = CASES[case]
    path = str(tmp_path / "arena.bin")
    copy_arena(getattr(valid_arenas, bad.source), path)
    if bad.damage == "foreign_table":
        shutil.copyfile(valid_arenas.second + ".table", path + ".table")
    elif bad.damage:
        globals()[bad.damage](path)
    before = fingerprint(path)
    listing = sorted(os.listdir(tmp_path))
    name = unique_name()

    message = start_expecting_refusal(path, bad.args, run_dir, name).strip()
    assert message.startswith("shmarena daemon: "), message
    assert path in message, message
    assert "untouched" in message, message
    for word in bad.words:
        assert word in message, f"{case}: {word!r} not in {message!r}"

    assert fingerprint(path) == before, f"{case}: the file or its table changed"
    assert sorted(os.listdir(tmp_path)) == listing, f"{case}: files were added or removed"
    assert [f for f in os.listdir(run_dir) if f.startswith(name)] == []
    assert not os.path.exists(f"/dev/shm/shmarena-{name}")

    inspected = subprocess.run(
        [sys.executable, "-m", "shmarena", "inspect", path, "--json"],
        env=subprocess_env(run_dir, name),
        timeout=30,
        capture_output=True,
        text=True,
    )
    assert inspected.returncode == (1 if bad.damaged else 0), inspected.stdout
    assert fingerprint(path) == before, f"{case}: inspect changed the file or its table"
    print(f"FIGURE: {case}: {message.splitlines()[0]}")


@pytest.mark.parametrize("end", ["sigkill", "sigterm"])
def test_an_older_copy_of_the_table_is_refused(
    end: str, start_backed: StartBacked, tmp_path, run_dir: str
) -> None:
    """A copy of the table taken before later allocations, put back under the
    same arena: those blocks would be free in it while their data is in use.
    Refused, naming both commit numbers; the current table is accepted."""
    path = str(tmp_path / "arena.bin")
    first = start_backed(path, size="8M")
    early = write_blocks(first, [4096, 70_000])
    shutil.copyfile(path + ".table", str(tmp_path / "old.table"))
    write_blocks(first, [1 << 20, 8192, 12_345])
    if end == "sigkill":
        first.kill()
    else:
        first.stop()
    shutil.copyfile(path + ".table", str(tmp_path / "current.table"))
    shutil.copyfile(str(tmp_path / "old.table"), path + ".table")
    before = fingerprint(path)

    message = start_expecting_refusal(path, (), run_dir, unique_name()).strip()
    for words in (path + ".table", "older than", "commit", "untouched"):
        assert words in message, f"{words!r} not in {message!r}"
    assert fingerprint(path) == before
    code, report = first.inspect(path)
    assert code == 1 and "older than" in " ".join(report["problems"]), report

    shutil.copyfile(str(tmp_path / "current.table"), path + ".table")
    again = start_backed(path, size=None, name=first.name)
    stats = again.client().stats()
    assert stats["recovered"]["blocks"] == 5
    assert read_back(again, early)["digests"] == [
        digest(pattern(i, size)) for i, size in enumerate([4096, 70_000])
    ]
    print(f"FIGURE: older table ({end}): {message.splitlines()[0]}")


def as_format_1(path: str) -> None:
    """Rewrite an arena and its table the way release 0.8 wrote them: table
    format 1 (no commit numbers, 11-item session images), no commit stamp."""
    found = scan(path + ".table")
    records = []
    for record in found.records:
        record = {k: v for k, v in record.items() if k != "n"}
        if "s" in record:
            record["s"] = [image[:11] for image in record["s"]]
        records.append(record)
    head = {"k": "head", "format": 1, "identity": found.identity}
    with open(path + ".table", "wb") as f:
        f.write(b"".join(encode_frame(r) for r in [head, *records]))
    with open(path, "r+b") as f:
        f.seek(STAMP_OFFSET)
        f.write(bytes(64))


def test_an_arena_of_the_previous_format_loads_and_is_upgraded(
    start_backed: StartBacked, tmp_path
) -> None:
    path = str(tmp_path / "arena.bin")
    first = start_backed(path, size="8M")
    handles = write_blocks(first, [4096, 70_000, 1 << 20])
    first.kill()
    as_format_1(path)
    assert read_header(path).commit is None

    again = start_backed(path, size=None, name=first.name)
    stats = again.client().stats()
    assert stats["recovered"]["blocks"] == 3
    assert read_back(again, handles)["digests"] == [
        digest(pattern(i, size)) for i, size in enumerate([4096, 70_000, 1 << 20])
    ]
    assert stats["journal_commit"] >= 1
    # Written as format 2 from the start on: numbered records, and the arena
    # file stamped with the last one (after the final snapshot of a clean stop).
    again.stop()
    found = scan(path + ".table")
    (last,) = found.records  # the final snapshot alone
    assert last["n"] > stats["journal_commit"]
    assert read_header(path).commit == last["n"]


# -- 3. --durability none ---------------------------------------------------------


def test_durability_none_keeps_blocks_only_across_a_clean_stop(
    start_backed: StartBacked, tmp_path
) -> None:
    path = str(tmp_path / "arena.bin")
    sizes = SIZES[:4]
    first = start_backed(path, "--durability", "none", size="32M")
    epoch = first.client().stats()["epoch"]
    handles = write_blocks(first, sizes)
    first.stop()
    code, report = first.inspect(path)
    assert code == 0 and report["clean"] is True and report["durability"] == "none"

    second = start_backed(path, "--durability", "none", size=None, name=first.name)
    seen = read_back(second, handles)
    assert seen["epoch"] == epoch
    assert seen["digests"] == [digest(pattern(i, size)) for i, size in enumerate(sizes)]
    assert second.client().stats()["recovered"]["reset"] == ""
    second.kill()
    stamp = read_header(path).commit

    third = start_backed(path, "--durability", "none", size=None, name=first.name)
    client = third.client()
    stats = client.stats()
    reset = stats["recovered"]["reset"]
    assert "did not stop cleanly" in reset
    assert stats["epoch"] != epoch
    assert stats["used_bytes"] == 0 and stats["live_blocks"] == 0
    assert OWNER not in [o["name"] for o in client.list_owners()]
    with pytest.raises(shmarena.StaleHandle):
        client.attach(handles[0])
    log = third.stop()
    assert "did not stop cleanly" in log and "new epoch" in log, log
    # The commit numbers go on rising across the reset: a copy of the table
    # from before it cannot pass for a current one.
    assert stamp is not None and read_header(path).commit > stamp
    print(f"FIGURE: durability none after SIGKILL: {reset}")


# -- 4. --durability sync -----------------------------------------------------------

# Allocate into a detached owner until killed; one JSON handle per line, each
# printed only once the daemon acknowledged the allocation.
ALLOCATOR = r"""
import json, sys
import shmarena

client = shmarena.connect(timeout_s=30)
owner = client.owner("acked", detached=True)
i = 0
while True:
    buf = owner.alloc(4096 + (i % 7) * 5000)
    print(json.dumps(list(buf.handle)), flush=True)
    i += 1
"""


def test_durability_sync_keeps_every_acknowledged_allocation(
    start_backed: StartBacked, tmp_path
) -> None:
    path = str(tmp_path / "arena.bin")
    daemon = start_backed(path, "--durability", "sync", size="32M")
    proc = daemon.python(ALLOCATOR, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        while len(lines) < 40:
            line = proc.stdout.readline()
            assert line, f"allocator exited: {proc.stderr.read() if proc.stderr else ''}"
            lines.append(line)
        syncs = daemon.client().stats()["journal_syncs"]
        assert syncs > 0
        daemon.kill()  # the allocator is still asking
    finally:
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=10)
    lines += out.splitlines()
    acked = {tuple(json.loads(line))[2:5] for line in lines if line.strip()}  # offset..gen

    code, report = daemon.inspect(path)
    assert code == 0, report.get("problems")
    kept = {
        (b["offset"], b["size"], b["generation"]) for b in report["blocks"] if b["owner"] == "acked"
    }
    assert acked <= kept, f"lost acknowledged allocations: {sorted(acked - kept)[:5]}"
    (owner,) = [o for o in report["owners"] if o["name"] == "acked"]

    again = start_backed(path, "--durability", "sync", size=None, name=daemon.name)
    client = again.client()
    assert client.recycle("acked").blocks == len(kept)
    assert client.check() == []
    assert client.stats()["used_bytes"] == 0
    print(
        f"FIGURE: durability sync: {len(acked)} acknowledged allocations, {len(kept)} in the "
        f"table after SIGKILL ({owner['bytes']} bytes); {syncs} fdatasyncs before the kill"
    )
