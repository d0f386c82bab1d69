"""The daemon refuses to start with a clear message, and leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, can_unshare, subprocess_env, unique_name


def run_daemon(run_dir: str, name: str, *args: str, prefix: list[str] | None = None):
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "shmarena", "daemon", *args],
        env=subprocess_env(run_dir, name),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def assert_nothing_left(run_dir: str, name: str) -> None:
    assert not os.path.exists(f"/dev/shm/shmarena-{name}")
    left = [f for f in os.listdir(run_dir) if f.startswith(name)] if os.path.isdir(run_dir) else []
    assert left == []


def test_size_larger_than_dev_shm_fails_at_start(run_dir: str) -> None:
    name = unique_name()
    free = shutil.disk_usage("/dev/shm").free
    asked = (free // (1 << 30) + 64) << 30
    result = run_daemon(run_dir, name, "--size", str(asked))
    assert result.returncode == 1
    message = result.stderr
    assert "/dev/shm" in message and "not enough space" in message
    assert "free of" in message and "--size" in message
    assert_nothing_left(run_dir, name)


@pytest.mark.skipif(
    not can_unshare("--mount", "--propagation", "private"),
    reason="needs unshare --mount (root or user namespaces)",
)
def test_small_dev_shm_in_private_mount_namespace(run_dir: str) -> None:
    name = unique_name()
    script = (
        "mount -t tmpfs -o size=8m tmpfs /dev/shm && "
        f'exec "{sys.executable}" -m shmarena daemon --size 64M; '
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env=subprocess_env(run_dir, name),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 1, result.stderr
    assert "cannot size arena /dev/shm/shmarena-" in result.stderr
    assert "64 MiB" in result.stderr and "8 MiB" in result.stderr
    assert_nothing_left(run_dir, name)


def test_bad_min_block_is_a_usage_error(run_dir: str) -> None:
    name = unique_name()
    result = run_daemon(run_dir, name, "--min-block", "1000")
    assert result.returncode == 2 and "power of two" in result.stderr
    assert_nothing_left(run_dir, name)


def test_durability_without_a_backing_file_is_a_usage_error(run_dir: str) -> None:
    name = unique_name()
    result = run_daemon(run_dir, name, "--size", "8M", "--durability", "sync")
    assert result.returncode == 2 and "--durability sync needs --backing" in result.stderr
    assert_nothing_left(run_dir, name)


def test_too_long_socket_path_is_refused(tmp_path) -> None:
    deep = tmp_path / ("d" * 100)
    name = unique_name()
    result = run_daemon(str(deep), name, "--size", "1M")
    assert result.returncode == 1 and "107-byte limit" in result.stderr
