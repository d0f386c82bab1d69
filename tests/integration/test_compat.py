"""shmarena.SharedMemory and shmarena.ShareableList against a real daemon.

Most tests port the behaviours CPython checks in
Lib/test/_test_multiprocessing.py, class _TestSharedMemory; each names the
CPython test it corresponds to. Our own words and cases, and where our
choices differ from the stdlib the test says so (the requested size is
reported exactly; a killed creator's segment survives until unlink).

Not ported, and why:
- test_shared_memory_SharedMemoryServer_ignores_sigint,
  test_shared_memory_SharedMemoryManager_reuses_resource_tracker,
  test_shared_memory_SharedMemoryManager_basics: they test
  multiprocessing.managers.SharedMemoryManager, a server process that owns
  segments; shmarena.compat provides no manager (the daemon plays that part:
  a detached owner per segment, recycled by unlink).
- test_shared_memory_untracking, test_shared_memory_tracking: they test the
  stdlib's resource_tracker (`track=`). There is no tracker here; `track` is
  accepted and changes nothing.

The last two tests are the acceptance check of issue 7: a process group
killed with SIGKILL leaves no /dev/shm entry behind with shmarena, and does
with the stdlib (whose resource tracker dies in the same group).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import shmarena
from shmarena import compat
from shmarena.client import default
from shmarena.compat import ShareableList, SharedMemory
from tests.conftest import Daemon, unique_name, wait_for

CHILD_SEGMENTS = 5


@pytest.fixture
def arena(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    """A daemon that the default client of shmarena.compat talks to (as a
    process started with its environment would), closed before it stops."""
    monkeypatch.setenv("SHMARENA_NAME", daemon.name)
    monkeypatch.setenv("SHMARENA_RUNTIME_DIR", daemon.run_dir)
    yield daemon
    # The shared default clients this process made for the test's daemon.
    default.close_default_clients(daemon.name, daemon.run_dir)


def watch(daemon: Daemon) -> shmarena.Client:
    """The test's own client of the daemon (made on first use)."""
    return daemon.clients[0] if daemon.clients else daemon.client()


def figures(daemon: Daemon) -> dict[str, Any]:
    return watch(daemon).stats()


def settled(daemon: Daemon, used: int) -> bool:
    """The arena is back to `used` bytes handed out, nothing held by retains only."""
    stats = figures(daemon)
    return stats["used_bytes"] == used and stats["retained_only_bytes"] == 0


# -- SharedMemory -----------------------------------------------------------


def test_a_null_character_in_a_name_is_refused(arena: Daemon) -> None:
    # CPython: test_shared_memory_name_with_embedded_null
    name = unique_name("null")
    sms = SharedMemory(name, create=True, size=512)
    with pytest.raises(ValueError, match="null"):
        SharedMemory(name + "\0a", create=False, size=512)
    sms._name = name + "\0a"
    with pytest.raises(ValueError, match="null"):
        sms.unlink()
    sms._name = name
    sms.unlink()
    sms.close()


def test_create_attach_and_the_errors_of_the_stdlib(arena: Daemon) -> None:
    # CPython: test_shared_memory_basics
    name = unique_name("basics")
    sms = SharedMemory(name, create=True, size=512)
    assert sms.name == name
    assert sms.size == 512  # ours: exactly what was asked (the stdlib's may be more)
    assert sms.buf is not None and len(sms.buf) == 512
    assert sms.name in repr(sms) and str(sms.size) in repr(sms)

    sms.buf[0] = 42
    assert sms.buf[0] == 42
    also = SharedMemory(name)
    assert also.buf is not None and also.buf[0] == 42
    also.close()

    bigger = SharedMemory(name, size=20 * sms.size)  # attaching ignores the size
    assert bigger.size == 512
    bigger.close()

    with pytest.raises(ValueError):
        SharedMemory(create=True, size=-2)
    with pytest.raises(ValueError, match="None"):
        SharedMemory(create=False)
    with pytest.raises(FileExistsError, match=name):
        SharedMemory(name, create=True, size=512)
    with pytest.raises(FileNotFoundError, match="notthere"):
        SharedMemory(unique_name("notthere"))

    # A segment can be unlinked once; the second unlink finds nothing.
    twice = unique_name("dblunlink")
    first = SharedMemory(twice, create=True, size=5000)
    second = SharedMemory(twice)
    second.unlink()
    second.close()
    first.close()
    with pytest.raises(FileNotFoundError, match=twice):
        first.unlink()
    with pytest.raises(FileNotFoundError):
        SharedMemory(twice)

    sms.close()
    sms.unlink()


