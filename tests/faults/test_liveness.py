"""Clients the daemon cannot watch with a pidfd live on a heartbeat lease."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import can_unshare, wait_for

IN_OTHER_PID_NAMESPACE = r"""
import sys, shmarena
client = shmarena.connect()
client.alloc(65536)
print(client.info["watched"], flush=True)
sys.stdin.read()
"""

# A start time the daemon cannot confirm for the kernel's pid: it cannot know
# that a pidfd would name this very process, so the session lives on a lease.
UNCONFIRMED = r"""
import sys, shmarena, shmarena.client.client
shmarena.client.client._own_start_ticks = lambda: 1
client = shmarena.connect()
client.alloc(65536)
print(client.info["watched"], flush=True)
sys.stdin.read()
"""

needs_unshare = pytest.mark.skipif(
    not can_unshare("--pid", "--fork", "--mount-proc"),
    reason="needs unshare --pid (root or user namespaces)",
)


def test_unwatchable_client_heartbeats_then_is_reclaimed(make_daemon) -> None:
    lease_s = 1.0
    daemon = make_daemon(extra=["--lease", str(lease_s)])
    client = daemon.client()
    child = subprocess.Popen(
        [sys.executable, "-c", UNCONFIRMED],
        env=daemon.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout and child.stdin
    assert child.stdout.readline().strip() == "False"  # not watchable: lease mode
    (row,) = [r for r in client.list_clients() if r["session"] != client.session]
    assert row["watch"] == "lease"
    # Alive and heartbeating: still holding its block after several leases.
    started = time.monotonic()
    wait_for(lambda: time.monotonic() - started > 3 * lease_s, what="three leases to pass")
    assert client.stats()["used_bytes"] == 65536
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    wait_for(lambda: client.stats()["used_bytes"] == 0, what="lease to expire")
    assert client.check() == []


@needs_unshare
def test_client_in_other_pid_namespace_is_watched_by_its_kernel_pid(make_daemon) -> None:
    daemon = make_daemon(extra=["--lease", "60"])
    client = daemon.client()
    child = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
        + [sys.executable, "-c", IN_OTHER_PID_NAMESPACE],
        env=daemon.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout and child.stdin
    # It says hello as pid 1 of its namespace; the daemon has its pid from the
    # kernel (as the daemon sees it) and watches that process.
    assert child.stdout.readline().strip() == "True"
    with open(f"/proc/{child.pid}/task/{child.pid}/children") as f:
        (python,) = map(int, f.read().split())
    (row,) = [r for r in client.list_clients() if r["session"] != client.session]
    assert row["watch"] == "pidfd" and row["pid"] == python
    child.send_signal(signal.SIGKILL)  # --kill-child: its python dies too
    child.wait(timeout=10)
    # reclaimed by the pidfd, long before its 60 s lease would run out
    wait_for(lambda: client.stats()["used_bytes"] == 0, timeout_s=30, what="reclaim")
    assert client.check() == []


# A client the daemon watches with a pidfd: holds blocks filled with a byte per
# block, and on "work" checks them, refills them, allocates and frees more.
WATCHED_HOLDER = r"""
import sys, shmarena
client = shmarena.connect()
bufs = client.alloc_many([4096, 65536, 2 << 20])
bufs.append(client.owner("held").alloc(3 << 20))
for i, buf in enumerate(bufs):
    buf.view[:] = bytes([i + 1]) * buf.size
client.sync()
print(client.info["watched"], flush=True)
for line in sys.stdin:
    ok = all(bytes(b.view) == bytes([i + 1]) * b.size for i, b in enumerate(bufs))
    for i, buf in enumerate(bufs):
        buf.view[:] = bytes([i + 11]) * buf.size
    ok = ok and all(bytes(b.view) == bytes([i + 11]) * b.size for i, b in enumerate(bufs))
    more = [client.alloc(size) for size in (4096, 24576, 65536, 4 << 20)]
    for buf in more:
        buf.view[:] = b"m" * buf.size
    ok = ok and all(bytes(b.view) == b"m" * b.size for b in more)
    client.free(more)
    client.sync()
    print("ok" if ok else "bad", flush=True)
