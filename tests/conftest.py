"""Fixtures that run the real thing: a daemon subprocess (shmarena.testing)
with a unique name and runtime dir per test, or one per module for modules
marked `shared_daemon`, and a check afterwards that it left nothing behind
(no process, socket, lock or /dev/shm entry)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import shmarena
from shmarena import testing
from shmarena.client import chosen
from shmarena.testing import unique_name

__all__ = ["REPO", "Daemon", "can_unshare", "subprocess_env", "unique_name", "wait_for"]

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


def subprocess_env(run_dir: str, name: str) -> dict[str, str]:
    """The environment of a child process that talks to daemon `name`."""
    return testing.Daemon(name, run_dir).env


class Daemon(testing.Daemon):
    """shmarena.testing's daemon, failing the test (not erroring it) when
    the daemon misbehaves, plus helpers only the tests need."""

    def start(self, timeout_s: float = 20.0) -> Daemon:
        try:
            super().start(timeout_s)
        except testing.DaemonError as error:
            pytest.fail(str(error))
        return self

    def _answers(self) -> bool:
        """For subclasses that start the process themselves (then wait_for)."""
        try:
            return self.answers()
        except testing.DaemonError as error:
            pytest.fail(str(error))

    def cli(  # type: ignore[override]
        self, *args: str, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        result = super().cli(*args)
        if check and result.returncode != 0:
            pytest.fail(f"shmarena {' '.join(args)} -> {result.returncode}\n{result.stderr}")
        return result

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

    def stop(self, timeout_s: float = 10.0) -> str:
        try:
            return super().stop(timeout_s)
        except testing.DaemonError as error:
            pytest.fail(str(error))


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


@pytest.fixture(autouse=True)
def no_default_daemon_carried_over() -> Iterator[None]:
    """Each test starts with no process default daemon: the first connect of
    an earlier test (to a daemon long stopped) must not choose for this one."""
    chosen.set_given(None)
    yield
    chosen.set_given(None)


@pytest.fixture
def run_dir() -> Iterator[str]:
    path = testing.new_runtime_dir()
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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--own-daemons",
        action="store_true",
        help="every test gets a daemon of its own, also in modules marked shared_daemon "
        "(to rule out sharing when a test fails)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "shared_daemon: the `daemon` fixture is one daemon for the whole module (its tests "
        "use unique owners and names, and never stop, restart or limit the daemon)",
    )


@pytest.fixture(scope="module")
def module_daemon() -> Iterator[Daemon]:
    """One daemon with a 64 MiB arena for a whole test module (a start costs
    about a second on a busy machine); stopped and checked clean after it."""
    shared = Daemon(unique_name(), testing.new_runtime_dir(), "64M", own_run_dir=True)
    try:
        yield shared.start()
        shared.stop()
        shared.assert_clean()
    finally:
        shared.remove_leftovers()  # only after a failure is there anything to remove


@pytest.fixture
def daemon(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    """One running daemon with a 64 MiB arena: the test's own, or in a module
    marked `shared_daemon` the module's, whose clients made for the test are
    closed after it (their sessions end, and their blocks with them)."""
    shared_module = request.node.get_closest_marker("shared_daemon") is not None
    if not shared_module or request.config.getoption("--own-daemons"):
        make: Callable[..., Daemon] = request.getfixturevalue("make_daemon")
        yield make()
        return
    shared: Daemon = request.getfixturevalue("module_daemon")
    yield shared
    for client in shared.clients:
        client.close()
    shared.clients.clear()
    assert shared.proc is not None and shared.proc.poll() is None, "the shared daemon died"
    assert_arena_empty(shared)


# What a test may leave to the next in a module that shares a daemon: nothing
# but the probe's own session.
EMPTY_ARENA = {
    "used_bytes": 0,
    "cached_bytes": 0,
    "live_blocks": 0,
    "retained_only_blocks": 0,
    "pinned_blocks": 0,
    "owners": 0,
    "names": 0,
    "waiting_requests": 0,
    "queues": 0,
    "sessions": 1,
}


def assert_arena_empty(daemon: Daemon) -> None:
    """Fail unless the daemon holds nothing but the probe's own session: what
    a test may leave to the next one in a module that shares a daemon. Child
    processes' sessions may take a moment to end, so this waits for it."""
    with shmarena.connect(daemon.name, runtime_dir=daemon.run_dir) as probe:
        left: dict[str, Any] = {}

        def empty() -> bool:
            stats = probe.stats()
            left.update({key: stats[key] for key in EMPTY_ARENA if key != "queues"})
            left["queues"] = len(stats["queues"])
            return left == EMPTY_ARENA

        if not wait_until_quietly(empty, timeout_s=10):
            pytest.fail(f"the test left this in the shared daemon: {left}")
        assert probe.check() == []


def wait_until_quietly(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Whether `condition` held before `timeout_s` passed."""
    try:
        testing.wait_until(condition, timeout_s, "the condition")
    except TimeoutError:
        return False
    return True


@pytest.fixture
def client(daemon: Daemon) -> shmarena.Client:
    return daemon.client()
