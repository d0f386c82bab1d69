"""A client the daemon cannot watch by pid lives on its heartbeat lease. When
it is stopped past the lease its blocks are reclaimed, and when it resumes it
is told so on its next call: it never goes on using blocks that may belong to
someone else by then."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.conftest import Daemon, can_unshare, wait_for

STOPPED_CLIENT = r"""
import sys, shmarena, shmarena.client.client
# The daemon learns the pid from the kernel, so even a client in another pid
# namespace is watched by a pidfd; a start time it cannot confirm is what
# leaves a client on its lease.
shmarena.client.client._own_start_ticks = lambda: 1
client = shmarena.connect()
small = client.alloc(65536)          # from the process cache
big = client.alloc(2 << 20)          # straight from the daemon
small.view[:5] = b"small"
client.sync()
print(client.info["watched"], client.session, flush=True)
sys.stdin.readline()                 # the test stops us, lets the lease run out, resumes us
try:
    client.alloc(65536)
    print("no error", flush=True)
except shmarena.SessionLost as error:
    print("lost", error.details.get("reason"), flush=True)
fresh = client.alloc(65536)          # the next call opens a new session
print("session", client.session, flush=True)
try:
    big.free()
    client.sync()
    print("freed the old block", flush=True)
except shmarena.StaleHandle:
    print("old block refused", flush=True)
fresh.free()
client.close()
"""


def _only_child(pid: int) -> int:
    """The one child of `pid` (unshare --fork runs the command as its child)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = f.read().split()
    return int(children[0]) if len(children) == 1 else 0


@pytest.mark.skipif(
    not can_unshare("--pid", "--fork", "--mount-proc"),
    reason="needs unshare --pid (root or user namespaces)",
)
def test_stopped_unwatched_client_loses_its_session_and_is_told(
    make_daemon: Callable[..., Daemon],
) -> None:
    lease_s = 1.0
    daemon = make_daemon(extra=["--lease", str(lease_s)])
    client = daemon.client()
    child = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
        + [sys.executable, "-c", STOPPED_CLIENT],
        env=daemon.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout and child.stdin
        watched, session = child.stdout.readline().split()
        assert watched == "False"  # lease mode
        assert client.stats()["used_bytes"] == 65536 + (2 << 20)
        python = wait_for(lambda: _only_child(child.pid), what="the client inside unshare")
        os.kill(python, signal.SIGSTOP)
        # Stopped: no heartbeat; the lease runs out and everything comes back.
        wait_for(lambda: client.stats()["sessions"] == 1, what="the lease to expire")
        stats = client.stats()
        assert stats["used_bytes"] == 0 and stats["cached_bytes"] == 0
        # Someone else may now get those very blocks.
        taken = client.alloc_many([65536] * 4 + [2 << 20])
        os.kill(python, signal.SIGCONT)
        child.stdin.write("go\n")
        child.stdin.flush()
        line = child.stdout.readline()
        assert line.split() == ["lost", "lease_expired"], line + child.communicate()[1]
        rest = child.stdout.readlines()
        assert child.wait(timeout=20) == 0, child.communicate()[1]
        assert rest[0].split()[0] == "session" and rest[0].split()[1] != session
        assert rest[1].strip() == "old block refused"
        client.free(taken)
        client.sync()
        wait_for(lambda: client.stats()["sessions"] == 1, what="the client to end")
        assert client.stats()["used_bytes"] == 0
        assert client.check() == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
