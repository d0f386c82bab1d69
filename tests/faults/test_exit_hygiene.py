"""Exit hygiene: clients leave quietly and leave nothing; a signalled daemon
removes its socket, lock file and arena.

Extends test_end_to_end's test_client_exit_without_close_is_quiet_and_reclaimed
(one cached block, `-W error`) to direct blocks, numpy views, `-X dev`, the
three ways a client can end, and a check of /dev/shm.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

import shmarena
from tests.conftest import Daemon, wait_for

# numpy is in the test extra: the children below import it (a missing one fails them).

# A client that holds cached and direct blocks with live numpy views (and a
# memoryview slice) when it ends: by just exiting, by close(), or by leaving
# a `with` block.
QUIET_CLIENT = r"""
import sys
import numpy as np
import shmarena

how = sys.argv[1]


def use(client):
    small = [client.alloc(4096), client.alloc(65536)]  # from the process's cache
    large = client.alloc(3 << 20)  # straight from the daemon
    owned = client.owner("frames").alloc_many([8192, 2 << 20])
    arrays = []
    for buf in small + [large] + owned:
        array = buf.ndarray(dtype=np.uint8)
        array[:] = 7
        arrays.append(array)
    freed = client.alloc(4096)
    freed.free()
    handle = large.handle  # escaped: known outside the cache
    again = client.attach(handle).ndarray((3 << 20,), np.uint8)
    assert int(again.sum()) == 7 * (3 << 20)
    client.sync()
    print(client.session, flush=True)
    return arrays, again, large.view[:16]


if how == "with":
    with shmarena.connect() as client:
        kept = use(client)
else:
    client = shmarena.connect()
    kept = use(client)
    if how == "close":
        client.close()
"""


def dev_shm() -> set[str]:
    """/dev/shm, less the arenas of other daemons (tests run in parallel by
    others start and stop theirs at any time)."""
    ours = f"shmarena-t-{os.getpid()}-"
    return {
        n for n in os.listdir("/dev/shm") if not n.startswith("shmarena-") or n.startswith(ours)
    }


@pytest.mark.parametrize("how", ["exit", "close", "with"])
def test_client_ends_quietly_and_leaves_nothing(
    daemon: Daemon, client: shmarena.Client, how: str
) -> None:
    base = client.stats()
    before = dev_shm()
    started = time.monotonic()
    child = subprocess.run(
        [sys.executable, "-W", "error", "-X", "dev", "-c", QUIET_CLIENT, how],
        env=daemon.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert child.returncode == 0, child.stderr
    assert child.stderr == ""  # no ResourceWarning, resource_tracker or zmq complaint
    session = int(child.stdout.split()[0])
    assert dev_shm() == before
    wait_for(
        lambda: client.stats()["sessions"] == base["sessions"],
        what=f"session {session} to be reclaimed",
    )
    stats = client.stats()
    assert stats["used_bytes"] == 0 and stats["cached_bytes"] == 0
    assert stats["requested_bytes"] == 0
    assert [o["name"] for o in client.list_owners()] == []
    assert session not in {c["session"] for c in client.list_clients()}
    assert client.check() == []
    print(f"\nFIGURE: client ending by {how}: process ran {seconds:.2f} s, stderr empty")


# -- a signalled daemon cleans up ----------------------------------------------------------

# Holds cached, direct and detached blocks until stdin closes, then checks
# its bytes are still there (the mapping outlives the arena's name) and ends.
HOLDER = r"""
import sys
import shmarena
client = shmarena.connect(timeout_s=1.0)
bufs = client.alloc_many([4096, 65536]) + [client.alloc(3 << 20)]
bufs.append(client.owner("kept", detached=True).alloc(8192))
for buf in bufs:
    buf.view[:] = b"H" * buf.size
client.sync()
print("holding", flush=True)
sys.stdin.read()
assert all(bytes(buf.view) == b"H" * buf.size for buf in bufs)
print("intact", flush=True)
"""

# Allocates, writes and frees in a loop (cached and direct sizes, so it talks
# to the daemon all the time) until the daemon goes; says how it ended.
LOOPER = r"""
import sys
import shmarena
client = shmarena.connect(timeout_s=1.0)
rounds = 0
try:
    while True:
        # 5 MiB: above the cache's large-block budget (4 MiB here), so every
        # round asks the daemon and learns when it is gone
        for size in (4096, 5 << 20, 65536):
            buf = client.alloc(size)
            buf.view[:] = b"L" * size
            buf.free()
        rounds += 1
        if rounds == 20:
            print("looping", flush=True)
except shmarena.DaemonUnavailable as exc:
    print("unavailable", rounds, str(exc).replace("\n", " "), flush=True)
except shmarena.ShmArenaError as exc:
    print("error", rounds, type(exc).__name__, str(exc).replace("\n", " "), flush=True)
"""


def start_client(daemon: Daemon, code: str, ready: str) -> subprocess.Popen[str]:
    proc = daemon.python(
        code, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == ready, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def stop_clients(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("clients", ["holding", "looping"])
def test_signalled_daemon_removes_socket_lock_and_arena(
    make_daemon, signum: signal.Signals, clients: str
) -> None:
    daemon: Daemon = make_daemon()
    assert daemon.proc is not None
    lock = os.path.join(daemon.run_dir, f"{daemon.name}.lock")
    made = (daemon.socket_path, lock, daemon.shm_path)
    assert all(os.path.exists(p) for p in made)
    procs: list[subprocess.Popen[str]] = []
    try:
        if clients == "holding":
            procs = [start_client(daemon, HOLDER, "holding") for _ in range(2)]
        else:
            procs = [start_client(daemon, LOOPER, "looping")]
        sent = time.monotonic()
        daemon.proc.send_signal(signum)

        def gone() -> bool:
            return daemon.proc.poll() is not None and not any(os.path.exists(p) for p in made)

        wait_for(gone, timeout_s=2.0, interval_s=0.001, what="daemon to exit and clean up")
        seconds = time.monotonic() - sent
        assert daemon.proc.returncode == 0
        out = daemon.stop()
        assert f"stopping ({signum.name})" in out, out
        print(
            f"\nFIGURE: {signum.name} with {len(procs)} client(s) {clients}: exited and "
            f"removed socket, lock and arena in {seconds * 1e3:.1f} ms"
        )
        # The clients: holders keep their bytes and exit cleanly; a looping
        # client is told the daemon is gone.
        if clients == "holding":
            for proc in procs:
                out, err = proc.communicate(input="", timeout=30)
                assert proc.returncode == 0 and out.strip() == "intact", (out, err)
                assert err == ""
        else:
            (proc,) = procs
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0 and err == "", (out, err)
            assert re.match(r"unavailable \d+ ", out), out
            print(f"FIGURE: looping client ended with: {out.strip()[:160]}")
    finally:
        stop_clients(procs)
