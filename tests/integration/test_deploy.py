"""The systemd unit scripts/shmarena@.service: `systemd-analyze verify` accepts
it (with ExecStart pointed at this environment's shmarena, since verify checks
that the binary exists), and the command line it runs, with the example env
file's options, is one the daemon's parser accepts."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shmarena.cli import build_parser
from tests.conftest import REPO

UNIT = Path(REPO) / "scripts" / "shmarena@.service"
ENV_EXAMPLE = Path(REPO) / "scripts" / "shmarena.env.example"
PLACEHOLDER = "/usr/local/bin/shmarena"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or (
    "/usr/bin/systemd-analyze" if os.path.exists("/usr/bin/systemd-analyze") else None
)


def directives(text: str) -> dict[str, list[str]]:
    """Key -> its values, in order, over every section of a unit file."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def shmarena_executable(tmp_path: Path) -> str:
    """This environment's `shmarena` script, or a small one that runs this
    interpreter's shmarena (a checkout without the entry point installed)."""
    beside = Path(sys.executable).with_name("shmarena")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    wrapper = tmp_path / "shmarena"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m shmarena "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return str(wrapper)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert PLACEHOLDER in text
    copy = tmp_path / UNIT.name  # the same name: verify instantiates the template from it
    copy.write_text(text.replace(PLACEHOLDER, shmarena_executable(tmp_path)))
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    print(f"systemd-analyze verify: exit {result.returncode}\n{output}")
    ours = [line for line in output.splitlines() if "shmarena" in line or str(copy) in line]
    assert result.returncode == 0, output
    assert ours == [], output


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_notices_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a missing binary are reported."""
    text = UNIT.read_text().replace(PLACEHOLDER, str(tmp_path / "no-such-shmarena"))
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace("Type=simple", "Type=simple\nKilSignal=SIGTERM"))
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "KilSignal" in output and "no-such-shmarena" in output


def test_unit_runs_the_foreground_daemon_and_keeps_dev_shm() -> None:
    found = directives(UNIT.read_text())
    # The daemon serves in the started process: simple, never --detach.
    assert found["Type"] == ["simple"]
    assert found["KillSignal"] == ["SIGTERM"] and found["Restart"] == ["on-failure"]
    assert found["RuntimeDirectory"] == ["shmarena"]
    # PrivateDevices= would give the service a /dev without /dev/shm.
    assert "PrivateDevices" not in found
    (exec_start,) = found["ExecStart"]
    assert "--detach" not in exec_start


def test_exec_start_with_the_example_options_parses() -> None:
    """The daemon accepts the command line systemd would run for
    shmarena@default with scripts/shmarena.env.example as its env file."""
    found = directives(UNIT.read_text())
    env = dict(value.split("=", 1) for value in found["Environment"])
    # The env file is read after Environment=, so its values win.
    env.update({key: values[-1] for key, values in directives(ENV_EXAMPLE.read_text()).items()})
    (exec_start,) = found["ExecStart"]
    # systemd's expansion: %i the instance, ${VAR} one word, $VAR split on spaces.
    line = exec_start.replace("%i", "default")
    line = re.sub(r"\$\{(\w+)\}", lambda m: shlex.quote(env.get(m.group(1), "")), line)
    line = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), ""), line)
    argv = shlex.split(line)
    assert argv[0] == PLACEHOLDER
    args = build_parser().parse_args(argv[1:])
    assert args.command == "daemon" and args.name == "default"
    assert args.runtime_dir == "/run/shmarena"
    assert args.log_format == env["SHMARENA_LOG_FORMAT"] == "text"
    assert args.group == "shmarena" and args.size == 4 << 30
