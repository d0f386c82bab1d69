"""A growing arena (--max-size): segments are added when a request finds no
room, clients map them when they first meet a handle that names one, and an
added segment that stays empty is released after the idle period."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import shmarena
from shmarena.config import shm_name
from shmarena.shm.arena import shm_path
from tests.conftest import Daemon, unique_name, wait_for

MiB = 1 << 20

ATTACH_ALL = """
import json, sys, shmarena
c = shmarena.connect()
segments = set()
for stamp, handle in json.loads(sys.stdin.read()):
    buf = c.attach(shmarena.Handle(*handle))
    assert bytes(buf.view[:8]) == stamp.encode() and bytes(buf.view[-8:]) == stamp.encode(), stamp
    buf.view[8] = 1  # seen: the writer checks this byte
    segments.add(buf.segment)
print(json.dumps(sorted(segments)))
c.close()
"""


def segment_files(daemon: Daemon) -> list[str]:
    base = os.path.basename(daemon.shm_path)
    return sorted(
        f
        for f in os.listdir("/dev/shm")
        if (f == base or f.startswith(base + ".")) and not f.endswith(".gens")
    )


def table_files(daemon: Daemon) -> list[str]:
    """The generation tables in /dev/shm: NAME.gens, NAME.1.gens, ..."""
    base = os.path.basename(daemon.shm_path)
    return sorted(
        f for f in os.listdir("/dev/shm") if f.startswith(base + ".") and f.endswith(".gens")
    )


def test_900_mib_across_segments_then_released_when_idle(
    make_daemon: Callable[..., Daemon],
) -> None:
    """64 MiB growing to 1 GiB holds 900 MiB of live buffers in several
    segments; another process attaches every one of them (mapping each
    segment lazily) and sees the writer's bytes; `check` is clean; once all
    is freed the added segments go after the idle period, files and all."""
    daemon = make_daemon("64M", ["--max-size", "1G", "--shrink-after", "1"])
    client = daemon.client()
    sizes = [30 * MiB] * 28 + [12 * MiB] * 5  # 900 MiB
    buffers = []
    for i, size in enumerate(sizes):
        buf = client.alloc(size)
        stamp = f"{i:08d}".encode()
        buf.view[:8] = stamp
        buf.view[-8:] = stamp
        buffers.append(buf)
    assert sum(sizes) == 900 * MiB
    stats = client.stats()
    assert stats["used_bytes"] == 900 * MiB
    assert stats["initial_size_bytes"] == 64 * MiB
    assert stats["max_size_bytes"] == 1 << 30
    assert 900 * MiB < stats["size_bytes"] <= 1 << 30
    rows = stats["segments"]
    used_segments = sorted({b.segment for b in buffers})
    assert len(rows) > 1 and [r["index"] for r in rows] == used_segments
    assert sum(r["size_bytes"] for r in rows) == stats["size_bytes"]
    assert sum(r["used_bytes"] for r in rows) == 900 * MiB
    assert [r["where"] for r in rows] == [shm_name(daemon.name, r["index"]) for r in rows]
    assert segment_files(daemon) == [os.path.basename(shm_path(shm_name(daemon.name, r["index"])))
                                     for r in rows]  # fmt: skip
    # Another process, which has mapped nothing but segment 0, attaches all.
    payload = json.dumps([[f"{i:08d}", list(b.handle)] for i, b in enumerate(buffers)])
    reader = daemon.python(ATTACH_ALL, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out, _ = reader.communicate(payload, timeout=120)
    assert reader.returncode == 0
    assert json.loads(out) == used_segments
    assert all(b.view[8] == 1 for b in buffers)  # its writes reached us
    assert daemon.cli("check").returncode == 0
    assert client.check() == []
    print(
        f"FIGURE: growth: {sum(sizes) >> 20} MiB live in {len(rows)} segments of "
        f"{[r['size_bytes'] >> 20 for r in rows]} MiB ({stats['size_bytes'] >> 20} MiB of "
        f"1024); a second process attached all {len(buffers)} buffers"
    )
    for buf in buffers:
        buf.free()
    freed_at = time.monotonic()
    wait_for(
        lambda: len(client.stats()["segments"]) == 1, timeout_s=30, what="added segments released"
    )
    print(
        f"FIGURE: growth: the {len(rows) - 1} added segments were released "
        f"{time.monotonic() - freed_at:.2f} s after the last free (--shrink-after 1)"
    )
    stats = client.stats()
    assert stats["size_bytes"] == 64 * MiB and stats["used_bytes"] == 0
    assert segment_files(daemon) == [os.path.basename(daemon.shm_path)]
    assert table_files(daemon) == [os.path.basename(daemon.shm_path) + ".gens"]  # theirs went too
    assert client.check() == []
    # It grows again when asked to (new indices: released ones are not reused).
    again = client.alloc(100 * MiB)
    assert again.segment > max(used_segments)
    again.free()


def test_the_cap_is_a_hard_limit(make_daemon: Callable[..., Daemon]) -> None:
    """Past --max-size the daemon refuses with OutOfMemory that names the
    cap, and changes nothing."""
    daemon = make_daemon("16M", ["--max-size", "48M"])
    client = daemon.client(cache=False)
    held = [client.alloc(15 * MiB) for _ in range(3)]
    before = client.stats()
    assert before["size_bytes"] == 48 * MiB
    try:
        client.alloc(8 * MiB)
    except shmarena.OutOfMemory as error:
        message = str(error)
    else:
        raise AssertionError("an allocation past --max-size succeeded")
    assert "--max-size 48 MiB" in message and "grown to 48 MiB" in message
    after = client.stats()
    assert after["size_bytes"] == before["size_bytes"]
    assert after["used_bytes"] == before["used_bytes"]
    client.free(held)
    assert client.check() == []


def test_cached_blocks_come_from_new_segments(make_daemon: Callable[..., Daemon]) -> None:
    """Small buffers come through the client cache (FILL): when segment 0 is
    full the fill grows the arena, the cache hands out blocks of the new
    segment, and their handles work in another process."""
    daemon = make_daemon("8M", ["--max-size", "64M"])
    client = daemon.client()
    buffers = [client.alloc(64 * 1024) for _ in range(400)]  # 25 MiB
    segments = {b.segment for b in buffers}
    assert len(segments) > 1
    far = next(b for b in buffers if b.segment > 0)
    far.view[:4] = b"far!"
    assert daemon.read_in_child(far.handle, 4) == b"far!"
    for buf in buffers:
        buf.free()
    client.sync()
    assert client.check() == []


def test_buddy_grows_by_a_segment_that_holds_the_request(
    make_daemon: Callable[..., Daemon],
) -> None:
    """With the buddy allocator a request larger than the arena gets a
    power-of-two segment that holds it in one block."""
    daemon = make_daemon("16M", ["--allocator", "buddy", "--max-size", "256M"])
    client = daemon.client(cache=False)
    buf = client.alloc(100 * MiB)
    assert buf.segment == 1
    rows = client.stats()["segments"]
    assert rows[1]["size_bytes"] == 128 * MiB
    buf.free()
    assert client.check() == []


def test_a_handle_into_a_released_segment_is_refused(make_daemon: Callable[..., Daemon]) -> None:
    """A handle kept past the release of its segment names memory that is
    gone: attaching it in a new process is refused, naming the segment."""
    daemon = make_daemon("8M", ["--max-size", "64M", "--shrink-after", "0.5"])
    client = daemon.client(cache=False)
    buf = client.alloc(20 * MiB)
    handle = buf.handle
    assert handle.segment == 1
    buf.free()
    wait_for(lambda: len(client.stats()["segments"]) == 1, timeout_s=30, what="segment released")
    child = daemon.python(
        "import shmarena, sys\n"
        "c = shmarena.connect()\n"
        "try:\n"
        "    c.attach(shmarena.Handle(*map(int, sys.argv[1:])))\n"
        "except shmarena.InvalidRequest as e:\n"
        "    print('refused:', e)\n",
        *map(str, handle),
        stdout=subprocess.PIPE,
    )
    out, _ = child.communicate(timeout=30)
    assert out.startswith("refused:") and "segment 1" in out, out


def test_growth_options_are_checked(run_dir: str) -> None:
    """--max-size below --size, or with --backing, is a usage error (exit 2)."""
    daemon = Daemon(unique_name(), run_dir, "16M")
    for args, said in (
        (["--size", "64M", "--max-size", "32M"], "below --size"),
        (["--backing", f"{run_dir}/a.arena", "--max-size", "1G"], "--backing"),
        (["--size", "64M", "--max-size", "1G", "--shrink-after", "-1"], "--shrink-after"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "shmarena", "daemon", *args],
            env=daemon.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert said in result.stderr
    daemon.assert_clean()


def test_segments_a_dead_daemon_left_are_removed_at_start(
    make_daemon: Callable[..., Daemon],
) -> None:
    """A daemon SIGKILLed with added segments leaves NAME.1, NAME.2 in
    /dev/shm; the next daemon of that name removes them at start (and says
    so), so they do not outlive it."""
    daemon = make_daemon("8M", ["--max-size", "64M"])
    child = daemon.python(
        "import shmarena, sys\n"
        "c = shmarena.connect(cache=False)\n"
        "held = [c.alloc(6 << 20) for _ in range(4)]\n"
        "print(sorted({b.segment for b in held}), flush=True)\n"
        "sys.stdin.readline()\n",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "[0, 1, 2]"
    assert len(segment_files(daemon)) == 3
    assert daemon.proc is not None
    daemon.proc.kill()
    daemon.proc.wait(timeout=30)
    child.kill()
    child.wait(timeout=30)
    assert len(segment_files(daemon)) == 3  # what a crash leaves
    assert len(table_files(daemon)) == 3
    again = make_daemon("8M", ["--max-size", "64M"], name=daemon.name)
    assert segment_files(again) == [os.path.basename(again.shm_path)]
    assert table_files(again) == [os.path.basename(again.shm_path) + ".gens"]
    log = again.stop()
    assert "removed stale segment" in log and f"{again.shm_path}.2" in log
    again.assert_clean()


def test_clients_of_one_process_connecting_and_closing_together(daemon: Daemon) -> None:
    """Two threads each connect, allocate and close in a loop: a client that
    closes (the last user of a mapping unmaps it) never takes the mapping
    from under one that is connecting."""
    failures: list[str] = []
    interval = sys.getswitchinterval()

    def worker() -> None:
        for _ in range(150):
            client = shmarena.connect(daemon.name, runtime_dir=daemon.run_dir, cache=False)
            try:
                buf = client.alloc(4096)
                buf.view[0] = 1
                buf.free()
                del buf
            except Exception as error:  # collected, asserted below
                failures.append(f"{type(error).__name__}: {error}")
            finally:
                client.close()

    sys.setswitchinterval(1e-5)  # switch threads often
    try:
        threads = [threading.Thread(target=worker) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert failures == []
