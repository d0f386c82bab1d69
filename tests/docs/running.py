"""Running `python` and `console` blocks, and cleaning up after a file.

A `Sandbox` is where a file's blocks run: a temp dir as cwd, and an
environment whose SHMARENA_NAME and SHMARENA_RUNTIME_DIR name the file's
daemon, whose PYTHONPATH puts this repository first, and whose PATH starts
with a directory where `python` is this interpreter and `shmarena` is
`python -m shmarena` of this repository (so a console block runs the code
under test, installed or not), and without the COLUMNS and LINES of the
terminal that runs the tests. `stop_daemons_in` stops whatever daemon a block
left running in the file's runtime dir.

Like tests/docs/blocks.py, every check returns a list of problems.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from shmarena import testing
from shmarena.config import lock_path, shm_name, socket_path
from tests.docs.blocks import REPO, Block

DEFAULT_TIMEOUT_S = 60.0
_EXIT = re.compile(r"#\s*exit\s+(\d+)\s*$")
_NUMBER = re.compile(r"\d+(?:\.\d+)*")
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(?P<word>\w+)\1")


@dataclass
class Sandbox:
    """A file's cwd and environment (see the module's docstring)."""

    cwd: str
    env: dict[str, str]
    name: str
    run_dir: str

    @classmethod
    def make(cls, name: str | None = None, run_dir: str | None = None) -> Sandbox:
        """A fresh cwd, a shim bin dir, and (unless given) a unique daemon
        name and a fresh 0700 runtime dir."""
        name = name or testing.unique_name()
        run_dir = run_dir or testing.new_runtime_dir("shmd-")
        cwd = tempfile.mkdtemp(prefix="shmarena-docs-")
        bin_dir = os.path.join(cwd, ".bin")
        os.mkdir(bin_dir)
        for program, command in (
            ("python", f'exec {sys.executable} "$@"'),
            ("python3", f'exec {sys.executable} "$@"'),
            ("shmarena", f'exec {sys.executable} -m shmarena "$@"'),
        ):
            path = os.path.join(bin_dir, program)
            with open(path, "w") as f:
                f.write(f"#!/bin/sh\n{command}\n")
            os.chmod(path, stat.S_IRWXU)
        env = testing.Daemon(name, run_dir).env
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        for inherited in ("COLUMNS", "LINES"):  # the runner's terminal is not the reader's
            env.pop(inherited, None)
        return cls(cwd, env, name, run_dir)

    def remove(self) -> None:
        """Remove the cwd and the runtime dir (after `stop_daemons_in`)."""
        shutil.rmtree(self.cwd, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def timeout_of(block: Block) -> float:
    return float(block.directives.get("timeout", DEFAULT_TIMEOUT_S))


def _shown(output: str) -> str:
    return f"--- output ---\n{output.rstrip()}\n--------------" if output.strip() else "(no output)"


# -- python --------------------------------------------------------------------


def _run(argv: list[str], sandbox: Sandbox, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run a block's program in the page's sandbox: no stdin, output and
    errors together (as a reader sees them in a terminal)."""
    return subprocess.run(
        argv,
        cwd=sandbox.cwd,
        env=sandbox.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout_s,
    )


def run_python(block: Block, sandbox: Sandbox) -> list[str]:
    """The block as a script in a fresh interpreter: it must exit 0 in time."""
    script = os.path.join(sandbox.cwd, f"block_{block.line}.py")
    with open(script, "w") as f:
        f.write(block.body)
    try:
        done = _run([sys.executable, script], sandbox, timeout_of(block))
    except subprocess.TimeoutExpired as expired:
        out = expired.output.decode(errors="replace") if isinstance(expired.output, bytes) else ""
        return [f"{block.where}: still running after {timeout_of(block):g} s\n{_shown(out)}"]
    if done.returncode != 0:
        return [
            f"{block.where}: the python block exited with {done.returncode}\n{_shown(done.stdout)}"
        ]
    return []


