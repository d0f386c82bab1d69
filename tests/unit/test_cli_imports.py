"""The admin commands start fast: importing the CLI leaves the daemon's own
code (server, table store, metrics endpoint) and the demo unimported until
the command that needs them runs."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

RUN_ONLY = ("shmarena.daemon.server", "shmarena.daemon.store", "shmarena.daemon.metrics",
            "shmarena.demo")  # fmt: skip


def test_importing_the_cli_leaves_the_daemon_and_the_demo_out() -> None:
    probe = "import sys, shmarena.cli; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split())
    assert "shmarena.cli.parser" in loaded
    assert loaded.isdisjoint(RUN_ONLY), sorted(loaded & set(RUN_ONLY))
