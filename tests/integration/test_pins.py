"""No view outlives its block in the process that frees it (issue 20, item 1).

A free or recycle of a block this process still has views of is *deferred*:
the Buffer is done at once, the block stays out of reuse (pinned) and is
freed by itself once its last view is gone. Each misuse below writes through
a stale view after the free and must either raise or leave every other
allocation's bytes untouched: 48 fresh blocks of the same size, filled with a
known pattern first, are checked byte for byte, in this process and in a
second client process doing the reallocating.
"""

from __future__ import annotations

import gc
import signal
import subprocess
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import shmarena
from shmarena import BufferReader, StaleHandle
from tests.conftest import Daemon, wait_for

# One daemon for the whole module (tests/conftest.py: shared_daemon).
pytestmark = pytest.mark.shared_daemon

KIB, MIB = 1 << 10, 1 << 20
PATTERN = 0x5A
FRESH = 48

# (size, client options, arena): a cached size, the same size without a cache
# (every block from the daemon), and a size the daemon serves directly.
SIZES = [
    pytest.param(64 * KIB, {}, "64M", id="64KiB-cached"),
    pytest.param(64 * KIB, {"cache": False}, "64M", id="64KiB-daemon"),
    pytest.param(4 * MIB, {}, "256M", id="4MiB-daemon"),
]
MISUSES = ["ndarray", "slice", "owner-slice", "owner-view"]


