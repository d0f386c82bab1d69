"""`attach` checks a handle against the arena's generation table, in shared
memory, and refuses a stale one without asking the daemon.

Every test runs a real daemon; "no round trip" is shown by SIGSTOPping the
daemon around the attach: a refusal that needed the daemon would wait for it
and fail with DaemonUnavailable instead of StaleHandle. Cached sizes (64 KiB,
served by the client cache) and daemon sizes (8 MiB, allocated by the daemon
itself) go through every case.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmarena
from shmarena import Handle, StaleHandle
from tests.conftest import Daemon, wait_for

# One daemon for the whole module (tests/conftest.py: shared_daemon).
pytestmark = pytest.mark.shared_daemon

KiB, MiB = 1 << 10, 1 << 20
SIZES = [pytest.param(64 * KiB, id="cached"), pytest.param(8 * MiB, id="daemon")]


@contextmanager
def daemon_stopped(daemon: Daemon) -> Iterator[None]:
    """The daemon process is SIGSTOPped inside the block: nothing it would
    answer can come back meanwhile."""
    assert daemon.proc is not None
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)


def refused_locally(daemon: Daemon, client: shmarena.Client, handle: Handle) -> str:
    """The message of the StaleHandle a plain attach raises with the daemon
    stopped (so without a round trip); then `retain=True` must raise too."""
    with daemon_stopped(daemon), pytest.raises(StaleHandle) as refused:
        client.attach(handle)
    with pytest.raises(StaleHandle):
        client.attach(handle, retain=True)
    message = str(refused.value)
    assert str(tuple(handle)) in message or f"{handle.offset:#x}" in message, message
    return message


CONSUMER = """
import json, sys, shmarena
c = shmarena.connect()
out = []
for wire in json.loads(sys.stdin.read()):
    handle = shmarena.Handle(*wire)
    row = []
    for retain in (False, True):
        try:
            buf = c.attach(handle, retain=retain)
        except shmarena.StaleHandle as error:
            row.append("stale: " + str(error))
        else:
            row.append("ok " + bytes(buf.view[:4]).hex())
            if retain:
                buf.release()
    out.append(row)
print(json.dumps(out))
c.close()
"""


def attach_in_child(daemon: Daemon, handles: list[Handle]) -> list[list[str]]:
    """Per handle, what another process gets from a plain attach and from
    `attach(retain=True)`: "ok <first 4 bytes hex>" or "stale: <message>"."""
    child = daemon.python(CONSUMER, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out, _ = child.communicate(json.dumps([list(h) for h in handles]), timeout=60)
    assert child.returncode == 0
    return json.loads(out)  # type: ignore[no-any-return]


STOPPED_CONSUMER = """
import json, sys, shmarena
c = shmarena.connect(timeout_s=2.0)
print("ready", flush=True)
out = []
for wire in json.loads(sys.stdin.readline()):
    try:
        c.attach(shmarena.Handle(*wire))
    except shmarena.ShmArenaError as error:
        out.append(type(error).__name__ + ": " + str(error))
    else:
        out.append("ok")
