"""`shmarena demo`, the main job, run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import Daemon, subprocess_env, unique_name

SMALL = ["--producers", "2", "--batches", "5", "--frames", "4", "--frame-size", "64K"]


def no_process_mentions(name: str) -> bool:
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if name.encode() in f.read():
                    return False
        except OSError:
            continue
    return True


def test_demo_starts_a_temporary_daemon_and_leaks_nothing(run_dir: str) -> None:
    name = unique_name("demo")
    result = subprocess.run(
        [sys.executable, "-m", "shmarena", "--name", name, "--runtime-dir", run_dir, "demo",
         *SMALL, "--size", "16M"],
        env=subprocess_env(run_dir, name), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "leaked: 0 bytes" in result.stdout
    assert "allocator check: ok" in result.stdout
    assert "40 of 64 KiB" in result.stdout
    assert not os.path.exists(f"/dev/shm/shmarena-{name}")
    assert [f for f in os.listdir(run_dir) if f.startswith(name)] == []
    assert no_process_mentions(name)


def test_demo_uses_a_running_daemon_and_leaves_it_running(daemon: Daemon) -> None:
    result = daemon.cli("demo", *SMALL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "using the running daemon" in result.stdout
    assert "leaked: 0 bytes" in result.stdout
    assert daemon.client().stats()["used_bytes"] == 0
