"""The daemon survives its own bugs, in a real daemon: with a fault injected
(`--debug-fail`), the request it hits gets `InternalError`, the failure is
counted and logged with its traceback, other clients go on, `shmarena check`
passes."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

import shmarena
from tests.conftest import Daemon


def test_a_failing_op_answers_internal_error_and_the_daemon_goes_on(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon("16M", ["--debug-fail", "recycle"])
    a, b = daemon.client(), daemon.client()
    kept = a.owner("batch").alloc(4096)
    with pytest.raises(shmarena.InternalError) as caught:
        a.recycle("batch")
    message = str(caught.value)
    assert "while handling recycle" in message and "passed its check" in message
    assert [o["blocks"] for o in a.list_owners() if o["name"] == "batch"] == [1]  # nothing changed
    kept.view[:3] = b"abc"
    buf = b.alloc(8192)  # another client goes on
    buf.view[:2] = b"ok"
    b.free(buf)
    stats = b.stats()
    assert stats["counters"]["internal_errors"] == 1
    assert stats["counters"]["errors_by_code"]["internal_error"] == 1
    assert daemon.cli("check").returncode == 0
    assert daemon.proc is not None and daemon.proc.poll() is None
    out = daemon.stop()
    assert "internal error in the daemon while handling recycle" in out
    assert "Traceback (most recent call last)" in out and "--debug-fail recycle" in out


def test_a_failure_while_answering_a_kept_request_is_that_request_s(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon("16M", ["--debug-fail", "wake"])
    a, b = daemon.client(), daemon.client()
    with pytest.raises(shmarena.InternalError) as caught:
        a.lookup("never-published", timeout=0.3)  # kept, then timed out: the fault hits
    assert "a waiting lookup" in str(caught.value)
    buf = b.alloc(4096)
    b.publish("now", buf)
    assert bytes(a.lookup("now", timeout=0).view[:1]) == b"\0"  # met at once: not kept
    assert b.stats()["counters"]["internal_errors"] == 1
    assert daemon.cli("check").returncode == 0
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_an_unknown_fault_name_is_a_usage_error(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon("16M")
    result = daemon.cli("daemon", "--name", daemon.name + "x", "--debug-fail", "nope")
    assert result.returncode == 2 and "'nope'" in result.stderr and "alloc" in result.stderr


def test_a_failing_table_write_is_rewritten_whole_and_survives_a_crash(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A bug while writing a --backing table (after it took the changes) is
    counted, the table is written whole instead, and what was acknowledged
    is there after a SIGKILL and a restart."""
    backing = ["--backing", str(tmp_path / "arena"), "--grace", "1"]
    first = make_daemon("16M", [*backing, "--debug-fail", "commit"])
    with first.client(cache=False) as a:
        a.owner("kept", detached=True).alloc(8192).view[:4] = b"safe"
        assert a.stats()["counters"]["internal_errors"] >= 1
    assert first.proc is not None and first.proc.poll() is None
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=10)
    second = make_daemon("16M", backing, name=first.name)
    with second.client(cache=False) as b:
        rows = [o for o in b.list_owners() if o["name"] == "kept"]
        assert [(o["blocks"], o["bytes"]) for o in rows] == [(1, 8192)]
        assert b.check() == []