print(json.dumps(out), flush=True)
sys.stdin.readline()
"""


def attach_in_child_while_daemon_stopped(daemon: Daemon, handles: list[Handle]) -> list[str]:
    """Per handle, what a plain attach in another process (connected before)
    gives while the daemon is SIGSTOPped: "ok" or "<error class>: <message>"
    (a round trip would end in DaemonUnavailable after 2 s)."""
    child = daemon.python(STOPPED_CONSUMER, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
        with daemon_stopped(daemon):
            child.stdin.write(json.dumps([list(h) for h in handles]) + "\n")
            child.stdin.flush()
            rows = json.loads(child.stdout.readline())
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return rows  # type: ignore[no-any-return]


# -- refusals -------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_attach_of_a_freed_block_is_refused_without_a_round_trip(daemon: Daemon, size: int) -> None:
    client = daemon.client()
    buf = client.alloc(size)
    buf.view[:4] = b"live"
    handle = buf.handle
    assert bytes(client.attach(handle).view[:4]) == b"live"
    buf.free()
    message = refused_locally(daemon, client, handle)
    assert "freed" in message and "retain=True" in message, message
    [elsewhere] = attach_in_child_while_daemon_stopped(daemon, [handle])
    assert elsewhere.startswith("StaleHandle: ") and "freed" in elsewhere, elsewhere
    client.sync()
    [[plain, retained]] = attach_in_child(daemon, [handle])
    assert plain.startswith("stale:") and "freed" in plain, plain
    assert retained.startswith("stale:"), retained


@pytest.mark.parametrize("size", SIZES)
def test_attach_after_the_owner_was_recycled_says_so(daemon: Daemon, size: int) -> None:
    client = daemon.client()
    with client.owner("batch") as batch:
        handle = batch.alloc(size).handle
    message = refused_locally(daemon, client, handle)
    assert "recycled" in message, message
    with pytest.raises(StaleHandle) as refused:
        client.attach(handle)
    assert refused.value.details["reason"] == "recycled"
    [[plain, retained]] = attach_in_child(daemon, [handle])
    assert plain.startswith("stale:") and "recycled" in plain, plain
    assert retained.startswith("stale:"), retained


@pytest.mark.parametrize("size", SIZES)
def test_attach_of_a_block_handed_out_again_says_so(daemon: Daemon, size: int) -> None:
    client = daemon.client()
    old = client.alloc(size)
    handle = old.handle
    old.free()
    client.sync()  # the block is back where it can be handed out again
    held = []
    for _ in range(64):
        buf = client.alloc(size)
        held.append(buf)
        if buf.offset == handle.offset and buf.segment == handle.segment:
            break
    else:
        pytest.fail("the freed block was not handed out again in 64 allocations")
    assert buf.handle.generation != handle.generation
    buf.view[:4] = b"new!"
    message = refused_locally(daemon, client, handle)
    assert "handed out again" in message, message
    [[plain, retained], [new_plain, _]] = attach_in_child(daemon, [handle, buf.handle])
    assert plain.startswith("stale:") and "handed out again" in plain, plain
    assert retained.startswith("stale:"), retained
    assert new_plain == "ok " + b"new!".hex()


@pytest.mark.parametrize("size", SIZES)
def test_a_guessed_handle_is_refused(daemon: Daemon, size: int) -> None:
    client = daemon.client()
    buf = client.alloc(size)
    real = buf.handle
    guessed = real._replace(generation=real.generation + 1000)
    message = refused_locally(daemon, client, guessed)
    assert "generation" in message, message
    # A block start that was never handed out in this arena: its last 8 MiB.
    never = real._replace(offset=56 * MiB, size=size, generation=7)
    message = refused_locally(daemon, client, never)
    assert "never handed out" in message, message
    # Not a block start at all.
    inside = real._replace(offset=real.offset + 512)
    with pytest.raises(StaleHandle, match="not the start of a block"):
        client.attach(inside)
    assert bytes(client.attach(real).view[:1]) == bytes(buf.view[:1])  # the real one attaches


PRODUCER = """
import json, os, signal, sys, shmarena
c = shmarena.connect()
handles = []
for size in map(int, sys.argv[1:]):
    buf = c.alloc(size)
    buf.view[:4] = b"dead"
    handles.append(list(buf.handle))
