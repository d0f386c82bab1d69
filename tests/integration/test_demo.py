"""`shmarena demo`, the main job, run as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import Daemon, subprocess_env, unique_name

SMALL = ["--producers", "2", "--batches", "5", "--frames", "4", "--frame-size", "64K"]


def costs(stdout: str) -> dict[str, float]:
    """The numbers of the demo's closing lines: what one alloc+free costs as
    a cache hit, as a round trip, and with multiprocessing.shared_memory."""
    patterns = {
        "hit": r"^  cache hit \(no message to the daemon\): +([0-9.]+) µs$",
        "round_trip": r"^  round trip through the daemon \(cache miss\): +([0-9.]+) µs$",
        "shm": r"^  shared_memory: ([0-9.]+) µs per buffer \(create\+unlink\), "
        r"([0-9.]+)× slower than a cache hit$",
        "producers": r"producer allocs +│ median ([0-9.]+) µs, p99 ([0-9.]+) µs",
    }
    found = {}
    for key, pattern in patterns.items():
        match = re.search(pattern, stdout, re.MULTILINE)
        assert match, f"no line matching {pattern!r} in:\n{stdout}"
        found[key] = float(match.group(1))
        if key == "shm":
            found["ratio"] = float(match.group(2))
    return found


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
    assert "one alloc+free of a 64 KiB buffer (medians, this process alone):" in result.stdout
    found = costs(result.stdout)  # numbers, all of them; their values are the machine's
    assert all(value > 0 for value in found.values()), found
    assert "(the producer allocs above: both kinds, 4 processes on" in result.stdout
    assert not os.path.exists(f"/dev/shm/shmarena-{name}")
    assert [f for f in os.listdir(run_dir) if f.startswith(name)] == []
    assert no_process_mentions(name)


def test_demo_uses_a_running_daemon_and_leaves_it_running(daemon: Daemon) -> None:
    result = daemon.cli("demo", *SMALL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "using the running daemon" in result.stdout
    assert "leaked: 0 bytes" in result.stdout
    costs(result.stdout)
    assert daemon.client().stats()["used_bytes"] == 0
