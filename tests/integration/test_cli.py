"""The admin commands, run as a user would, against a real daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest

import shmarena
from tests.conftest import Daemon, subprocess_env, unique_name, wait_for

REQUIRED_STATS = {
    "name",
    "pid",
    "epoch",
    "size_bytes",
    "used_bytes",
    "free_bytes",
    "largest_free_bytes",
    "min_block_bytes",
    "live_blocks",
    "owners",
    "sessions",
    "free_blocks_by_order",
}


def test_stats_json_has_the_documented_keys(daemon: Daemon) -> None:
    client = daemon.client(cache=False)  # so the arena's layout is the daemon's exact fit
    client.alloc(5 * 4096)
    stats = json.loads(daemon.cli("stats", "--json", check=True).stdout)
    assert set(stats) >= REQUIRED_STATS
    assert stats["used_bytes"] == 5 * 4096
    assert stats["live_blocks"] == 1
    assert stats["name"] == daemon.name
    assert stats == {
        **client.stats(),
        "uptime_s": stats["uptime_s"],
        "counters": stats["counters"],
        "sessions": stats["sessions"],
    }
    by_order = stats["free_blocks_by_order"]
    # 64 MiB minus 5 pages is one free run of 16379 pages: order 13 (8192..16383)
    assert {k: v for k, v in by_order.items() if v} == {"13": 1}
    assert stats["allocator"] == "extents"


def test_buddy_allocator_on_request(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(extra=["--allocator", "buddy"])
    client = daemon.client(cache=False)
    client.alloc(5 * 4096)
    stats = client.stats()
    assert stats["allocator"] == "buddy" and stats["used_bytes"] == 5 * 4096
    by_order = stats["free_blocks_by_order"]
    # 64 MiB minus 5 pages leaves free buddies of 1, 2, 8, ... pages
    assert by_order["0"] == 1 and by_order["1"] == 1 and by_order["2"] == 0


def test_human_output_reads_sizes(daemon: Daemon) -> None:
    daemon.client().alloc(3 << 20)
    status = daemon.cli("status", check=True).stdout
    assert "64 MiB" in status and "3 MiB" in status and str(daemon.proc.pid) in status
    stats = daemon.cli("stats", check=True).stdout
    assert "buddyinfo" in stats and "largest_free_bytes" in stats


def test_name_before_or_after_the_command(daemon: Daemon) -> None:
    env = dict(daemon.env)
    del env["SHMARENA_NAME"]
    for args in (["--name", daemon.name, "check"], ["check", "--name", daemon.name]):
        result = subprocess.run(
            [sys.executable, "-m", "shmarena", *args], env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("ok")


def test_clients_lists_sessions(daemon: Daemon) -> None:
    client = daemon.client(label="worker-1")
    client.alloc(8192)
    rows = json.loads(daemon.cli("clients", "--json", check=True).stdout)
    (row,) = [r for r in rows if r["session"] == client.session]
    assert row["pid"] == os.getpid() and row["blocks"] == 1 and row["bytes"] == 8192
    assert {"session", "pid", "since", "blocks", "bytes"} <= set(row)


def test_recycle_unknown_owner_exits_1_naming_it(daemon: Daemon) -> None:
    result = daemon.cli("recycle", "no-such-owner")
    assert result.returncode == 1
    assert "no-such-owner" in result.stderr


def test_unreachable_daemon_exits_3_naming_the_socket(run_dir: str) -> None:
    name = unique_name()
    result = subprocess.run(
        [sys.executable, "-m", "shmarena", "status"],
        env=subprocess_env(run_dir, name),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 3
    assert os.path.join(run_dir, f"{name}.sock") in result.stderr


def test_usage_error_exits_2(daemon: Daemon) -> None:
    assert daemon.cli("frobnicate").returncode == 2
    assert daemon.cli("daemon", "--size", "lots").returncode == 2


def test_shutdown_stops_the_daemon_and_cleans_up(daemon: Daemon) -> None:
    result = daemon.cli("shutdown", check=True)
    assert str(daemon.proc.pid) in result.stdout
    assert daemon.proc.wait(timeout=10) == 0
    daemon.assert_clean()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(daemon: Daemon, signum: int) -> None:
    daemon.client().alloc(4096)
    daemon.proc.send_signal(signum)
    assert daemon.proc.wait(timeout=10) == 0
    daemon.assert_clean()


def test_second_daemon_refuses_and_names_the_pid(daemon: Daemon) -> None:
    result = daemon.cli("daemon", "--size", "16M")
    assert result.returncode == 1
    assert f"pid {daemon.proc.pid}" in result.stderr and "already running" in result.stderr
    assert daemon.client().ping()


def test_detach_returns_once_the_daemon_answers(run_dir: str) -> None:
    name = unique_name()
    env = subprocess_env(run_dir, name)
    result = subprocess.run(
        [sys.executable, "-m", "shmarena", "daemon", "--size", "8M", "--detach"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    try:
        check = subprocess.run(
            [sys.executable, "-m", "shmarena", "check"], env=env, capture_output=True, text=True
        )
        assert check.returncode == 0
    finally:
        subprocess.run([sys.executable, "-m", "shmarena", "shutdown"], env=env, timeout=30)
    wait_for(lambda: not os.path.exists(f"/dev/shm/shmarena-{name}"), what="arena removed")
    assert not os.path.exists(os.path.join(run_dir, f"{name}.sock"))


def test_stale_socket_and_arena_are_cleaned_at_start(make_daemon: Callable[..., Daemon]) -> None:
    name = unique_name()
    first = make_daemon(name=name)
    first.proc.kill()  # leaves socket, lock file and arena behind
    first.proc.wait()
    assert os.path.exists(first.socket_path) and os.path.exists(first.shm_path)
    second = make_daemon(name=name)
    assert "removed stale socket" in second.stop()
    second.assert_clean()


def test_detach_hands_the_daemon_every_option_it_was_given(run_dir: str, tmp_path) -> None:
    """`--detach` starts a child daemon: it must get every flag, here the two
    that were once forgotten (--debug-compact-bytes, --debug-crash-at)."""
    name = unique_name()
    env = subprocess_env(run_dir, name)
    backing = str(tmp_path / "arena.bin")
    command = [sys.executable, "-m", "shmarena", "daemon", "--size", "8M", "--backing", backing,
               "--debug-compact-bytes", "4K", "--debug-crash-at", "commit.after_sync#800",
               "--detach"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    client = shmarena.connect(name, runtime_dir=run_dir, timeout_s=5.0)
    pid = client.stats()["pid"]
    try:
        for _ in range(300):  # a commit each (1 MiB: too large for the cache)
            client.alloc(1 << 20).free()
        stats = client.stats()
        # --debug-compact-bytes: rewritten whenever it passes 4 KiB, the journal
        # stays small (without, 300 commits of some 150 bytes each: 45 KiB)
        assert stats["journal_commits"] >= 300 and stats["journal_bytes"] < 8 << 10, stats
        with pytest.raises(shmarena.DaemonUnavailable):  # --debug-crash-at: it kills itself
            for _ in range(800):
                client.alloc(1 << 20).free()
    finally:
        client.close()
        subprocess.run([sys.executable, "-m", "shmarena", "shutdown"], env=env, timeout=30)
        wait_for(lambda: process_gone(pid), what="the detached daemon gone")


def process_gone(pid: int) -> bool:
    """No such process, or only a zombie left (its parent, the CLI, has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_refused_sizes_suggest_what_to_write(run_dir: str) -> None:
    env = subprocess_env(run_dir, unique_name())
    for args, said in (
        (["--size", "1,5G"], "not a size: '1,5G'; did you mean 1.5G?"),
        (["--size", "1X"], "unknown unit 'X'; the units are B, K, M, G, T and P"),
        (["--min-block", "5K"], "--min-block 5K (5120 bytes) must be a power of two: use 4K or 8K"),
        (["--size", "100"], "the smallest is --size 4K (4096 bytes)"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "shmarena", "daemon", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, (args, result.stderr)
        assert said in result.stderr, (args, result.stderr)


def test_an_odd_size_is_rounded_up_to_whole_blocks_and_said(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon(size="1.3M", extra=["--max-size", "2.1M"])  # 1363148.8, 2202009.6 bytes
    stats = json.loads(daemon.cli("stats", "--json", check=True).stdout)
    assert stats["size_bytes"] == 1363968  # 333 blocks of 4 KiB
    assert stats["max_size_bytes"] == 2203648  # 538 blocks
    assert daemon.client().check() == []
    output = daemon.stop()
    assert (
        "--size 1363149 bytes (1.3 MiB): using 1363968 bytes (1.3 MiB), rounded up to a "
        "multiple of the 4 KiB minimum block"
    ) in output
    assert "--max-size 2202010 bytes (2.1 MiB): using 2203648 bytes" in output
    daemon.assert_clean()
