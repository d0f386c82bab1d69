"""The admin commands in pipes, run as a user would: `| head` ends them
quietly, and piped tables show names whole."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import Daemon

LONG_NAME = "pickle-" + "x" * 45 + "-0000001"  # 60 characters, like a leaked owner's


def piped_env(daemon: Daemon) -> dict[str, str]:
    """The daemon's environment without $COLUMNS: a script's, not a terminal's."""
    env = dict(daemon.env)
    env.pop("COLUMNS", None)
    return env


def run_piped(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """`shmarena ARGS` with stdout a pipe (capture_output), $COLUMNS unset."""
    return subprocess.run(
        [sys.executable, "-m", "shmarena", *args],
        env=piped_env(daemon),
        capture_output=True,
        text=True,
        timeout=60,
    )


def first_line_then_close(daemon: Daemon, *args: str) -> tuple[str, int, str]:
    """`shmarena ARGS | head -1`: read one line, close the pipe, and return
    the line, the exit status and what the command wrote to stderr."""
    process = subprocess.Popen(
        [sys.executable, "-m", "shmarena", *args],
        env=piped_env(daemon),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    line = process.stdout.readline()
    process.stdout.close()  # the reader goes away, as head does after its line
    status = process.wait(timeout=60)
    return line, status, process.stderr.read()


def test_a_closed_pipe_ends_every_command_quietly(daemon: Daemon) -> None:
    client = daemon.client()
    for i in range(400):  # output well past a pipe's 64 KiB: the writer must meet EPIPE
        client.owner(f"{LONG_NAME[:-7]}{i:07d}", detached=True).alloc(64, site="leak.py:7")
    line, status, stderr = first_line_then_close(daemon, "owners", "--json")
    assert line == "[\n"
    assert status == 141, stderr  # as a process ended by SIGPIPE: what grep shows
    assert stderr == ""
    for args in (["owners"], ["stats"], ["status"], ["top", "--once"], ["--help"]):
        line, status, stderr = first_line_then_close(daemon, *args)
        assert line.strip(), args
        assert status in (0, 141), (args, status, stderr)
        assert "Traceback" not in stderr and "BrokenPipe" not in stderr, (args, stderr)
        assert stderr == "", (args, stderr)


def test_a_piped_table_prints_a_long_owner_name_whole(daemon: Daemon) -> None:
    client = daemon.client()
    client.owner(LONG_NAME, detached=True).alloc(4096, site="a/rather/long/path/to/job.py:123")
    assert len(LONG_NAME) == 60
    owners = run_piped(daemon, "owners")
    assert owners.returncode == 0, owners.stderr
    (row,) = [line for line in owners.stdout.splitlines() if LONG_NAME in line]
    assert "a/rather/long/path/to/job.py:123 (4 KiB)" in row  # the whole row on one line
    top = run_piped(daemon, "top", "--once")
    assert top.returncode == 0, top.stderr
    assert any(LONG_NAME in line for line in top.stdout.splitlines())


def test_top_once_piped_keeps_each_percentage_on_one_line(daemon: Daemon) -> None:
    client = daemon.client(cache=False)
    held = client.alloc(40 << 20)  # 62.5 % of the 64 MiB arena
    top = run_piped(daemon, "top", "--once")
    assert top.returncode == 0, top.stderr
    (usage,) = [line for line in top.stdout.splitlines() if line.startswith("usage [")]
    assert re.search(r"used 40 MiB \(62\.5 %\), .* free 24 MiB \(37\.5 %\)", usage), usage
    held.free()


def test_with_columns_set_tables_keep_that_width(daemon: Daemon) -> None:
    daemon.client().owner(LONG_NAME, detached=True).alloc(4096)
    env = {**piped_env(daemon), "COLUMNS": "80"}
    owners = subprocess.run(
        [sys.executable, "-m", "shmarena", "owners"], env=env, capture_output=True, text=True
    )
    assert owners.returncode == 0, owners.stderr
    assert LONG_NAME not in owners.stdout  # rich fits the table in 80 columns, as before
    assert max(len(line) for line in owners.stdout.splitlines()) <= 80
