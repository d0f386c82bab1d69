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


@pytest.mark.skipif(
    not can_unshare("--pid", "--fork", "--mount-proc"),
    reason="needs unshare --pid (root or user namespaces)",
)
def test_client_in_other_pid_namespace_heartbeats_then_is_reclaimed(make_daemon) -> None:
    lease_s = 1.0
    daemon = make_daemon(extra=["--lease", str(lease_s)])
    client = daemon.client()
    child = subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            sys.executable,
            "-c",
            IN_OTHER_PID_NAMESPACE,
        ],
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
