"""The daemon's pushes (client/pushes.py, daemon/pressure.py): notices reach
a producer's cache without a request of its own, and an allocation that does
not fit takes back the free blocks of other processes' caches, even of a
process whose application makes no call."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator

import pytest

import shmarena
from shmarena.client import pushes
from shmarena.testing import wait_until
from tests.conftest import Daemon

MiB = 1 << 20

# A process that warms its cache (32 blocks of 64 KiB, freed: they stay in
# its cache), says which session it is, then blocks in a pipe read.
WARM = """
import shmarena, sys
c = shmarena.connect()
bufs = [c.alloc(65536) for _ in range(32)]
for b in bufs:
    b.free()
c.sync()
print(c.session, flush=True)
sys.stdin.read()
c.close()
"""

# An attach-only reader: reads the frame, then frees it by its handle.
READER = """
import shmarena, sys
c = shmarena.connect()
h = shmarena.Handle(*map(int, sys.argv[1:]))
assert bytes(c.attach(h).view[:5]) == b"frame"
c.free(h)
c.sync()
c.close()
"""


@pytest.fixture
def daemon64(make_daemon: Callable[..., Daemon]) -> Iterator[Daemon]:
    yield make_daemon("64M")


def _cached_of(client: shmarena.Client, session: int) -> int:
    rows = [row for row in client.list_clients() if row["session"] == session]
    return int(rows[0]["cached_bytes"]) if rows else 0


@pytest.fixture
def warm(daemon64: Daemon) -> Iterator[tuple[subprocess.Popen[str], int]]:
    child = daemon64.python(WARM, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdin is not None
    session = int(child.stdout.readline())
    yield child, session
    os.kill(child.pid, signal.SIGCONT)  # a test that stopped it may have failed
    child.stdin.close()
    assert child.wait(60) == 0


def _fill(client: shmarena.Client) -> shmarena.Buffer:
    """Take the largest free run: what is left is scattered or in caches."""
    return client.alloc(client.stats()["largest_free_bytes"])


def test_a_frame_freed_by_its_reader_returns_to_the_producer_without_a_request(
    daemon64: Daemon,
) -> None:
    producer = daemon64.client()
    buf = producer.alloc(65536)
    buf.view[:5] = b"frame"
    handle, offset = buf.handle, buf.offset
    producer.sync()  # everything reported: from here the producer sends nothing
    transport, cache = producer._transport, producer._cache
    assert transport is not None and cache is not None
    sent = (transport.next_id, transport.next_free)
    reader = daemon64.python(READER, *map(str, handle))
    assert reader.wait(60) == 0
    cls = cache.class_of(65536)
    wait_until(lambda: offset in cache.lists.get(cls, ()), 30, "the notice to be pushed")
    assert (transport.next_id, transport.next_free) == sent  # no request of the producer's
    again = producer.alloc(65536)  # the frame, reused from the cache
    assert again.offset == offset
    again.free()
    producer.sync()
    assert producer.check() == []


def test_an_allocation_takes_back_an_idle_process_cache(
    daemon64: Daemon, warm: tuple[subprocess.Popen[str], int]
) -> None:
    _, session = warm
    parent = daemon64.client(cache=False)
    held = _cached_of(parent, session)
    assert held >= MiB
    filler = _fill(parent)  # the rest of the arena: under the watermark, too
    got = parent.alloc(MiB)  # room only the idle process's cache has
    assert got.size == MiB
    wait_until(lambda: _cached_of(parent, session) == 0, 30, "the idle cache to drain")
    got.free()
    filler.free()
    assert parent.check() == []
    assert daemon64.cli("check").returncode == 0


def test_nobody_able_to_give_gets_out_of_memory_as_before(
    daemon64: Daemon, warm: tuple[subprocess.Popen[str], int]
) -> None:
    _, session = warm
    parent = daemon64.client(cache=False)
    held = _cached_of(parent, session)
    filler = _fill(parent)
    # More than every cache together holds: nobody is asked, nothing is kept.
    with pytest.raises(shmarena.OutOfMemory, match="is (full|fragmented)"):
        parent.alloc(held + 8 * MiB)
    assert parent.stats()["waiting_requests"] == 0
    filler.free()
    assert parent.check() == []
    assert daemon64.cli("check").returncode == 0


def test_a_stopped_process_does_not_hold_an_allocation_past_the_deadline(
    daemon64: Daemon, warm: tuple[subprocess.Popen[str], int]
) -> None:
    child, session = warm
    parent = daemon64.client(cache=False)
    assert _cached_of(parent, session) >= MiB
    os.kill(child.pid, signal.SIGSTOP)
    filler = _fill(parent)
    with pytest.raises(shmarena.OutOfMemory, match="is (full|fragmented)"):
        parent.alloc(MiB)  # asked, it cannot answer: refused after the short wait
    os.kill(child.pid, signal.SIGCONT)
    wait_until(lambda: _cached_of(parent, session) == 0, 30, "the late answer")
    again = parent.alloc(MiB)  # what it gave back late is there
    again.free()
    filler.free()
    assert parent.check() == []
    assert daemon64.cli("check").returncode == 0


def test_a_forked_child_listens_with_a_thread_of_its_own(daemon64: Daemon) -> None:
    client = daemon64.client()
    client.alloc(4096).free()
    parent_listener = pushes._listener
    assert parent_listener is not None and client._push is not None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: its own session, socket and listener thread
        code = 1
        try:
            client.alloc(4096).free()
            mine = pushes._listener
            ok = mine is not None and mine is not parent_listener and mine.pid == os.getpid()
            ok = ok and client._push is not None and mine._thread.is_alive()
            os.write(write, str(int(ok)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    ok = os.read(read, 10).decode()
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0 and ok == "1"
    assert pushes._listener is parent_listener and parent_listener._thread.is_alive()
    client.alloc(4096).free()  # the parent's client goes on
    assert client.check() == []
