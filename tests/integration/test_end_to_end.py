"""A real daemon, real shared memory, real ZeroMQ, real client processes."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

import shmarena
from tests.conftest import Daemon, wait_for

# One daemon for the whole module (tests/conftest.py: shared_daemon).
pytestmark = pytest.mark.shared_daemon

# A child process that attaches a handle read from stdin, checks what A wrote,
# writes its own answer into the same bytes, and says so.
READER = r"""
import pickle, sys
import shmarena
handle = pickle.loads(bytes.fromhex(sys.stdin.readline()))
client = shmarena.connect()
buf = client.attach(handle)
assert bytes(buf.view[:11]) == b"from-A-1234", bytes(buf.view[:11])
buf.view[:11] = b"from-B-5678"
print("written", flush=True)
sys.stdin.readline()
client.close()
"""


def start_reader(daemon: Daemon, code: str, handle: shmarena.Handle) -> subprocess.Popen[str]:
    """A child process running `code`, with `handle` pickled on its stdin."""
    reader = daemon.python(code, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert reader.stdin and reader.stdout
    reader.stdin.write(pickle.dumps(handle).hex() + "\n")
    reader.stdin.flush()
    return reader


def test_two_processes_see_the_same_bytes(daemon: Daemon, client: shmarena.Client) -> None:
    buf = client.alloc(1 << 20)
    buf.view[:11] = b"from-A-1234"
    reader = start_reader(daemon, READER, buf.handle)
    assert reader.stdin and reader.stdout
    assert reader.stdout.readline().strip() == "written"
    assert bytes(buf.view[:11]) == b"from-B-5678"
    reader.stdin.write("\n")
    reader.stdin.close()
    assert reader.wait(timeout=30) == 0
    buf.free()


def test_numpy_view_shares_bytes(client: shmarena.Client) -> None:
    import numpy as np  # in the test extra

    buf = client.alloc(4096 * 8)
    array = buf.ndarray((64, 64), np.float64)
    array[:] = 2.5
    again = client.attach(buf.handle).ndarray((64, 64), "float64")
    assert float(again.sum()) == 2.5 * 64 * 64
    del array, again
    buf.free()


def test_exact_fit_five_pages_use_five_pages(daemon: Daemon) -> None:
    client = daemon.client(cache=False)  # the daemon's own fit, no cache classes
    before = client.stats()["used_bytes"]
    buf = client.alloc(5 * 4096)
    assert client.stats()["used_bytes"] - before == 5 * 4096
    buf.free()
    client.sync()  # the free was sent without waiting
    stats = client.stats()
    assert stats["used_bytes"] == before
    assert stats["free_bytes"] == stats["largest_free_bytes"] == stats["size_bytes"]


def test_recycle_frees_exactly_that_owner(client: shmarena.Client) -> None:
    with client.owner("batch-a") as a:
        a_bufs = a.alloc_many([4096, 8192, 12288])
        b = client.owner("batch-b")
        b_buf = b.alloc(65536)
        b_buf.view[:4] = b"keep"
        assert client.recycle("batch-a") == shmarena.Recycled(3, 24576)
    owners = {o["name"]: o for o in client.list_owners()}
    assert "batch-a" not in owners
    assert owners["batch-b"]["blocks"] == 1 and owners["batch-b"]["bytes"] == 65536
    assert bytes(b_buf.view[:4]) == b"keep"
    with pytest.raises(shmarena.StaleHandle):
        a_bufs[0].free()
    with pytest.raises(shmarena.UnknownOwner, match="batch-a"):
        client.recycle("batch-a")
    b.recycle()
    assert client.stats()["used_bytes"] == 0


def test_owner_context_recycles_on_exit(client: shmarena.Client) -> None:
    with client.owner("frames") as frames:
        frames.alloc_many([65536] * 4)
        assert client.stats()["used_bytes"] == 4 * 65536
    assert client.stats()["used_bytes"] == 0
    assert all(o["name"] != "frames" for o in client.list_owners())


def test_detached_owner_survives_its_creator(daemon: Daemon, client: shmarena.Client) -> None:
    code = (
        "import shmarena\n"
        "c = shmarena.connect()\n"
        "c.owner('kept', detached=True).alloc_many([4096] * 3)\n"
        "c.alloc(4096)\n"  # session scope: goes with the process
        "c.close()\n"
    )
    assert daemon.python(code).wait(timeout=30) == 0
    result = daemon.cli("owners", "--json", check=True)
    rows = json.loads(result.stdout)
    assert [(r["name"], r["scope"], r["blocks"], r["bytes"]) for r in rows] == [
        ("kept", "detached", 3, 3 * 4096)
    ]
    assert {"name", "scope", "pid", "blocks", "bytes", "age_s"} <= set(rows[0])
    table = daemon.cli("owners", check=True).stdout
    assert "kept" in table and "detached" in table
    assert daemon.cli("recycle", "kept", check=True).stdout.startswith("recycled 'kept': 3 blocks")
    assert client.stats()["used_bytes"] == 0


RETAINER = r"""
import pickle, sys
import shmarena
handle = pickle.loads(bytes.fromhex(sys.stdin.readline()))
client = shmarena.connect()
buf = client.attach(handle, retain=True)
print("retained", flush=True)
if sys.stdin.readline().strip() == "release":
    assert bytes(buf.view[:6]) == b"frame0"
    buf.release()
    print("released", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.parametrize("reader_ends_by", ["release", "sigkill"])
def test_retained_block_survives_owner_recycle(
    daemon: Daemon, client: shmarena.Client, reader_ends_by: str
) -> None:
    batch = client.owner("batch-r")
    buf = batch.alloc(4096)
    buf.view[:6] = b"frame0"
    reader = start_reader(daemon, RETAINER, buf.handle)
    assert reader.stdin and reader.stdout
    assert reader.stdout.readline().strip() == "retained"

    assert batch.recycle() == shmarena.Recycled(1, 4096)
    stats = client.stats()
    assert stats["used_bytes"] == 0
    assert stats["retained_only_bytes"] == 4096
    assert stats["free_bytes"] + stats["cached_bytes"] == stats["size_bytes"] - 4096
    # Nobody else can be handed those bytes while the reader holds them.
    others = client.alloc_many([4096] * 8)
    assert all(o.offset != buf.offset for o in others)
    client.free(others)

    if reader_ends_by == "release":
        reader.stdin.write("release\n")
        reader.stdin.flush()
        assert reader.stdout.readline().strip() == "released"
    else:
        reader.send_signal(signal.SIGKILL)
    # It goes back to the cache it came from (this client's), not to the arena.
    wait_for(
        lambda: client.stats()["retained_only_bytes"] == 0,
        what="retained block to return",
    )
    stats = client.stats()
    assert stats["free_bytes"] + stats["cached_bytes"] == stats["size_bytes"]
    client.sync()  # brings the daemon's notice: the cache hands it out next
    assert client.alloc(4096).offset == buf.offset
    reader.stdin.close()
    reader.wait(timeout=30)
    assert client.check() == []


HOLDER = r"""
import shmarena, sys
client = shmarena.connect()
client.alloc_many([65536] * 16)
client.owner("held").alloc_many([1 << 20] * 4)
client.owner("survives", detached=True).alloc(4096)
print("holding", flush=True)
sys.stdin.read()
"""


def test_sigkilled_client_blocks_come_back(daemon: Daemon, client: shmarena.Client) -> None:
    holder = daemon.python(HOLDER, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout
    assert holder.stdout.readline().strip() == "holding"
    held = 16 * 65536 + 4 * (1 << 20)
    assert client.stats()["used_bytes"] == held + 4096
    killed_at = time.monotonic()
    holder.send_signal(signal.SIGKILL)
    wait_for(lambda: client.stats()["used_bytes"] == 4096, what="session bytes to return")
    reclaim_s = time.monotonic() - killed_at
    print(f"\nreclaimed {held} bytes {reclaim_s * 1000:.1f} ms after SIGKILL")
    holder.wait(timeout=10)
    assert holder.stdin
    holder.stdin.close()
    owners = [o["name"] for o in client.list_owners()]
    assert owners == ["survives"]
    assert client.stats()["counters"]["sessions_reclaimed"] >= 1
    client.recycle("survives")
    assert client.check() == []


def test_double_free_and_stale_handles(client: shmarena.Client) -> None:
    buf = client.alloc(4096)
    handle = buf.handle
    buf.free()
    with pytest.raises(shmarena.StaleHandle, match="double free"):
        client.free(handle)
    with pytest.raises(shmarena.StaleHandle, match="double free"):
        buf.free()
    with pytest.raises(shmarena.StaleHandle, match="epoch"):
        client.attach(handle._replace(epoch=handle.epoch + 1))
    # A block the daemon handed out directly is freed without waiting: the
    # refusal of a second free comes with the next call. (Above the cache's
    # large-block budget, 4 MiB here: smaller ones are the cache's, refused at once.)
    big = client.alloc(8 << 20)
    big_handle = big.handle
    big.free()
    client.free(big_handle)
    with pytest.raises(shmarena.StaleHandle, match="double free"):
        client.sync()
    with pytest.raises(shmarena.StaleHandle, match="epoch"):
        client.free(handle._replace(epoch=handle.epoch + 1, generation=1))  # known at once
    client.free(big_handle._replace(generation=big_handle.generation + 7))
    client.stats()  # its refusal arrives while this call waits ...
    with pytest.raises(shmarena.StaleHandle, match="double free"):
        client.list_owners()  # ... and is raised by the next one, before it is sent
    with pytest.raises(shmarena.StaleHandle, match="freed already"):
        buf.view[0]  # a freed Buffer refuses its view (issue 20)
    assert client.check() == []


def test_out_of_memory_is_a_memory_error_with_figures(client: shmarena.Client) -> None:
    size = client.stats()["size_bytes"]
    with pytest.raises(MemoryError) as info:
        client.alloc(size + 1)
    error = info.value
    assert isinstance(error, shmarena.OutOfMemory)
    assert error.requested_bytes == size + 1
    assert error.largest_free_bytes == size == error.free_bytes
    assert "largest free block 64 MiB" in str(error)


@pytest.mark.parametrize("size", [0, -1, 2.5, "4096", True])
def test_bad_sizes_are_invalid_requests(client: shmarena.Client, size: object) -> None:
    with pytest.raises(shmarena.InvalidRequest):
        client.alloc(size)  # type: ignore[arg-type]


def test_huge_size_is_out_of_memory(client: shmarena.Client) -> None:
    with pytest.raises(shmarena.OutOfMemory):
        client.alloc(2**62)


def test_session_owner_is_private_to_its_session(daemon: Daemon, client: shmarena.Client) -> None:
    client.owner("mine")
    other = daemon.client()
    with pytest.raises(shmarena.InvalidRequest, match="belongs to session"):
        other.owner("mine")


def test_fork_child_gets_its_own_session(client: shmarena.Client) -> None:
    buf = client.alloc(4096)
    buf.view[:2] = b"pa"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must not touch the parent's socket
        code = 1
        try:
            child_buf = client.alloc(4096)
            child_buf.view[:2] = bytes(buf.view[:2])
            ok = client.session != 0 and bytes(child_buf.view[:2]) == b"pa"
            # Its second alloc comes from a cache of its own, never the parent's.
            again = client.alloc(4096)
            ok = ok and again.offset not in (buf.offset, child_buf.offset)
            os.write(write, f"{client.session} {int(ok)}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    child_session, ok = os.read(read, 100).decode().split()
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0 and ok == "1"
    assert int(child_session) != client.session
    # The parent's client still works, and the child's block went with it.
    wait_for(lambda: client.stats()["used_bytes"] == 4096, what="child's block to return")
    buf.free()


def test_threads_share_one_client(client: shmarena.Client) -> None:
    import threading

    errors: list[BaseException] = []

    kept: list[shmarena.Buffer] = []

    def work(seed: int) -> None:
        try:
            for i in range(300):
                buf = client.alloc(4096 * (1 + (seed + i) % 5))  # cached classes, shared
                buf.view[:8] = seed.to_bytes(8, "little")
                if i % 50 == 0:
                    buf.handle  # noqa: B018 - some escape: freed through the daemon
                if i % 30 == 0:
                    kept.append(buf)  # some stay out
                else:
                    assert bytes(buf.view[:8]) == seed.to_bytes(8, "little")  # nobody else's
                    buf.free()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({b.offset for b in kept}) == len(kept)  # no block handed out twice
    client.sync()
    stats = client.stats()
    assert stats["used_bytes"] == sum(-(-b.size // 4096) * 4096 for b in kept)
    client.free(kept)
    client.sync()
    assert client.stats()["used_bytes"] == 0
    assert client.check() == []


def test_silent_daemon_raises_daemon_unavailable_then_recovers(daemon: Daemon) -> None:
    client = daemon.client(timeout_s=0.3)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(shmarena.DaemonUnavailable, match=daemon.socket_path):
            client.stats()
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    # The late reply to stats() is told apart from the reply to this call.
    assert isinstance(wait_for(lambda: _ping_or_none(client), what="daemon to answer"), float)
    assert client.stats()["sessions"] >= 1


def _ping_or_none(client: shmarena.Client) -> float | None:
    try:
        return client.ping()
    except shmarena.DaemonUnavailable:
        return None


def test_connect_without_daemon_names_the_socket(run_dir: str) -> None:
    with pytest.raises(shmarena.DaemonUnavailable, match=f"{run_dir}/nobody.sock"):
        shmarena.connect("nobody", runtime_dir=run_dir)


def test_client_exit_without_close_is_quiet_and_reclaimed(
    daemon: Daemon, client: shmarena.Client
) -> None:
    code = "import shmarena\nc = shmarena.connect()\nc.alloc(4096).view[:1] = b'x'\n"
    child = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        env=daemon.env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert child.returncode == 0 and child.stderr == ""
    wait_for(lambda: client.stats()["used_bytes"] == 0, what="the exited client's block")


def test_a_client_dropped_unclosed_in_a_reference_cycle_is_collected(daemon: Daemon) -> None:
    # The collector clears weak references before finalizers run: a zmq
    # context of its own would then wait in __del__ for a socket it can no
    # longer see, and hang the process inside whatever code triggered gc.
    child = daemon.python(
        "import gc, shmarena\n"
        "gc.disable()\n"  # collect several together: the order of their finalizers varies
        "for i in range(200):\n"
        "    c = shmarena.connect()\n"
        "    c.cycle = c\n"
        "    del c\n"
        "    if i % 7 == 0:\n"
        "        gc.collect()\n"
        "gc.collect()\n"
        "print('collected', flush=True)\n",
        stdout=subprocess.PIPE,
    )
    try:
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0 and out.strip() == "collected"