def test_a_generated_name_that_is_taken_is_drawn_again(
    arena: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CPython: test_shared_memory_recreate (and the _make_filename part of
    # test_shared_memory_basics): the name generator is made to offer a name
    # in use first, and create must move on to the next one.
    names = [unique_name("fn1"), unique_name("fn2")]
    monkeypatch.setattr(compat, "_make_name", iter(names).__next__)
    one = SharedMemory(create=True, size=1)
    assert one.name == names[0]
    monkeypatch.setattr(compat, "_make_name", iter(names).__next__)
    two = SharedMemory(create=True, size=1)
    assert two.name == names[1]
    for sms in (one, two):
        sms.close()
        sms.unlink()


def test_generated_names_look_like_the_stdlibs(arena: Daemon) -> None:
    sms = SharedMemory(create=True, size=64)
    assert sms.name.startswith("smp_") and len(sms.name) == len("smp_") + 12
    sms.close()
    sms.unlink()


@pytest.mark.parametrize("kwargs", [{"size": -1}, {"size": 0}, {}])
def test_invalid_sizes_are_refused(arena: Daemon, kwargs: dict[str, int]) -> None:
    # CPython: test_invalid_shared_memory_creation
    with pytest.raises(ValueError, match="size"):
        SharedMemory(create=True, **kwargs)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_an_unpickled_segment_is_the_same_memory(arena: Daemon, protocol: int) -> None:
    # CPython: test_shared_memory_pickle_unpickle
    sms = SharedMemory(create=True, size=512)
    sms.buf[0:6] = b"pickle"
    again = pickle.loads(pickle.dumps(sms, protocol=protocol))
    assert isinstance(again, SharedMemory) and again is not sms
    assert again.name == sms.name and again.size == 512
    assert bytes(again.buf[0:6]) == b"pickle"
    sms.buf[0:6] = b"newval"
    assert bytes(again.buf[0:6]) == b"newval"
    again.buf[0:6] = b"oldval"
    assert bytes(sms.buf[0:6]) == b"oldval"
    again.close()
    sms.close()
    sms.unlink()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_unpickling_an_unlinked_segment_finds_nothing(arena: Daemon, protocol: int) -> None:
    # CPython: test_shared_memory_pickle_unpickle_dead_object
    sms = SharedMemory(create=True, size=512)
    pickled = pickle.dumps(sms, protocol=protocol)
    sms.close()
    sms.unlink()
    with pytest.raises(FileNotFoundError):
        pickle.loads(pickled)


def _write_into(segment: SharedMemory | str, data: bytes) -> None:
    """In a child process: attach (by name, or the object given) and write."""
    local = SharedMemory(segment) if isinstance(segment, str) else segment
    assert local.buf is not None
    local.buf[: len(data)] = data
    local.close()


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_other_processes_write_by_name_and_by_object(arena: Daemon, method: str) -> None:
    # CPython: test_shared_memory_across_processes
    sms = SharedMemory(create=True, size=512)
    context = multiprocessing.get_context(method)
    for target, data in ((sms.name, b"howdy"), (sms, b"HELLO")):
        child = context.Process(target=_write_into, args=(target, data), daemon=True)
        child.start()
        child.join(timeout=60)
        assert child.exitcode == 0, f"the {method} child writing {data!r} exited {child.exitcode}"
        assert bytes(sms.buf[:5]) == data
    sms.close()
    sms.unlink()


def test_a_killed_creators_segment_stays_until_unlink(arena: Daemon) -> None:
    # CPython: test_shared_memory_cleaned_after_process_termination, on
    # purpose the other way round: the stdlib's resource tracker unlinks a
    # terminated creator's segments (and warns); here the segment belongs to
    # a detached owner and stays, readable, until someone unlinks it.
    watcher = watch(arena)
    used = figures(arena)["used_bytes"]
    child = arena.python(
        "import sys, shmarena\n"
        "sm = shmarena.SharedMemory(create=True, size=10)\n"
        "sm.buf[:5] = b'alive'\n"
        "print(sm.name, flush=True)\n"
        "sys.stdin.read()\n",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None
    name = child.stdout.readline().strip()
    child.terminate()
    child.wait(timeout=30)
    child.stdout.close()
    assert child.stdin is not None
    child.stdin.close()
    wait_for(
        lambda: all(row["pid"] != child.pid for row in watcher.list_clients()),
        what="the daemon to end the terminated child's session",
    )
    left = SharedMemory(name)
    assert left.buf is not None and bytes(left.buf[:5]) == b"alive"
    left.close()
    left.unlink()
    wait_for(lambda: settled(arena, used), what="the segment's block to be freed")


def test_unlink_keeps_the_bytes_of_views_still_in_use(arena: Daemon) -> None:
    # Ours (the stdlib on Linux keeps an unlinked segment mapped until close):
    # after unlink the name is gone at once, but every process that still has
    # a view keeps reading and writing the same bytes, which are not reused
    # until the last view is closed.
    used = figures(arena)["used_bytes"]
    sms = SharedMemory(create=True, size=4096)
    sms.buf[:4] = b"mine"
    child = arena.python(
        "import sys, shmarena\n"
        "sm = shmarena.SharedMemory(sys.argv[1])\n"
        "print('attached', flush=True)\n"
        "sys.stdin.readline()\n"
        "print(bytes(sm.buf[:4]).decode(), flush=True)\n"
        "sm.buf[:4] = b'kids'\n"
        "sm.close()\n"
        "print('closed', flush=True)\n"
        "sys.stdin.readline()\n",
        sms.name,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    assert child.stdout.readline().strip() == "attached"
    sms.unlink()
    with pytest.raises(FileNotFoundError):
        SharedMemory(sms.name)
    stats = figures(arena)
    assert stats["used_bytes"] == used and stats["retained_only_bytes"] >= 4096
    # Bytes that would be reused now would show up as a zeroed or foreign block.
    filler = [watch(arena).alloc(4096) for _ in range(8)]
    for buf in filler:
        buf.view[:4] = b"xxxx"
    child.stdin.write("go\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "mine"
    assert child.stdout.readline().strip() == "closed"
    assert bytes(sms.buf[:4]) == b"kids"
    child.stdin.write("bye\n")
    child.stdin.close()
    assert child.wait(timeout=30) == 0
    child.stdout.close()
    watch(arena).free(filler)
    sms.close()
    wait_for(lambda: settled(arena, used), what="the unlinked block to be freed after close")


def test_close_is_safe_with_views_outstanding(arena: Daemon) -> None:
    # Ours: the stdlib's close() raises BufferError while an array or slice
    # of `buf` exists; here close() succeeds and the bytes stay valid (and
    # retained) until the last such view is gone.
    used = figures(arena)["used_bytes"]
    sms = SharedMemory(create=True, size=64)
    piece = sms.buf[8:16]
    sms.close()
    sms.close()  # a second close does nothing, as in the stdlib
    assert sms.buf is None
    sms.unlink()
    piece[:] = b"stillok!"
    assert bytes(piece) == b"stillok!"
    assert figures(arena)["retained_only_bytes"] > 0
    del piece
    wait_for(lambda: settled(arena, used), what="the last view's release")


def test_the_name_is_a_shmarena_name(arena: Daemon) -> None:
    # Ours: the native API sees the segment (lookup by its name, and its
    # owner in `shmarena owners`), and a name published natively cannot be
    # taken by create=True.
    client = watch(arena)
    sms = SharedMemory(unique_name("native"), create=True, size=100)
    sms.buf[:3] = b"abc"
    native = client.lookup(sms.name)
    assert bytes(native.view[:3]) == b"abc" and native.size == 100
    native.release()
    owners = {row["name"]: row for row in client.list_owners()}
    assert owners["shm-" + sms.name]["scope"] == "detached"
    sms.close()
    sms.unlink()

    taken = client.alloc(64)
    name = unique_name("taken")
    client.publish(name, taken, sealed=False)
    with pytest.raises(FileExistsError):
        SharedMemory(name, create=True, size=64)
    assert "shm-" + name not in {row["name"] for row in client.list_owners()}
    taken.free()


# -- ShareableList ----------------------------------------------------------


def test_shareable_list_basics(arena: Daemon) -> None:
    # CPython: test_shared_memory_ShareableList_basics
    sl = ShareableList(["howdy", b"HoWdY", -273.154, 100, None, True, 42])
    assert sl.shm.name in repr(sl) and str(list(sl)) in repr(sl)
    with pytest.raises(IndexError):
        sl[7]
    with pytest.raises(IndexError):
        sl[7] = 2

    before = sl.format
    sl[0] = "howdy"
    assert sl.format == before == "8s8sdqxxxxxx?xxxxxxxx?q"
    assert len(sl) == 7
    with pytest.raises(ValueError):
        sl.index("100")
    assert sl.index(100) == 3
    assert sl[0] == "howdy" and sl[-2] is True
    assert tuple(sl) == ("howdy", b"HoWdY", -273.154, 100, None, True, 42)

    sl[3] = 42
    assert sl[3] == 42
    sl[4] = "some"  # another type in the same slot
    assert sl[4] == "some"
    assert sl.format == "8s8sdq8sxxxxxxx?q"
    with pytest.raises(ValueError, match="exceeds available storage"):
        sl[4] = "far too many"
    assert sl[4] == "some"
    sl[0] = "encodés"  # 8 bytes of UTF-8: exactly the slot
    assert sl[0] == "encodés" and sl[1] == b"HoWdY"
    with pytest.raises(ValueError, match="exceeds available storage"):
        sl[0] = "encodées"  # 9 bytes
    with pytest.raises(ValueError, match="exceeds available storage"):
        sl[1] = b"123456789"
    assert sl[1] == b"HoWdY"
    assert sl.count(42) == 2 and sl.count(b"HoWdY") == 1 and sl.count(b"adios") == 0

    duplicate_name = unique_name("duplicate")
    copy = ShareableList(sl, name=duplicate_name)
    assert copy.shm.name == duplicate_name != sl.shm.name
    assert list(copy) == list(sl) and copy.format == sl.format
    copy[-1] = 77
    assert copy[-1] == 77 and sl[-1] != 77
    copy.shm.close()
    copy.shm.unlink()

    tethered = ShareableList(name=sl.shm.name)
    assert tethered.shm.name == sl.shm.name
    tethered[-1] = 880
    assert sl[-1] == 880
    tethered.shm.close()
    sl.shm.close()
    sl.shm.unlink()

    empty = ShareableList()
    assert len(empty) == 0 and empty.format == "" and empty.count("any") == 0
    with pytest.raises(ValueError):
        empty.index(None)
    empty.shm.close()
    empty.shm.unlink()


def test_shareable_list_keeps_what_the_stdlib_loses(arena: Daemon) -> None:
    # Ours: the stdlib strips trailing NUL bytes of str and bytes items and
    # sizes a str's slot by characters, not encoded bytes; we do neither.
    sl = ShareableList([b"ab\0\0", "x\0", "ééééé", 2**63 - 1, -0.5])
    assert sl[0] == b"ab\0\0" and sl[1] == "x\0" and sl[2] == "ééééé"
    assert sl.format.startswith("8s8s16s")
    assert sl[3] == 2**63 - 1 and sl[4] == -0.5
    with pytest.raises(TypeError, match="list"):
        sl[3] = [1]
    with pytest.raises(TypeError, match="dict"):
        ShareableList([{}])
    with pytest.raises(TypeError):
        sl[0:2]
    names_before = {row["name"] for row in watch(arena).names()}
    with pytest.raises(struct.error):
        ShareableList([1, 2**64])  # as the stdlib: too big for int64
    assert {row["name"] for row in watch(arena).names()} == names_before
    sl.shm.close()
    sl.shm.unlink()


def test_shareable_list_refuses_a_plain_segment(arena: Daemon) -> None:
    sms = SharedMemory(create=True, size=64)
    with pytest.raises(ValueError, match="ShareableList"):
        ShareableList(name=sms.name)
    sms.close()
    sms.unlink()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_shareable_list_pickles_by_name(arena: Daemon, protocol: int) -> None:
    # CPython: test_shared_memory_ShareableList_pickling
    sl = ShareableList(range(10))
    pickled = pickle.dumps(sl, protocol=protocol)
    again = pickle.loads(pickled)
    assert isinstance(again, ShareableList) and again is not sl
    assert again[-1] == 9
    again[4] = "changed"
    assert sl[4] == "changed"
    sl[3] = "newvalue"
    assert again[3] == "newvalue"

    larger = ShareableList(range(400))
    assert len(pickle.dumps(larger, protocol=protocol)) == len(pickled)  # no items travel
    for each in (larger, again, sl):
        each.shm.close()
    larger.shm.unlink()
    sl.shm.unlink()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_unpickling_an_unlinked_list_finds_nothing(arena: Daemon, protocol: int) -> None:
    # CPython: test_shared_memory_ShareableList_pickling_dead_object
    sl = ShareableList(range(10))
    pickled = pickle.dumps(sl, protocol=protocol)
    sl.shm.close()
    sl.shm.unlink()
    with pytest.raises(FileNotFoundError):
        pickle.loads(pickled)


# -- the acceptance check: a process group killed with SIGKILL -----------------


def dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it holds no memory any more)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def start_group(daemon: Daemon, code: str) -> tuple[subprocess.Popen[str], list[str]]:
    """A child in a process group (and session) of its own that makes
    segments, prints their names on one line and waits on stdin."""
    child = daemon.python(
        code, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line, f"the child exited with {child.wait(timeout=30)} before it was ready"
    return child, line.split()


def kill_group(child: subprocess.Popen[str]) -> None:
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    for stream in (child.stdin, child.stdout):
        if stream is not None:
            stream.close()


def test_killpg_leaves_no_dev_shm_entry_and_unlink_recovers_the_blocks(arena: Daemon) -> None:
    watcher = watch(arena)
    used = figures(arena)["used_bytes"]
    before = dev_shm()
    child, names = start_group(
        arena,
        "import sys, shmarena\n"
        "segments = [shmarena.SharedMemory(create=True, size=65536)\n"
        f"            for _ in range({CHILD_SEGMENTS})]\n"
        "for i, sm in enumerate(segments):\n"
        "    sm.buf[:6] = b'seg-%02d' % i\n"
        "sl = shmarena.ShareableList(['kept', 7])\n"
        "print(*[sm.name for sm in segments], sl.shm.name, flush=True)\n"
        "sys.stdin.read()\n",
    )
    with open(f"/proc/{child.pid}/maps") as f:
        mapped = {line.split()[-1] for line in f if "/dev/shm/" in line}
    kill_group(child)
    wait_for(
        lambda: all(row["pid"] != child.pid for row in watcher.list_clients()),
        what="the daemon to end the killed child's session",
    )
    new_entries = sorted(e for e in dev_shm() - before if not e.startswith("shmarena-"))
    table = arena.shm_path + ".gens"  # the arena's generation table (attach checks it)
    assert mapped == {arena.shm_path, table}, f"the child mapped more than the arena: {mapped}"
    assert new_entries == [], f"/dev/shm gained {new_entries} when the group was killed"
    assert not [n for n in names if os.path.exists(f"/dev/shm/{n}")]

    owners = {row["name"]: row for row in watcher.list_owners()}
    kept = [owners.get("shm-" + name) for name in names]
    assert all(row and row["scope"] == "detached" and row["blocks"] == 1 for row in kept), kept
    assert figures(arena)["used_bytes"] > used

    # Recoverable from another process: the contents are there, unlink frees.
    for i, name in enumerate(names[:CHILD_SEGMENTS]):
        sms = SharedMemory(name)
        assert sms.buf is not None and bytes(sms.buf[:6]) == b"seg-%02d" % i
        sms.close()
        sms.unlink()
    sl = ShareableList(name=names[-1])
    assert list(sl) == ["kept", 7]
    sl.shm.close()
    sl.shm.unlink()
    wait_for(lambda: settled(arena, used), what="used bytes to return to the start")
    print(
        f"\nFIGURE: killpg shmarena: {len(names)} segments, {len(new_entries)} new /dev/shm "
        f"entries, {sum(1 for row in kept if row)} kept by detached owners and unlinked"
    )


def test_killpg_leaks_dev_shm_entries_with_the_stdlib(arena: Daemon) -> None:
    # The contrast: the same with multiprocessing.shared_memory. The resource
    # tracker is the child's own child, in the same process group, so SIGKILL
    # takes it too and nobody unlinks the segments.
    before = dev_shm()
    child, words = start_group(
        arena,
        "import sys\n"
        "from multiprocessing import resource_tracker, shared_memory\n"
        "segments = [shared_memory.SharedMemory(create=True, size=65536)\n"
        f"            for _ in range({CHILD_SEGMENTS})]\n"
        "tracker = resource_tracker._resource_tracker._pid\n"
        "print(tracker, *[sm.name for sm in segments], flush=True)\n"
        "sys.stdin.read()\n",
    )
    tracker, names = int(words[0]), words[1:]
    try:
        kill_group(child)
        wait_for(lambda: gone(tracker), what="the resource tracker to be killed with its group")
        new_entries = sorted(e for e in dev_shm() - before if not e.startswith("shmarena-"))
        leaked = [n for n in names if os.path.exists(f"/dev/shm/{n}")]
        assert sorted(leaked) == sorted(names), f"expected all of {names} leaked, saw {leaked}"
        print(
            f"\nFIGURE: killpg stdlib: {len(names)} segments, {len(new_entries)} new /dev/shm "
            f"entries, {len(leaked)} leaked (removed by the test)"
        )
    finally:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{name}")
    assert not [n for n in names if os.path.exists(f"/dev/shm/{n}")]


def test_shmarena_exports_the_drop_in() -> None:
    assert shmarena.SharedMemory is SharedMemory and shmarena.ShareableList is ShareableList
    assert {"SharedMemory", "ShareableList"} <= set(shmarena.__all__)
    assert sys.modules["shmarena.compat"] is compat