print(json.dumps(handles), flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_attach_after_the_producer_was_killed_says_its_session_ended(daemon: Daemon) -> None:
    """The producer hands out a cached and a daemon block, publishes their
    handles and is SIGKILLed at once (its cache may not even have reported
    the hand-out): once the daemon reclaimed it, both are refused, here and
    in another process."""
    client = daemon.client()
    producer = daemon.python(
        PRODUCER, str(64 * KiB), str(8 * MiB), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert producer.stdout is not None and producer.stdin is not None
    handles = [Handle(*h) for h in json.loads(producer.stdout.readline())]
    for handle in handles:  # alive: they attach
        assert bytes(client.attach(handle).view[:4]) == b"dead"
    producer.stdin.write("\n")
    producer.stdin.flush()
    producer.wait(timeout=30)
    assert producer.returncode == -signal.SIGKILL
    wait_for(
        lambda: all(r["pid"] != producer.pid for r in client.list_clients()),
        what="the daemon to reclaim the killed producer",
    )
    for handle in handles:
        message = refused_locally(daemon, client, handle)
        assert "session ended" in message and "exited" in message, message
    for row in attach_in_child_while_daemon_stopped(daemon, handles):
        assert row.startswith("StaleHandle: ") and "session ended" in row, row
    for plain, retained in attach_in_child(daemon, handles):
        assert plain.startswith("stale:") and "session ended" in plain, plain
        assert retained.startswith("stale:"), retained


def test_another_epoch_is_refused_first(daemon: Daemon) -> None:
    client = daemon.client()
    handle = client.alloc(64 * KiB).handle
    with pytest.raises(StaleHandle, match="epoch"):
        client.attach(handle._replace(epoch=handle.epoch + 1))


# -- what must still attach -------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_live_handles_attach_here_and_in_another_process(daemon: Daemon, size: int) -> None:
    client = daemon.client()
    buffers = [client.alloc(size) for _ in range(3)]
    for i, buf in enumerate(buffers):
        buf.view[:4] = f"b{i:03}".encode()
    handles = [b.handle for b in buffers]
    with daemon_stopped(daemon):
        for i, handle in enumerate(handles):
            assert bytes(client.attach(handle).view[:4]) == f"b{i:03}".encode()
    rows = attach_in_child(daemon, handles)
    assert rows == [[f"ok {f'b{i:03}'.encode().hex()}"] * 2 for i in range(3)]
    assert attach_in_child_while_daemon_stopped(daemon, handles) == ["ok"] * 3


def test_an_early_cache_handle_attaches_before_the_daemon_heard_of_it(daemon: Daemon) -> None:
    """A cache hand-out the daemon has not heard of yet (it is stopped) still
    attaches from another client; once it runs again, retain works too."""
    producer, consumer = daemon.client(), daemon.client()
    producer.alloc(64 * KiB).free()  # the class is in the cache now
    with daemon_stopped(daemon):
        buf = producer.alloc(64 * KiB)
        buf.view[:4] = b"earl"
        handle = buf.handle
        assert bytes(consumer.attach(handle).view[:4]) == b"earl"
    kept = consumer.attach(handle, retain=True)
    assert bytes(kept.view[:4]) == b"earl"
    kept.release()


def test_handles_in_added_segments_are_checked_too(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon("16M", ["--max-size", "256M", "--shrink-after", "0"])
    client = daemon.client()
    buffers = [client.alloc(6 * MiB) for _ in range(6)]  # 36 MiB: at least one added segment
    grown = [b for b in buffers if b.segment > 0]
    assert grown, [b.segment for b in buffers]
    for buf in buffers:
        buf.view[:4] = b"grow"
    live, freed = grown[0].handle, grown[-1].handle
    grown[-1].free()
    client.sync()
    live_row, freed_row = attach_in_child(daemon, [live, freed])
    assert live_row == ["ok " + b"grow".hex()] * 2
    assert freed_row[0].startswith("stale:") and "freed" in freed_row[0], freed_row
    assert freed_row[1].startswith("stale:"), freed_row
    assert "freed" in refused_locally(daemon, client, freed)


# -- the table's lifetime ---------------------------------------------------------


def table_files(daemon: Daemon) -> list[str]:
    base = os.path.basename(daemon.shm_path)
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith(base + ".") and "gens" in f)


def test_the_table_goes_with_the_daemon_and_a_crashed_ones_is_removed(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon()
    assert table_files(daemon) == [os.path.basename(daemon.shm_path) + ".gens"]
    client = daemon.client()
    assert client.stats()["generation_table_bytes"] == 64 * MiB // 4096 * 8  # 8 B per 4 KiB
    handle = client.alloc(64 * KiB).handle
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(timeout=10)
    daemon.stopped = True
    assert table_files(daemon), "a SIGKILLed daemon cannot remove its table"
    again = make_daemon(name=daemon.name)
    assert table_files(again) == [os.path.basename(daemon.shm_path) + ".gens"]
    other = again.client()
    with pytest.raises(StaleHandle, match="epoch"):
        other.attach(handle)
    fresh = other.alloc(64 * KiB)
    assert bytes(other.attach(fresh.handle).view[:1]) == bytes(fresh.view[:1])
    again.stop()
    assert table_files(again) == []


# -- the race that remains, and what closes it ---------------------------------------


@pytest.mark.parametrize(
    "size", [pytest.param(64 * KiB, id="cached"), pytest.param(2 * MiB, id="daemon")]
)
def test_retain_keeps_the_block_from_reuse_and_other_allocations_untouched(
    make_daemon: Callable[..., Daemon], size: int
) -> None:
    """A reader that attached with retain=True before the producer freed may
    write on: the block is not handed out again while it is retained, so 48
    fresh allocations of the same size never see its bytes."""
    daemon = make_daemon("256M")
    producer, reader = daemon.client(), daemon.client()
    buf = producer.alloc(size)
    kept = reader.attach(buf.handle, retain=True)
    buf.free()
    producer.sync()
    fresh = []
    for _ in range(48):
        new = producer.alloc(size)
        new.view[:] = b"\0" * size
        fresh.append(new)
    assert all((b.segment, b.offset) != (kept.segment, kept.offset) for b in fresh)
    kept.view[:] = b"\xff" * size  # the documented way a stale write could still happen
    assert all(not any(b.view) for b in fresh)
    kept.release()


def test_check_compares_the_table_with_the_ledger(daemon: Daemon) -> None:
    """`shmarena check` reads the generation table too: a live word where no
    block is (written here through this client's mapping) is reported."""
    client = daemon.client()
    held = client.alloc(8 * MiB)
    assert client.check() == []
    table = client._tables[0]
    index = 48 * MiB // 4096  # free: nothing was handed out there
    table[index] = 12345
    try:
        problems = client.check()
        assert any("live under generation 12345" in p for p in problems), problems
        assert daemon.cli("check").returncode == 1
    finally:
        table[index] = 0
    assert client.check() == []
    held.free()


# -- any interleaving -------------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(0, 2), st.booleans()),
        st.tuples(st.just("free"), st.integers(0, 63)),
        st.tuples(st.just("recycle")),
        st.tuples(st.just("attach"), st.integers(0, 63)),
        st.tuples(st.just("sync")),
    ),
    max_size=40,
)


class Producer:
    """The producer of the interleavings below: it allocates (cached and daemon
    sizes, blocks of its own and of owner "o"), frees, recycles and syncs, and
    knows every handle it published and which of them are dead."""

    SIZES = (4 * KiB, 64 * KiB, 2 * MiB)  # cached, cached, daemon

    def __init__(self, client: shmarena.Client) -> None:
        self.client = client
        self.owner = client.owner("o")
        self.live: list[tuple[shmarena.Buffer, bool]] = []  # (buffer, in owner "o")
        self.published: list[tuple[Handle, bytes]] = []
        self.dead: set[Handle] = set()

    def step(self, op: tuple) -> None:
        """Apply `op` (an item of OPS; "attach" is the consumer's)."""
        if op[0] == "alloc" and len(self.live) < 16:
            buf = (self.owner if op[2] else self.client).alloc(self.SIZES[op[1]])
            stamp = os.urandom(8)
            buf.view[:8] = stamp
            self.published.append((buf.handle, stamp))
            self.live.append((buf, op[2]))
        elif op[0] == "free" and self.live:
            buf, _ = self.live.pop(op[1] % len(self.live))
            self.dead.add(buf.handle)
            buf.free()
        elif op[0] == "recycle":
            self.dead.update(b.handle for b, in_owner in self.live if in_owner)
            self.live = [(b, in_owner) for b, in_owner in self.live if not in_owner]
            self.client.recycle("o")
            self.owner = self.client.owner("o")
        elif op[0] == "sync":
            self.client.sync()


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS)
def test_attach_accepts_exactly_the_live_handles(daemon: Daemon, ops: list[tuple]) -> None:
    """Whatever a producer does (cached and daemon sizes, its own blocks and an
    owner's, frees, recycles), a consumer's plain attach of any handle it
    ever published succeeds exactly while that block is live, and then shows
    the producer's bytes."""
    producer, consumer = daemon.client(), daemon.client()
    made = Producer(producer)
    try:
        for op in ops:
            made.step(op)
            if op[0] == "attach" and made.published:
                handle, stamp = made.published[op[1] % len(made.published)]
                if handle in made.dead:
                    with pytest.raises(StaleHandle):
                        consumer.attach(handle)
                else:
                    assert bytes(consumer.attach(handle).view[:8]) == stamp
        assert producer.check() == []
    finally:
        daemon.clients.remove(producer)
        daemon.clients.remove(consumer)
        producer.close()
        consumer.close()


