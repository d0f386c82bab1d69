"""The scripts in examples/ as a user runs them: each against a real daemon of
its own, with small arguments, must exit 0 with its summary line and leave the
daemon as it found it (no used bytes, owners, queues or names left). Without a
daemon each must say how to start one. This is the CI smoke test of examples/."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import REPO, Daemon, subprocess_env, unique_name, wait_for

EXAMPLES = {
    "image_pipeline": ["--batches", "6", "--workers", "2", "--images", "4", "--side", "128"],
    "pool_map": ["--arrays", "4", "--side", "512", "--workers", "2"],
    "asyncio_producer_consumer": ["--buffers", "16", "--consumers", "3", "--cancel", "8"],
}


def run_example(
    name: str, args: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", f"{name}.py"), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def footprint(stats: dict[str, Any]) -> tuple[int, int, int, int]:
    return (stats["used_bytes"], stats["owners"], len(stats.get("queues", [])), stats["names"])


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_and_gives_everything_back(
    name: str, make_daemon: Callable[..., Daemon]
) -> None:
    daemon = make_daemon("256M")
    watcher = daemon.client()
    before = footprint(watcher.stats())

    result = run_example(name, EXAMPLES[name], daemon.env)

    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, f"{name} exited with {result.returncode}\n{output}"
    lines = result.stdout.strip().splitlines()
    assert lines and lines[-1].startswith(f"{name}: ok: "), output
    wait_for(
        lambda: footprint(watcher.stats()) == before,
        timeout_s=15,
        what=f"the daemon's used bytes, owners, queues and names back at {before} after {name}",
    )


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_without_a_daemon_says_how_to_start_one(name: str, run_dir: str) -> None:
    result = run_example(name, EXAMPLES[name], subprocess_env(run_dir, unique_name()))

    assert result.returncode == 3, result.stderr
    assert "start one with `shmarena daemon`" in result.stderr
    assert "Traceback" not in result.stderr