"""


def _process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rfind(b")") + 2 :].split()[0].decode()


def test_stopped_client_watched_by_pidfd_keeps_its_blocks(make_daemon) -> None:
    """Policy: a stopped process is alive. Its pidfd says it has not exited,
    and the lease applies only to sessions the daemon cannot watch; so a
    client SIGSTOPped for longer than three leases keeps every block, and
    after SIGCONT it goes on using them and allocating as before."""
    lease_s = 0.5
    daemon = make_daemon(extra=["--lease", str(lease_s)])
    client = daemon.client()
    child = daemon.python(WATCHED_HOLDER, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout and child.stdin
        assert child.stdout.readline().strip() == "True"  # watched by pidfd
        (row,) = [r for r in client.list_clients() if r["pid"] == child.pid]
        assert row["watch"] == "pidfd"
        stats = client.stats()
        held = (stats["used_bytes"], stats["cached_bytes"], stats["counters"]["sessions_reclaimed"])
        assert held[0] == 4096 + 65536 + (2 << 20) + (3 << 20)

        child.send_signal(signal.SIGSTOP)
        wait_for(lambda: _process_state(child.pid) == "T", what="the client to stop")
        stopped_at = time.monotonic()

        def three_leases_with_nothing_reclaimed() -> bool:
            stats = client.stats()
            now = (
                stats["used_bytes"],
                stats["cached_bytes"],
                stats["counters"]["sessions_reclaimed"],
            )
            assert now == held, "a stopped client lost blocks"
            return time.monotonic() - stopped_at > 3 * lease_s

        wait_for(three_leases_with_nothing_reclaimed, what="three leases to pass")
        assert [r["session"] for r in client.list_clients() if r["pid"] == child.pid] == [
            row["session"]
        ]

        child.send_signal(signal.SIGCONT)
        child.stdin.write("work\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "ok"
        assert client.stats()["used_bytes"] == held[0]  # what it allocated after, it freed
        child.stdin.close()  # the child leaves its loop and exits without close()
        assert child.wait(timeout=30) == 0
        wait_for(
            lambda: sum(map(client.stats().get, ("used_bytes", "cached_bytes"))) == 0,
            what="the exited client's blocks to come back",
        )
        assert client.check() == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        if child.stdout:
            child.stdout.close()


BUSY_CLIENT = r"""
import shmarena
client = shmarena.connect()
while True:  # a cached alloc whose handle escapes: every free is a message
    buf = client.alloc(4096)
    buf.handle
    buf.free()
"""


def test_dead_client_is_reclaimed_while_others_keep_the_daemon_busy(make_daemon) -> None:
    """A stream of requests must not keep the daemon from noticing a death
    (its loop handles a bounded number of messages per wake-up)."""
    daemon = make_daemon()
    client = daemon.client()
    busy = [daemon.python(BUSY_CLIENT) for _ in range(4)]
    try:
        wait_for(lambda: client.stats()["sessions"] == 5, what="the busy clients")
        worst = 0.0
        for _ in range(3):
            victim = daemon.python(
                "import shmarena, sys\nc = shmarena.connect()\nc.alloc(1 << 20)\n"
                "print(c.session, flush=True)\nsys.stdin.read()\n",
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            assert victim.stdout is not None
            session = int(victim.stdout.readline())
            victim.kill()
            victim.wait()
            began = time.monotonic()
            wait_for(
                lambda s=session: s not in {r["session"] for r in client.list_clients()},
                timeout_s=5.0,
                what="the dead client's session to be reclaimed under load",
            )
            worst = max(worst, time.monotonic() - began)
        print(f"\nFIGURE: reclaimed under load of 4 busy clients, worst {worst * 1000:.0f} ms")
    finally:
        for p in busy:
            p.kill()
            p.wait()
    wait_for(lambda: client.stats()["sessions"] == 1, what="the busy clients to go")
    assert client.stats()["used_bytes"] == 0 and client.check() == []
