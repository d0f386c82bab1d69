"""Fixtures that run the real thing: a daemon subprocess with a unique name and
runtime dir per test, and a check afterwards that it left nothing behind
(no process, socket, lock or /dev/shm entry)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

import shmarena
from shmarena.config import shm_name, socket_path
from shmarena.shm.arena import shm_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(
    condition: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.01, what: str = ""
) -> Any:
    """Poll `condition` until it returns something truthy, or fail the test."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what or condition}")
        time.sleep(interval_s)


def can_unshare(*flags: str) -> bool:
    """Whether `unshare FLAGS true` works here (root, or user namespaces allowed)."""
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", *flags, "true"], capture_output=True)
    return probe.returncode == 0


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def subprocess_env(run_dir: str, name: str) -> dict[str, str]:
    env = dict(os.environ)
    env["SHMARENA_RUNTIME_DIR"] = run_dir
    env["SHMARENA_NAME"] = name
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


@dataclass
class Daemon:
    name: str
    run_dir: str
    size: str
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    clients: list[shmarena.Client] = field(default_factory=list)
    stopped: bool = False

    @property
    def env(self) -> dict[str, str]:
        return subprocess_env(self.run_dir, self.name)

    @property
    def socket_path(self) -> str:
        return socket_path(self.run_dir, self.name)

    @property
    def shm_path(self) -> str:
        return shm_path(shm_name(self.name))

    def start(self) -> Daemon:
        size = ["--size", self.size] if self.size else []  # "": a backing file's own
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shmarena", "daemon", *size, *self.extra],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for(self._answers, timeout_s=20, what=f"daemon {self.name} to answer")
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            out = self.proc.stdout.read() if self.proc.stdout else ""
            pytest.fail(f"daemon exited with {self.proc.returncode}:\n{out}")
        try:
            with shmarena.connect(self.name, runtime_dir=self.run_dir, timeout_s=0.5) as c:
                c.ping()
            return True
        except shmarena.DaemonUnavailable:
            return False

    def client(self, **kwargs: Any) -> shmarena.Client:
        c = shmarena.connect(self.name, runtime_dir=self.run_dir, **kwargs)
        self.clients.append(c)
        return c

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "shmarena", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            pytest.fail(f"shmarena {' '.join(args)} -> {result.returncode}\n{result.stderr}")
        return result

    def python(self, code: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        """Start a Python child process that talks to this daemon."""
        return subprocess.Popen(
            [sys.executable, "-c", code, *args],
            env=self.env,
            text=True,
            **kwargs,
        )

    def read_in_child(self, handle: Any, count: int) -> bytes:
        """The first `count` bytes of the block `handle` names, as another
        process attached to this daemon sees them."""
        child = self.python(
            "import shmarena, sys\n"
            "c = shmarena.connect()\n"
            "buf = c.attach(shmarena.Handle(*map(int, sys.argv[2:])))\n"
            "print(bytes(buf.view[: int(sys.argv[1])]).hex())\n",
            str(count),
            *map(str, handle),
            stdout=subprocess.PIPE,
        )
        out, _ = child.communicate(timeout=30)
        assert child.returncode == 0, f"the reading child exited with {child.returncode}"
        return bytes.fromhex(out.strip())

    def stop(self) -> str:
        errors = []
        for c in self.clients:
            try:
                c.close()
            except Exception as error:  # stop the daemon anyway, then report
                errors.append(error)
        self.clients.clear()
        try:
            return self._stop_process()
        finally:
            if errors:
                pytest.fail(f"closing a client of {self.name} raised {errors[0]!r}")

    def _stop_process(self) -> str:
        out = ""
        if self.proc is None or self.stopped:
            return out
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                out, _ = self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, _ = self.proc.communicate()
                pytest.fail(f"daemon {self.name} ignored SIGTERM for 10 s:\n{out}")
        else:
            out, _ = self.proc.communicate()
        return out

    def assert_clean(self) -> None:
        leftovers = [p for p in (self.socket_path, self.shm_path) if os.path.exists(p)]
        leftovers += glob.glob(glob.escape(self.shm_path) + ".*")  # added segments
        leftovers += (
            [
                os.path.join(self.run_dir, f)
                for f in os.listdir(self.run_dir)
                if f.startswith(self.name) and not f.endswith(".log")
            ]
            if os.path.isdir(self.run_dir)
            else []
        )
        assert not leftovers, f"daemon {self.name} left behind: {leftovers}"


@pytest.fixture(scope="session", autouse=True)
def nothing_left_in_dev_shm() -> Iterator[None]:
    """After the whole run: no arena of a test daemon is left in /dev/shm."""
    before = set(os.listdir("/dev/shm"))
    yield
    ours = f"shmarena-t-{os.getpid()}-"
    left = [
        f
        for f in set(os.listdir("/dev/shm")) - before
        if f.startswith(("shmarena-t-", "shmarena-demo-")) and (ours in f or "demo" in f)
    ]
    assert not left, f"the test run left these in /dev/shm: {left}"


@pytest.fixture
def run_dir() -> Iterator[str]:
    # Short, so the ipc socket path stays under the 107-byte limit.
    path = tempfile.mkdtemp(prefix="shma-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_daemon(run_dir: str) -> Iterator[Callable[..., Daemon]]:
    """Start daemons with a unique name; all are stopped and checked clean after."""
    started: list[Daemon] = []

    def make(size: str = "64M", extra: list[str] | None = None, name: str | None = None) -> Daemon:
        daemon = Daemon(name or unique_name(), run_dir, size, list(extra or []))
        started.append(daemon)
        return daemon.start()

    yield make
    for daemon in started:
        daemon.stop()
    for daemon in started:
        daemon.assert_clean()


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    """One running daemon with a 64 MiB arena."""
    return make_daemon()


@pytest.fixture
def client(daemon: Daemon) -> shmarena.Client:
    return daemon.client()
