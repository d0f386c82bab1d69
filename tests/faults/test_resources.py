"""Resources: a full /dev/shm, descriptors, many threads, fork and multiprocessing.

Each test runs the real daemon and real client processes; the ones that need
special conditions (a private /dev/shm, a low descriptor limit) set them up
for the daemon's process tree only.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import posix_ipc
import pytest
import zmq

import shmarena
from shmarena.daemon.metrics import METRICS_MAX_CONNECTIONS
from shmarena.daemon.server import process_start_ticks as start_ticks
from shmarena.protocol import FREE_ID_BIT, PROTOCOL_VERSION, Op
from tests.conftest import (
    REPO,
    Daemon,
    can_unshare,
    subprocess_env,
    unique_name,
    wait_for,
)

# -- 1. /dev/shm filled by someone else after the daemon started ------------------------

# Runs inside a private mount namespace whose /dev/shm is a small tmpfs. It
# starts the daemon (killed with us if we die: PR_SET_PDEATHSIG), fills what is
# left of the tmpfs with a hog file, runs one client process per cache mode,
# stops the daemon, and prints one JSON line with everything the test checks.
FULL_SHM_SCRIPT = r"""
import ctypes, errno, json, os, signal, subprocess, sys, time
import shmarena

client_code = sys.argv[1]


def die_with_parent():
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def answers():
    try:
        with shmarena.connect(timeout_s=0.5) as c:
            c.ping()
        return True
    except shmarena.DaemonUnavailable:
        return False


