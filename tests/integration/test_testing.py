"""shmarena.testing, the daemon harness users may test their own code with:
it starts a daemon that answers, stops it, leaves nothing behind, and says
what went wrong when the daemon does not start."""

from __future__ import annotations

import ast
import os
import pathlib

import pytest

import shmarena
from shmarena import testing

PACKAGE = pathlib.Path(shmarena.__file__).parent


def test_start_daemon_answers_and_leaves_nothing_behind() -> None:
    with testing.start_daemon("8M") as daemon:
        client = daemon.client()
        buf = client.alloc(4096)
        buf.view[:3] = b"abc"
        assert os.path.exists(daemon.socket_path) and os.path.exists(daemon.shm_path)
        run_dir = daemon.run_dir
    assert daemon.proc is not None and daemon.proc.returncode == 0
    assert daemon.leftovers() == []
    assert not os.path.exists(run_dir), "the harness made the runtime dir: it removes it"


def test_a_daemon_that_cannot_start_raises_with_its_output() -> None:
    with pytest.raises(testing.DaemonError, match="exited with") as raised:
        testing.start_daemon("not-a-size", timeout_s=30)
    assert "size" in str(raised.value).lower(), "the daemon's own complaint is in the message"


def test_a_killed_daemon_is_cleaned_up_on_close() -> None:
    daemon = testing.start_daemon("8M")
    assert daemon.proc is not None
    daemon.proc.kill()  # no chance to remove its socket and arena
    daemon.proc.wait(timeout=10)
    with pytest.raises(testing.DaemonError, match="left behind"):
        daemon.close()
    assert daemon.leftovers() == []
    assert not os.path.exists(daemon.run_dir)


def test_wait_until_returns_the_value_or_times_out() -> None:
    values = iter([None, 0, "ready"])
    assert testing.wait_until(lambda: next(values), timeout_s=5, what="ready") == "ready"
    with pytest.raises(TimeoutError, match="never"):
        testing.wait_until(lambda: None, timeout_s=0.05, what="never")


def test_nothing_in_shmarena_imports_the_harness() -> None:
    """shmarena.testing is a leaf for users and tests, never a dependency."""
    importers = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "testing.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            if isinstance(node, ast.ImportFrom) and node.module == "shmarena":
                names += [f"shmarena.{a.name}" for a in node.names]
            if "shmarena.testing" in names:
                importers.append(str(path.relative_to(PACKAGE)))
    assert importers == []