def stale_writer(client: shmarena.Client, how: str, size: int) -> Callable[[], None]:
    """Make one of the issue's misuses; return what writes through the stale
    view. The Buffer's own view is released by the free or recycle: writing
    through it raises (ValueError, a released memoryview), so nothing needs
    pinning; a view made from it (slice, array) pins the block instead."""
    if how == "ndarray":
        b = client.alloc(size)
        array = b.ndarray((size // 4,), "float32")
        b.free()

        def write() -> None:
            array[:] = 1.0

    elif how == "slice":
        b = client.alloc(size)
        part = b.view[4096:8192]
        b.free()

        def write() -> None:
            part[:] = b"\xee" * len(part)

    else:
        with client.owner("batch") as owner:
            old = owner.alloc(size)
            # taken before leaving the block recycles the owner
            view = old.view if how == "owner-view" else old.view[8:]
        with pytest.raises(StaleHandle, match="recycled"):
            old.view  # noqa: B018 - the property itself refuses

        def write() -> None:
            if how == "owner-view":
                with pytest.raises(ValueError, match="released"):
                    view[:3] = b"OLD"
            else:
                view[:3] = b"OLD"

    return write


def fill(bufs: list[shmarena.Buffer]) -> None:
    for b in bufs:
        b.view[:] = bytes([PATTERN]) * b.size


def touched(bufs: list[shmarena.Buffer]) -> list[int]:
    return [i for i, b in enumerate(bufs) if bytes(b.view) != bytes([PATTERN]) * b.size]


def settled(client: shmarena.Client) -> dict[str, Any]:
    client.sync()
    return client.stats()


def back_to(client: shmarena.Client, used: int) -> None:
    """Wait until every deferred free has happened: nothing pinned, used as before."""
    wait_for(
        lambda: (s := settled(client))["pinned_bytes"] == 0 and s["used_bytes"] == used,
        what="the deferred frees to happen once the last view was gone",
    )
    assert client.check() == []


@pytest.mark.parametrize("how", MISUSES)
@pytest.mark.parametrize(("size", "options", "arena"), SIZES)
def test_a_stale_view_never_writes_into_a_new_block_of_this_process(
    make_daemon: Callable[..., Daemon], how: str, size: int, options: dict, arena: str
) -> None:
    daemon = make_daemon(arena)
    client = daemon.client(**options)
    used = settled(client)["used_bytes"]
    write = stale_writer(client, how, size)
    fresh = [client.alloc(size) for _ in range(FRESH)]
    fill(fresh)
    write()
    assert touched(fresh) == []
    s = settled(client)
    pinned = 0 if how == "owner-view" else 1
    assert s["pinned_bytes"] >= size * pinned and s["pinned_blocks"] == pinned
    client.free(fresh)
    del write
    back_to(client, used)


CHILD = r"""
import sys, shmarena
client = shmarena.connect(cache=sys.argv[1] == "1")
held = []
for line in sys.stdin:
    command, *args = line.split()
    if command == "alloc":
        size, count, byte = map(int, args)
        held = [client.alloc(size) for _ in range(count)]
        for b in held:
            b.view[:] = bytes([byte]) * size
        client.sync()
        print("ok", flush=True)
    elif command == "check":
        byte = int(args[0])
        print(sum(bytes(b.view) != bytes([byte]) * b.size for b in held), flush=True)
    elif command == "free":
        client.free(held)
        held = []
        client.sync()
        print("ok", flush=True)
"""


class Child:
    """A second real client process that allocates, fills and checks blocks."""

    def __init__(self, daemon: Daemon, cache: bool) -> None:
        self.process = daemon.python(
            CHILD, "1" if cache else "0", stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

    def ask(self, line: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.mark.parametrize("how", MISUSES)
@pytest.mark.parametrize(("size", "options", "arena"), SIZES)
def test_a_stale_view_never_writes_into_a_block_of_another_process(
    make_daemon: Callable[..., Daemon], how: str, size: int, options: dict, arena: str
) -> None:
    daemon = make_daemon(arena)
    client = daemon.client(**options)
    child = Child(daemon, options.get("cache", True))
    try:
        used = settled(client)["used_bytes"]
        write = stale_writer(client, how, size)
        settled(client)
        assert child.ask(f"alloc {size} {FRESH} {PATTERN}") == "ok"
        write()
        assert child.ask(f"check {PATTERN}") == "0"
        assert child.ask("free") == "ok"
    finally:
        child.close()
    del write
    back_to(client, used)


def test_every_use_of_a_done_buffer_raises_stale_handle(client: shmarena.Client) -> None:
    freed = client.alloc(4 * KIB)
    freed.free()
    for use in (lambda b: b.view, lambda b: b.ndarray(), lambda b: b.handle):
        with pytest.raises(StaleHandle, match="freed") as info:
            use(freed)
        assert "Buffer" in str(info.value)
    owner = client.owner("gone")
    viewed, unviewed, direct = owner.alloc(4 * KIB), owner.alloc(4 * KIB), owner.alloc(4 * MIB)
    viewed.view[:1] = b"x"
    client.recycle("gone")  # does not raise, though `viewed` was viewed
    for b in (viewed, unviewed, direct):
        for use in (lambda b: b.view, lambda b: b.ndarray(), lambda b: b.handle):
            with pytest.raises(StaleHandle, match="recycled"):
                use(b)
    with pytest.raises(StaleHandle):
        viewed.free()
    assert settled(client)["pinned_blocks"] == 0  # its own view was the only one


def test_stats_add_up_exactly_with_pinned_blocks(daemon: Daemon) -> None:
    client = daemon.client()
    base = settled(client)
    views = []
    for size in (4 * KIB, 64 * KIB, 2 * MIB):
        b = client.alloc(size)
        views.append(b.view[1:])
        b.free()
    with client.owner("batch") as owner:
        kept = owner.alloc(12 * KIB).ndarray()
    s = settled(client)
    assert s["pinned_blocks"] == 4
    assert s["pinned_bytes"] == 4 * KIB + 64 * KIB + 2 * MIB + 12 * KIB
    assert s["size_bytes"] == (
        s["used_bytes"]
        + s["cached_bytes"]
        + s["retained_only_bytes"]
        + s["pinned_bytes"]
        + s["free_bytes"]
    )
    assert s["used_bytes"] == base["used_bytes"]
    (row,) = client.list_clients()
    assert row["pinned_blocks"] == 4 and row["pinned_bytes"] == s["pinned_bytes"]
    assert client.check() == []
    out = daemon.cli("status", check=True).stdout
    assert "pinned by views" in out and "in 4 freed blocks" in out, out
    assert daemon.cli("check").returncode == 0
    del views, kept
    back_to(client, base["used_bytes"])


def test_a_block_recycled_by_another_process_is_kept_aside_while_viewed(
    daemon: Daemon,
) -> None:
    """`shmarena recycle` from another process sends this process's cache
    block back to it (a notice) while a view of it lives here: the block must
    not be handed out again until that view is gone."""
    client = daemon.client()
    owner = client.owner("frames")
    b = owner.alloc(64 * KIB)
    plain, view = b.view, b.view[:]
    used = settled(client)["used_bytes"] - 64 * KIB
    daemon.cli("recycle", "frames", check=True)
    s = settled(client)  # the notice arrives with this
    assert s["pinned_blocks"] == 1 and s["used_bytes"] == used
    with pytest.raises(StaleHandle, match="recycled"):
        b.view  # noqa: B018
    with pytest.raises(ValueError, match="released"):
        plain[0]  # noqa: B018 - the Buffer's own view is released
    fresh = [client.alloc(64 * KIB) for _ in range(FRESH)]
    fill(fresh)
    view[:] = b"\x01" * len(view)
    assert touched(fresh) == []
    client.free(fresh)
    del view
    back_to(client, used)


def test_the_end_of_a_session_drops_its_pins(daemon: Daemon) -> None:
    client = daemon.client()
    used = settled(client)["used_bytes"]
    child = daemon.python(
        "import sys, shmarena\n"
        "c = shmarena.connect()\n"
        "views = []\n"
        "for size in (64 << 10, 4 << 20):\n"
        "    b = c.alloc(size)\n"
        "    views.append(b.ndarray()[8:])\n"
        "    b.free()\n"
        "c.sync()\n"
        "print('pinned', flush=True)\n"
        "sys.stdin.readline()\n",
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "pinned"
        s = settled(client)
        assert s["pinned_blocks"] == 2 and s["pinned_bytes"] == (64 << 10) + (4 << 20)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
    back_to(client, used)


def test_a_reader_chunk_and_a_client_ndarray_slice_pin_their_blocks(
    client: shmarena.Client,
) -> None:
    used = settled(client)["used_bytes"]
    b = client.alloc(64 * KIB)
    reader = BufferReader([b])
    chunk = next(iter(reader))
    reader.close()
    b.free()
    part = client.ndarray(16 * KIB, "uint8")[100:200]
    gc.collect()
    s = settled(client)
    assert s["pinned_blocks"] == 1  # the chunk's; the array's block is still its own
    fresh = [client.alloc(64 * KIB) for _ in range(FRESH)] + [
        client.alloc(16 * KIB) for _ in range(FRESH)
    ]
    fill(fresh)
    chunk[:] = b"\x02" * len(chunk)
    part[:] = 3
    assert touched(fresh) == []
    client.free(fresh)
    del chunk, part
    back_to(client, used)


def test_loaded_views_outlive_a_free_by_the_producer_in_the_same_process(
    client: shmarena.Client,
) -> None:
    used = settled(client)["used_bytes"]
    produced = client.ndarray(64 * KIB, "uint8")
    produced[:] = 7
    loaded = shmarena.loads(shmarena.dumps(produced, client=client), client=client)
    del produced  # the producer's array frees its block ...
    gc.collect()
    fresh = [client.alloc(64 * KIB) for _ in range(FRESH)]
    fill(fresh)
    assert np.all(loaded == 7)  # ... which no new allocation got
    client.free(fresh)
    del loaded
    back_to(client, used)


@pytest.mark.parametrize("size", [64 * KIB, 4 * MIB])
def test_a_free_by_handle_defers_like_a_free_of_the_buffer(
    client: shmarena.Client, size: int
) -> None:
    used = settled(client)["used_bytes"]
    b = client.alloc(size)
    part = b.view[100:200]
    client.free(b.handle)
    with pytest.raises(StaleHandle, match="freed"):
        b.view  # noqa: B018
    fresh = [client.alloc(size) for _ in range(8)]
    fill(fresh)
    part[:] = b"\x04" * len(part)
    assert touched(fresh) == []
    assert settled(client)["pinned_blocks"] == 1
    client.free(fresh)
    del part
    back_to(client, used)


def test_a_release_with_live_views_keeps_the_block_until_they_are_gone(daemon: Daemon) -> None:
    """A reader releases its reference while a slice of its view lives, then
    the owner (another session) frees the block: it is not reused until the
    reader's slice is gone."""
    owner, reader = daemon.client(cache=False), daemon.client()
    used = settled(owner)["used_bytes"]
    b = owner.alloc(64 * KIB)
    seen = reader.attach(b.handle, retain=True)
    part = seen.view[:16]
    seen.release()
    b.free()
    settled(owner)  # its free has reached the daemon
    assert settled(reader)["pinned_blocks"] == 1
    fresh = [owner.alloc(64 * KIB) for _ in range(FRESH)]
    fill(fresh)
    part[:] = b"\x05" * len(part)
    assert touched(fresh) == []
    owner.free(fresh)
    del part
    back_to(reader, used)


def test_close_ends_the_session_and_its_pins(daemon: Daemon) -> None:
    """Views must not outlive the client they came from: close() ends the
    session, the daemon drops its pins, and its Buffers are done."""
    observer, client = daemon.client(), daemon.client()
    b = client.alloc(64 * KIB)
    part = b.view[1:]
    kept = client.alloc(64 * KIB)
    b.free()
    client.sync()
    assert settled(observer)["pinned_blocks"] == 1
    client.close()
    s = settled(observer)
    assert s["pinned_blocks"] == 0 and s["sessions"] == 1 and observer.check() == []
    with pytest.raises(StaleHandle, match="closed"):
        kept.view  # noqa: B018
    del part