result = {}
daemon = subprocess.Popen(
    [sys.executable, "-m", "shmarena", "daemon", "--size", "8M"],
    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=die_with_parent,
)
try:
    deadline = time.monotonic() + 20
    while not answers():
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("daemon did not come up: " + daemon.stdout.read())
        time.sleep(0.02)
    # Someone else takes every byte that is left.
    hog = os.open("/dev/shm/hog", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        st = os.statvfs("/dev/shm")
        os.posix_fallocate(hog, 0, st.f_bavail * st.f_frsize)
        os.lseek(hog, 0, os.SEEK_END)
        try:
            while os.write(hog, b"h" * 4096):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(hog)
    st = os.statvfs("/dev/shm")
    result["shm_free_after_hog"] = st.f_bavail * st.f_frsize
    result["hog_bytes"] = os.path.getsize("/dev/shm/hog")
    result["clients"] = {}
    for cache in ("True", "False"):
        child = subprocess.run(
            [sys.executable, "-c", client_code, cache],
            capture_output=True, text=True, timeout=120, preexec_fn=die_with_parent,
        )
        result["clients"][cache] = {
            "returncode": child.returncode,
            "stdout": child.stdout,
            "stderr": child.stderr[-2000:],
        }
    with shmarena.connect() as c:
        result["check"] = c.check()
        result["used_after"] = c.stats()["used_bytes"]
finally:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
    try:
        out, _ = daemon.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        daemon.kill()
        out, _ = daemon.communicate()
    result["daemon_returncode"] = daemon.returncode
    result["daemon_output"] = out[-2000:]
    result["shm_left"] = sorted(os.listdir("/dev/shm"))
print(json.dumps(result))
"""

# One client process: allocate mixed sizes round-robin, dropping a size once
# it is refused, until even one byte is refused; write every byte of every
# block, read them all back, free.
FILL_ARENA_CLIENT = r"""
import json, sys
import shmarena

client = shmarena.connect(cache=sys.argv[1] == "True")
size_bytes = client.stats()["size_bytes"]
buffers, refusals = [], 0
sizes = [3 << 20, 5000, 65536, 1, 300_000, 1 << 20, 4096, 12345]
while sizes:
    for size in list(sizes):
        try:
            buffers.append(client.alloc(size))
        except shmarena.OutOfMemory:
            refusals += 1
            sizes.remove(size)
for index, buf in enumerate(buffers):
    buf.view[:] = bytes([index % 251 + 1]) * buf.size
total = sum(buf.size for buf in buffers)
stats = client.stats()
bad = [i for i, buf in enumerate(buffers) if bytes(buf.view) != bytes([i % 251 + 1]) * buf.size]
client.free(buffers)
client.sync()
after = client.stats()
print(json.dumps({
    "blocks": len(buffers), "bytes": total, "cache_max": client.cache_max_bytes,
    "size_bytes": size_bytes, "refusals": refusals,
    "used_full": stats["used_bytes"], "cached_full": stats["cached_bytes"],
    "free_full": stats["free_bytes"], "bad": bad[:10], "used_after": after["used_bytes"],
    "requested_after": after["requested_bytes"], "check": client.check(),
}))
client.close()
"""


@pytest.mark.skipif(
    not can_unshare("--mount", "--propagation", "private"),
    reason="needs unshare --mount (root or user namespaces)",
)
def test_dev_shm_filled_after_start_never_sigbuses(run_dir: str) -> None:
    name = unique_name()
    inner = f'exec "{sys.executable}" -c "$0" "$1"'
    script = f"mount -t tmpfs -o size=16m tmpfs /dev/shm && {inner}"
    started = time.monotonic()
    result = subprocess.run(
        [
            "unshare", "--mount", "--propagation", "private",
            "sh", "-c", script, FULL_SHM_SCRIPT, FILL_ARENA_CLIENT,
        ],
        env=subprocess_env(run_dir, name), capture_output=True, text=True, timeout=180,
        cwd=REPO,
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["shm_free_after_hog"] == 0, report
    figures = []
    for cache, child in report["clients"].items():
        assert child["returncode"] == 0, (cache, child)  # not -SIGBUS, not 135
        assert child["stderr"] == "", (cache, child["stderr"])
        filled = json.loads(child["stdout"])
        assert filled["bad"] == [] and filled["check"] == []
        assert filled["used_after"] == 0 and filled["requested_after"] == 0
        # The arena was full: nothing free, every block handed out and written.
        assert filled["free_full"] == 0 and filled["cached_full"] == 0, filled
        assert filled["used_full"] == filled["size_bytes"], filled
        figures.append(
            f"cache={cache} (cached up to {filled['cache_max']}) blocks={filled['blocks']} "
            f"written={filled['bytes']} "
            f"of {filled['size_bytes']} ({100 * filled['bytes'] / filled['size_bytes']:.1f} %)"
        )
    assert report["check"] == [] and report["used_after"] == 0
    assert report["daemon_returncode"] == 0, report["daemon_output"]
    assert report["shm_left"] == ["hog"]  # the arena went with the daemon
    assert not [f for f in os.listdir(run_dir) if f.startswith(name)]
    print(
        f"\nFIGURE: full /dev/shm (hog {report['hog_bytes']} bytes, 0 free): "
        + "; ".join(figures)
        + f"; {seconds:.2f} s in all"
    )


# -- 2. connect/close cycles leave the daemon's descriptors flat ------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def connect_close_cycles(daemon: Daemon, cycles: int) -> None:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    watcher = daemon.client()
    base = watcher.stats()
    fds_before, own_before = fd_count(pid), fd_count(os.getpid())
    started = time.monotonic()
    for i in range(cycles):
        c = shmarena.connect(daemon.name, runtime_dir=daemon.run_dir, cache=bool(i % 2))
        buf = c.alloc(4096 if i % 3 else 2 << 20)  # cached, and straight from the daemon
        buf.view[:4] = b"used"
        c.close()  # the block goes with the session
    seconds = time.monotonic() - started
    fds_after = wait_for(
        lambda: (n := fd_count(pid)) <= fds_before + 4 and n, what="daemon's fds to settle"
    )
    own_after = fd_count(os.getpid())
    assert own_after <= own_before + 4  # nor the client's
    stats = watcher.stats()
    assert stats["sessions"] == base["sessions"]
    assert stats["used_bytes"] == 0 and stats["requested_bytes"] == 0
    assert stats["counters"]["sessions_opened"] - base["counters"]["sessions_opened"] == cycles
    assert watcher.check() == []
    print(
        f"\nFIGURE: {cycles} connect/alloc/close cycles in {seconds:.2f} s "
        f"({seconds / cycles * 1e3:.2f} ms each); daemon fds {fds_before} -> {fds_after}, "
        f"client process fds {own_before} -> {own_after}"
    )


def test_connect_close_cycles_keep_daemon_fds_flat(daemon: Daemon) -> None:
    connect_close_cycles(daemon, 1000)


@pytest.mark.slow
def test_connect_close_cycles_keep_daemon_fds_flat_10k(daemon: Daemon) -> None:
    connect_close_cycles(daemon, 10_000)


# -- 3. the daemon under a low descriptor limit -----------------------------------------


class LimitedDaemon(Daemon):
    """A Daemon started with RLIMIT_NOFILE set to `nofile` (soft and hard)."""

    nofile = 64

    def start(self) -> LimitedDaemon:
        limit = self.nofile

        def lower_limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shmarena", "daemon", "--size", self.size, *self.extra],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=lower_limit,
        )
        wait_for(self._answers, timeout_s=20, what=f"daemon {self.name} to answer")
        return self

    def remove_leftovers(self) -> list[str]:
        """What a daemon that died without cleaning up left; removed."""
        left = []
        for path in (self.socket_path, os.path.join(self.run_dir, f"{self.name}.lock")):
            if os.path.exists(path):
                left.append(path)
                os.unlink(path)
        if os.path.exists(self.shm_path):
            left.append(self.shm_path)
            posix_ipc.unlink_shared_memory(f"/shmarena-{self.name}")
        return left


@pytest.fixture
def limited_daemon(run_dir: str, request: pytest.FixtureRequest) -> Iterator[LimitedDaemon]:
    """The daemon's extra arguments may come as the fixture's param (indirect)."""
    daemon = LimitedDaemon(unique_name(), run_dir, "64M", list(getattr(request, "param", [])))
    try:
        yield daemon.start()
    finally:
        out = daemon.stop()
        code = daemon.proc.returncode if daemon.proc is not None else 0
        if code is not None and code < 0:  # killed by a signal: say so, and tidy up after it
            left = daemon.remove_leftovers()
            print(f"\ndaemon died of {signal.Signals(-code).name}, leaving {left}:\n{out[-1000:]}")
        daemon.assert_clean()


# Connects, allocates and verifies a block, says how that went, and holds the
# session until its stdin closes.
LIMITED_CLIENT = r"""
import sys
import shmarena
try:
    client = shmarena.connect(timeout_s=1.0)
    buf = client.alloc(65536)
    buf.view[:] = b"%" * 65536
    assert bytes(buf.view) == b"%" * 65536
    client.sync()
    print("ok", "pidfd" if client.info["watched"] else "lease", flush=True)
except shmarena.ShmArenaError as exc:
    print("refused", type(exc).__name__, str(exc).replace("\n", " "), flush=True)
    sys.exit(3)
sys.stdin.read()
"""


def test_more_clients_than_descriptors_do_not_kill_the_daemon(
    limited_daemon: LimitedDaemon,
) -> None:
    daemon = limited_daemon
    assert daemon.proc is not None
    fds_at_start = fd_count(daemon.proc.pid)
    clients = 40  # about 2 daemon fds each (ipc connection, pidfd): more than fit
    procs = [
        daemon.python(LIMITED_CLIENT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for _ in range(clients)
    ]
    try:
        lines = [p.stdout.readline().strip() if p.stdout else "" for p in procs]
        outcomes = [" ".join(line.split()[:2]) for line in lines]
        tally = {o: outcomes.count(o) for o in sorted(set(outcomes))}
        alive = daemon.proc.poll() is None
        print(
            f"\nFIGURE: {clients} clients, daemon nofile {daemon.nofile} "
            f"({fds_at_start} fds at start): {tally}; daemon alive: {alive}"
        )
        # Each client either works or is told clearly that it could not.
        assert set(outcomes) <= {"ok pidfd", "ok lease", "refused DaemonUnavailable"}, lines
        assert tally.get("ok pidfd", 0) >= 1  # a burst of connections may take the fds first
        assert alive, f"daemon exited with {daemon.proc.returncode}"
        # libzmq aborts a process whose accept() fails for want of descriptors,
        # so the daemon stops listening before that and says why.
        assert tally.get("refused DaemonUnavailable", 0) >= 1, tally
        for line in lines:
            if line.startswith("refused"):
                assert "file descriptors" in line or "did not answer" in line, line
    finally:
        for p in procs:
            if p.stdin:
                p.stdin.close()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # Once they are gone, every session is reclaimed and new clients work again.
    def connects() -> shmarena.Client | None:
        try:
            return shmarena.connect(daemon.name, runtime_dir=daemon.run_dir)
        except shmarena.DaemonUnavailable:
            return None

    with wait_for(connects, what="the daemon to accept clients again") as c:
        # A client that got no pidfd lives on a lease: it may take that long.
        lease_s = c.stats()["lease_s"]
        wait_for(
            lambda: c.stats()["sessions"] == 1,
            timeout_s=lease_s + 10,
            what="all sessions to be reclaimed",
        )
        assert c.stats()["used_bytes"] == 0 and c.check() == []


@pytest.mark.parametrize(
    "limited_daemon", [[], ["--metrics-port", "0"]], ids=["plain", "metrics"], indirect=True
)
def test_paused_daemon_keeps_its_clients_and_resumes_when_descriptors_free(
    limited_daemon: LimitedDaemon,
) -> None:
    """Short of descriptors the daemon stops taking new connections but keeps
    serving the ones it has, tells newcomers why, and takes them again as soon
    as descriptors are free. With --metrics-port, scrapers holding every
    connection the endpoint allows (and more) cannot take the descriptors it
    keeps for that."""
    daemon = limited_daemon
    assert daemon.proc is not None
    pid = daemon.proc.pid
    first = daemon.client(timeout_s=5.0)
    metrics_port = first.stats().get("metrics", {}).get("port")
    kept = first.alloc(4096)
    kept.view[:4] = b"kept"
    first.sync()

    def paused() -> bool:
        return not os.path.exists(daemon.socket_path)

    def greeted(conn: socket.socket) -> bool:
        """libzmq greets a connection as soon as it accepted it."""
        try:
            return len(conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)) == 1
        except BlockingIOError:
            return False

    raw: list[socket.socket] = []
    try:
        # Raw connections, one at a time: each is accepted (a descriptor of
        # the daemon's) before the next, until the daemon stops accepting.
        while not paused():
            assert len(raw) < daemon.nofile, "the daemon never stopped accepting"
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.connect(daemon.socket_path)
            except (FileNotFoundError, ConnectionRefusedError):
                conn.close()
                break
            raw.append(conn)
            wait_for(lambda c=conn: paused() or greeted(c), what=f"connection {len(raw)} greeted")
        wait_for(lambda: os.path.exists(daemon.socket_path + ".refusing"), what="the reason")
        connections = len(raw)
        if metrics_port is not None:
            for _ in range(METRICS_MAX_CONNECTIONS + 4):
                scraper = socket.create_connection(("127.0.0.1", metrics_port))
                scraper.sendall(b"GET /metr")  # held open, the request unfinished
                raw.append(scraper)
        # The client it had is served on while it refuses new ones.
        assert first.ping() > 0
        buf = first.alloc(65536)
        buf.view[:] = b"p" * 65536
        assert bytes(buf.view) == b"p" * 65536
        buf.free()
        first.sync()
        assert bytes(kept.view[:4]) == b"kept"
        assert first.check() == []
        with pytest.raises(shmarena.DaemonUnavailable, match="file descriptors"):
            shmarena.connect(daemon.name, runtime_dir=daemon.run_dir, timeout_s=1.0)
        fds_paused = fd_count(pid)
    finally:
        for conn in raw:
            conn.close()
    closed_at = time.monotonic()

    def connects() -> shmarena.Client | None:
        try:
            return shmarena.connect(daemon.name, runtime_dir=daemon.run_dir, timeout_s=1.0)
        except shmarena.DaemonUnavailable:
            return None

    with wait_for(connects, timeout_s=30, what="the daemon to accept clients again") as c:
        resumed_s = time.monotonic() - closed_at
        assert c.ping() > 0
    assert first.stats()["sessions"] >= 1 and bytes(kept.view[:4]) == b"kept"
    kept.free()
    print(
        f"\nFIGURE: nofile {daemon.nofile}{' with --metrics-port' if metrics_port else ''}: "
        f"paused after {connections} raw connections ({fds_paused} daemon fds); the first "
        "client was served throughout; a new "
        f"client connected {resumed_s:.2f} s after they closed"
    )


# -- 4. sixteen threads share one client ------------------------------------------------

CACHED_SIZES = [1, 100, 4096, 5000, 65536, 200_000, 1 << 20]
DIRECT_SIZES = [(1 << 20) + 1, 3 << 19]


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "nocache"])
def test_sixteen_threads_share_one_client(make_daemon: Callable[..., Daemon], cache: bool) -> None:
    daemon = make_daemon(size="256M")
    client = daemon.client(cache=cache)
    threads, rounds, keep = 16, 200, 3
    live: dict[int, tuple[int, int]] = {}  # offset -> (end, thread): blocks out right now
    live_lock = threading.Lock()
    overlaps: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def take(buf: shmarena.Buffer, me: int) -> None:
        lo, hi = buf.offset, buf.offset + buf.size
        with live_lock:
            for offset, (end, who) in live.items():
                if offset < hi and lo < end:
                    overlaps.append(f"[{lo}, {hi}) of {me} overlaps [{offset}, {end}) of {who}")
            live[lo] = (hi, me)

    def give_back(buf: shmarena.Buffer, pattern: bytes) -> None:
        assert bytes(buf.view) == pattern, "a live buffer's bytes changed under it"
        with live_lock:
            del live[buf.offset]
        buf.free()

    def work(me: int) -> None:
        rng = random.Random(me)
        held: list[tuple[shmarena.Buffer, bytes]] = []
        try:
            start.wait()
            for i in range(rounds):
                sizes = DIRECT_SIZES if i % 6 == 5 else CACHED_SIZES
                buf = client.alloc(rng.choice(sizes))
                take(buf, me)
                pattern = bytes([(me * 31 + i) % 251 + 1]) * buf.size
                buf.view[:] = pattern  # every byte
                if i % 10 == 0:
                    buf.handle  # noqa: B018 - escaped: its free goes through the daemon
                held.append((buf, pattern))
                if len(held) > keep:
                    give_back(*held.pop(rng.randrange(len(held))))
            for buf, pattern in held:
                give_back(buf, pattern)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    started = time.monotonic()
    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=120)
    seconds = time.monotonic() - started
    assert not any(t.is_alive() for t in workers)
    assert errors == []
    assert overlaps == []
    assert live == {}
    client.sync()
    stats = client.stats()
    assert stats["requested_bytes"] == 0 and stats["used_bytes"] == 0
    assert stats["size_bytes"] == (
        stats["used_bytes"]
        + stats["cached_bytes"]
        + stats["retained_only_bytes"]
        + stats["pinned_bytes"]
        + stats["free_bytes"]
    )
    assert client.check() == []
    print(
        f"\nFIGURE: {threads} threads x {rounds} alloc/write/verify/free (cache={cache}) "
        f"in {seconds:.2f} s"
    )


# -- 5. fork() and multiprocessing ------------------------------------------------------

# The test's own client, inherited by children forked from the test process;
# a spawned child starts without it and connects itself.
_PARENT: shmarena.Client | None = None
_WORKER: shmarena.Client | None = None


def _child_client(name: str, run_dir: str) -> shmarena.Client:
    global _WORKER
    if _PARENT is not None:
        return _PARENT  # forked: its first call opens a session of this child's own
    if _WORKER is None:
        _WORKER = shmarena.connect(name, runtime_dir=run_dir)
    return _WORKER


def _make_blocks(name: str, run_dir: str, tag: int) -> dict[str, Any]:
    """In a child: session blocks (cached and direct) and one in a detached
    owner, each filled with its own byte; returns their handles."""
    client = _child_client(name, run_dir)
    made = []
    buffers = client.alloc_many([4096, 65536]) + [client.alloc(2 << 20)]
    buffers.append(client.owner(f"kept-{tag}", detached=True).alloc(8192))
    for index, buf in enumerate(buffers):
        fill = (tag * 7 + index) % 251 + 1
        buf.view[:] = bytes([fill]) * buf.size
        made.append((buf.handle, fill))
    client.sync()
    return {"pid": os.getpid(), "session": client.session, "blocks": made}


def _process_main(name: str, run_dir: str, tag: int, out: Any, done: Any) -> None:
    out.put(_make_blocks(name, run_dir, tag))
    done.wait(30)  # hold the blocks until the parent has looked at them


def _check_block(client: shmarena.Client, handle: shmarena.Handle, fill: int) -> bool:
    return bytes(client.attach(handle).view) == bytes([fill]) * handle.size


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_children_get_their_own_sessions(
    daemon: Daemon, client: shmarena.Client, method: str, capfd: pytest.CaptureFixture[str]
) -> None:
    global _PARENT
    ctx = multiprocessing.get_context(method)
    mine = [client.alloc(4096), client.alloc(2 << 20)]  # cached, direct: must stay intact
    for buf in mine:
        buf.view[:] = b"P" * buf.size
    client.sync()
    base = client.stats()
    results: list[dict[str, Any]] = []
    _PARENT = client
    try:
        # Processes: each reports its blocks, holds them while we check, exits.
        out, done = ctx.Queue(), ctx.Event()
        procs = [
            ctx.Process(target=_process_main, args=(daemon.name, daemon.run_dir, tag, out, done))
            for tag in (1, 2)
        ]
        for p in procs:
            p.start()
        try:
            got = [out.get(timeout=60) for _ in procs]
            assert all(_check_block(client, h, fill) for r in got for h, fill in r["blocks"])
            results += got
        finally:
            done.set()
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
                    p.join()
        assert [p.exitcode for p in procs] == [0, 0]
        # A pool: its workers keep their sessions (and blocks) until the pool closes.
        with ctx.Pool(2) as pool:
            got = pool.starmap(_make_blocks, [(daemon.name, daemon.run_dir, t) for t in (3, 4)])
            assert all(_check_block(client, h, fill) for r in got for h, fill in r["blocks"])
            results += got
            pool.close()
            pool.join()
    finally:
        _PARENT = None
    sessions = {r["session"] for r in results}
    assert client.session not in sessions and 0 not in sessions
    # Children gone: only their detached blocks are left, and ours.
    kept = {f"kept-{t}" for t in (1, 2, 3, 4)}
    detached_bytes = 4 * 8192
    wait_for(
        lambda: client.stats()["used_bytes"] == base["used_bytes"] + detached_bytes,
        what="the children's session blocks to be reclaimed",
    )
    stats = client.stats()
    assert stats["sessions"] == base["sessions"]
    assert {o["name"] for o in client.list_owners()} == kept | {f"session-{client.session}"}
    for r in results:
        handle, fill = r["blocks"][-1]  # the detached one outlives its child
        assert _check_block(client, handle, fill)
    assert all(bytes(buf.view) == b"P" * buf.size for buf in mine)
    for name in sorted(kept):
        client.recycle(name)
    client.free(mine)
    client.sync()
    assert client.stats()["used_bytes"] == 0
    assert client.check() == []
    err = capfd.readouterr().err
    assert "Assertion failed" not in err and "Traceback" not in err, err


# -- 6. a client that never reads its replies -------------------------------------------


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def test_a_client_that_never_reads_cannot_bloat_the_daemon(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon(size="128M", extra=["--metrics-port", "0"])
    assert daemon.proc is not None
    pid = daemon.proc.pid
    owner = daemon.client(cache=False)
    held = []
    for _ in range(20):
        held += owner.alloc_many([4096] * 1000)  # so each BLOCKS reply is ~180 KB
    reply_bytes = len(msgpack.packb(owner.blocks()))
    rss_before = rss_bytes(pid)
    requests = 1400  # ~250 MB of replies if the daemon kept them all

    context: zmq.Context[Any] = zmq.Context()
    hog = context.socket(zmq.DEALER)
    hog.setsockopt(zmq.LINGER, 0)
    hog.setsockopt(zmq.RCVHWM, 1)  # its own side takes in as little as it can
    hog.setsockopt(zmq.RCVBUF, 4096)
    try:
        hog.connect(f"ipc://{daemon.socket_path}")
        me = os.getpid()
        hog.send(msgpack.packb([int(Op.HELLO), 1, PROTOCOL_VERSION, me, start_ticks(me), "", []]))
        for n in range(requests):
            hog.send(msgpack.packb([int(Op.BLOCKS), FREE_ID_BIT + n, 100_000]))

        def blocks_served() -> int:
            return int(owner.stats()["counters"]["ops"].get("blocks", 0))

        # Others are served meanwhile; the hog's requests are all handled.
        wait_for(lambda: blocks_served() > requests, timeout_s=300, what="the BLOCKS requests")
        rss_after = rss_bytes(pid)
        assert owner.ping() > 0 and owner.check() == []
        stats = owner.stats()
        grown = rss_after - rss_before
        assert grown < 200 << 20, f"the daemon grew by {grown >> 20} MiB"
        replies = stats["replies"]
        limits = stats["limits"]
        held_at_most = limits["buffered_replies"] + limits["queued_reply_bytes"] // reply_bytes + 1
        assert replies["dropped_unread"] >= requests - held_at_most
        assert replies["clients_not_reading"] == 1
        assert replies["queued_bytes"] <= limits["queued_reply_bytes"]
        url = f"http://127.0.0.1:{stats['metrics']['port']}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            scraped = response.read().decode()
        counted = f"shmarena_replies_dropped_unread_total {float(replies['dropped_unread'])}"
        assert counted in scraped.splitlines()

        # Once it reads, what the daemon kept for it goes out and it is a
        # client like any other again.
        def caught_up() -> bool:
            while hog.poll(0):
                hog.recv()
            now = owner.stats()["replies"]
            return now["queued_bytes"] == 0 and now["clients_not_reading"] == 0

        wait_for(caught_up, timeout_s=60, what="the kept replies to be read")
    finally:
        hog.close(linger=0)
        context.term()
    owner.free(held)
    out = daemon.stop()
    assert "does not read its replies" in out, out[-2000:]
    assert "reads its replies again" in out, out[-2000:]
    print(
        f"\nFIGURE: {requests} BLOCKS requests of {reply_bytes} reply bytes never read: daemon "
        f"RSS {rss_before >> 20} -> {rss_after >> 20} MiB, {replies['dropped_unread']} "
        "replies dropped"
    )
