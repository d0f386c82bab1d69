"""The soak script (scripts/soak.py) run as a test, plus the bug it found.

The script starts its own daemon (name soak-<pid>-<random>, runtime dir from
mkdtemp), so it cannot collide with the fixtures' daemons; it stops everything
itself. These tests read its --json figures and check that nothing of it is
left: no arena in /dev/shm, no runtime dir, no process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import shmarena
from tests.conftest import REPO, Daemon

SCRIPT = os.path.join(REPO, "scripts", "soak.py")


def ours_alive(pid: int, marker: str) -> bool:
    """Whether `pid` still runs a process of this soak (its cmdline has `marker`)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read()
    except OSError:
        return False


def run_soak(tmp_path: Path, args: list[str], timeout_s: float) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "soak.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, *args, "--json", str(out), "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script stops its workers and daemon
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"soak did not finish within {timeout_s} s:\n{output}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(output)
    assert out.exists(), f"soak wrote no JSON (exit {proc.returncode}):\n{output}"
    figures: dict[str, Any] = json.loads(out.read_text())
    # Nothing of the run is left behind.
    leftovers = [f for f in os.listdir("/dev/shm") if f.startswith(f"shmarena-soak-{proc.pid}-")]
    assert not leftovers, f"the soak left {leftovers} in /dev/shm"
    assert not os.path.exists(figures["daemon"]["shm_path"])
    assert not os.path.exists(figures["daemon"]["run_dir"])
    assert figures["cleanup"] == {"daemon_exit": 0, "socket_gone": True, "arena_gone": True}
    assert not ours_alive(figures["daemon"]["pid"], figures["daemon"]["name"])
    children = [figures["processes"]["checker"], *figures["processes"]["workers"]]
    assert not [pid for pid in children if pid and ours_alive(pid, "multiprocessing")]
    return proc.returncode, figures


def print_figures(figures: dict[str, Any]) -> None:
    reclaim, exits, hand = figures["reclaim_ms"], figures["exit_ms"], figures["handoffs"]
    print(
        f"FIGURE: soak {figures['config']['procs']} procs {figures['elapsed_s']} s: "
        f"ops {figures['ops']} ({figures['ops_per_s']}/s), allocs {figures['allocs']}, "
        f"frees {figures['frees']}, recycles {figures['recycles']}, oom {figures['oom']}, "
        f"stamps verified {figures['verified_buffers']}"
    )
    print(
        f"FIGURE: soak kills {figures['kills']}, reclaim median {reclaim['median']} ms "
        f"worst {reclaim['max']} ms (process seen dead: median {exits['median']} ms, "
        f"worst {exits['max']} ms)"
    )
    print(
        f"FIGURE: soak hand-offs sent {hand['sent']}, checked {hand['checked']}, "
        f"verified {hand['verified']}, stale {hand['stale']}; errors {figures['errors']}, "
        f"corrupted {figures['corrupted']}, check runs {figures['check_runs']}"
    )
    for command, lat in figures["admin"].items():
        print(
            f"FIGURE: soak admin {command}: n={lat['count']} p50 {lat['p50_ms']} ms "
            f"p99 {lat['p99_ms']} ms max {lat['max_ms']} ms"
        )


def assert_passed(code: int, figures: dict[str, Any], min_kills: int, min_ops: int) -> None:
    assert figures["errors"] == 0, figures["error_messages"]
    assert figures["corrupted"] == 0, figures["corruption_messages"]
    assert figures["check_clean"], figures["check_failures"]
    accounting = figures["accounting"]
    assert accounting["ok"], accounting
    assert accounting["survivors_reported"] == accounting["survivors"] > 0
    assert figures["kills"] >= min_kills
    assert figures["reclaim_ms"]["count"] == figures["kills"]
    assert figures["ops"] >= min_ops
    assert figures["allocs"] > 0 and figures["frees"] > 0 and figures["recycles"] > 0
    assert figures["handoffs"]["verified"] > 0
    for command, lat in figures["admin"].items():
        assert lat["count"] > 0, f"admin command {command} never ran"
    assert code == 0 and figures["ok"], figures["reasons"]


def test_soak_short(tmp_path: Path) -> None:
    """4 workers for 8 s, one SIGKILL a second: stamps intact, check always
    clean, every killed session reclaimed, accounting exact."""
    args = ["--procs", "4", "--duration", "8", "--kill-every", "1", "--cli-every", "4"]
    code, figures = run_soak(tmp_path, args, timeout_s=180)
    print_figures(figures)
    assert_passed(code, figures, min_kills=3, min_ops=500)


@pytest.mark.slow
def test_soak_default(tmp_path: Path) -> None:
    """The script's default run: 8 workers for 2 minutes, a SIGKILL every 2 s."""
    code, figures = run_soak(tmp_path, [], timeout_s=900)
    print_figures(figures)
    assert_passed(code, figures, min_kills=20, min_ops=5000)


def test_retain_of_a_live_cached_block_whose_previous_hand_out_is_unreported(
    daemon: Daemon,
) -> None:
    """Found by the soak: the cache reported a block's hand-out, took it back
    and handed it out again; another process's retain of the new handle
    arrives before both reports and must be honoured, not refused as stale."""
    writer = daemon.client()
    reader = daemon.client()
    refused = []
    for _ in range(20):
        first = writer.alloc(100)
        writer.sync()  # the daemon knows this hand-out
        first.free()  # back in the cache at once; the daemon is told later
        second = writer.alloc(100)  # the same block, next generation: live, held
        assert second.offset == first.offset
        try:
            reader.release(reader.attach(second.handle, retain=True))
        except shmarena.StaleHandle as exc:
            refused.append(str(exc))
        second.free()
        writer.sync()
    print(f"FIGURE: retains of a live cached block refused: {len(refused)}/20")
    assert not refused, refused[0]