# -- console -------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One `$ ` command of a console block, what it must exit with, and the
    output lines shown after it."""

    line: int  # in the file
    text: str
    status: int
    shown: tuple[str, ...]


def parse_console(block: Block) -> tuple[list[Command], list[str]]:
    """The commands of a console block, and problems (text before the first `$ `)."""
    commands: list[Command] = []
    problems: list[str] = []
    lines = block.body.rstrip("\n").split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("$ "):
            if line.strip():
                problems.append(
                    f"{block.path}:{block.body_line + i}: output before any `$ ` command: {line!r}"
                )
            i += 1
            continue
        start, text = i, line[2:]
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text + "\n" + lines[i]
        expected = _EXIT.search(text.rsplit("\n", 1)[-1])
        heredoc = _HEREDOC.search(text)
        if heredoc:  # the lines up to the terminator are the command's input, not output
            while i + 1 < len(lines) and lines[i].strip() != heredoc["word"]:
                i += 1
                text = text + "\n" + lines[i]
        i += 1
        shown = []
        while i < len(lines) and not lines[i].startswith("$ "):
            shown.append(lines[i])
            i += 1
        commands.append(
            Command(
                block.body_line + start,
                text,
                int(expected[1]) if expected else 0,
                tuple(s for s in shown if s.strip()),
            )
        )
    if not commands:
        problems.append(f"{block.where}: a console block without a `$ ` command")
    return commands, problems


def normalise(line: str) -> str:
    """A line as output is compared: numbers are N, whitespace runs one space."""
    return " ".join(_NUMBER.sub("N", line).split())


def _pattern(shown: str) -> re.Pattern[str]:
    """A normalised shown line as a pattern: `...` inside it is any text."""
    return re.compile(".*".join(re.escape(part) for part in normalise(shown).split("...")))


def missing_lines(shown: tuple[str, ...], output: str, name: str = "") -> list[str]:
    """The shown lines that the real output does not have, in order: each
    normalised shown line must match a later output line than the one before
    it; a line `...` matches any number of lines, `...` inside a line any
    text. The sandbox's daemon `name` reads as "default" in the output."""
    if name:
        output = output.replace(name, "default")
    real = [normalise(line) for line in output.splitlines()]
    position = 0
    for i, line in enumerate(shown):
        if line.strip() == "...":
            continue
        pattern = _pattern(line)
        found = next((j for j in range(position, len(real)) if pattern.fullmatch(real[j])), None)
        if found is None:
            return list(shown[i:])
        position = found + 1
    return []


def run_console(block: Block, sandbox: Sandbox) -> list[str]:
    """Each command in order by `bash -c`: its exit status as declared, its
    shown output found in what it printed (stdout and stderr)."""
    commands, problems = parse_console(block)
    if problems:
        return problems
    for command in commands:
        where = f"{block.path}:{command.line}"
        try:
            done = _run(["bash", "-c", command.text], sandbox, timeout_of(block))
        except subprocess.TimeoutExpired:
            return [f"{where}: `{command.text}` still running after {timeout_of(block):g} s"]
        if done.returncode != command.status:
            return [
                f"{where}: `{command.text}` exited with {done.returncode}, the block says "
                f"{command.status} (declare another with `# exit N`)\n{_shown(done.stdout)}"
            ]
        missing = missing_lines(command.shown, done.stdout, sandbox.name)
        if missing:
            return [
                f"{where}: `{command.text}` did not print the shown line {missing[0]!r} "
                f"(numbers count as N, spaces are collapsed, ... is any text, the daemon is "
                f"'default'; shown lines must come in order)\n"
                f"{_shown(done.stdout)}"
            ]
    return []


# -- after a file --------------------------------------------------------------


def _lock_holder(path: str) -> int | None:
    """The pid in a daemon's lock file while the daemon holds it, else None."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    else:
        return None
    finally:
        os.close(fd)  # closing drops our probe's lock, if we got it


def daemon_names_in(run_dir: str) -> list[str]:
    """Names of the daemons whose lock or socket is in `run_dir`."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(
        {f.rsplit(".", 1)[0] for f in os.listdir(run_dir) if f.endswith((".lock", ".sock"))}
    )


def stop_daemons_in(run_dir: str) -> list[str]:
    """SIGTERM every daemon still holding a lock in `run_dir` (SIGKILL after
    10 s), then check that none left its socket or /dev/shm entries. Returns
    what was left behind (which is removed); stopped daemons are not an error."""
    left: list[str] = []
    for name in daemon_names_in(run_dir):
        lock = lock_path(run_dir, name)
        pid = _lock_holder(lock)
        if pid is not None and pid > 0:
            _stop(pid, lock)
        shm = "/dev/shm/" + shm_name(name).lstrip("/")
        entries = [p for p in (socket_path(run_dir, name), shm) if os.path.exists(p)]
        entries += [
            f"/dev/shm/{f}"
            for f in os.listdir("/dev/shm")
            if f.startswith(os.path.basename(shm) + ".")
        ]
        for path in entries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        left += entries
    return left


def _stop(pid: int, lock: str) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    try:
        testing.wait_until(lambda: _lock_holder(lock) is None, 10.0, f"daemon pid {pid} to stop")
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        testing.wait_until(lambda: _lock_holder(lock) is None, 5.0, f"daemon pid {pid} to die")