ATTACHER = """
import sys, shmarena
c = shmarena.connect()
for line in sys.stdin:
    try:
        buf = c.attach(shmarena.Handle(*map(int, line.split())))
    except shmarena.StaleHandle as error:
        print("stale", error.details.get("reason"), flush=True)
    else:
        print("ok", bytes(buf.view[:8]).hex(), flush=True)
c.close()
"""


def test_attach_in_another_process_accepts_exactly_the_live_handles(daemon: Daemon) -> None:
    """As above, with the consumer a process of its own (one for every
    example), asked over a pipe after each step of the producer."""
    child = daemon.python(ATTACHER, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    stdin, stdout = child.stdin, child.stdout

    def attach(handle: Handle) -> list[str]:
        stdin.write(" ".join(map(str, handle)) + "\n")
        stdin.flush()
        return stdout.readline().split()

    attaches = [0]

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ops=OPS)
    def run(ops: list[tuple]) -> None:
        producer = shmarena.connect(daemon.name, runtime_dir=daemon.run_dir)
        made = Producer(producer)
        try:
            for op in ops:
                made.step(op)
                if not made.published:
                    continue
                # After each step: the handle it names (attach) or the newest one.
                pick = op[1] if op[0] == "attach" else -1
                handle, stamp = made.published[pick % len(made.published)]
                answer = attach(handle)
                attaches[0] += 1
                if handle in made.dead:
                    assert answer[0] == "stale", (handle, answer)
                    assert answer[1] in ("freed", "recycled", "handed_out_again"), answer
                else:
                    assert answer == ["ok", stamp.hex()], (handle, answer)
            assert producer.check() == []
        finally:
            producer.close()

    try:
        run()
    finally:
        stdin.close()
        assert child.wait(timeout=30) == 0
    print(f"FIGURE: {attaches[0]} attaches in another process checked")
    assert attaches[0] >= 100
