"""A harness that runs a real shmarena daemon for tests and benchmarks.

    with shmarena.testing.start_daemon(size="64M") as daemon:
        client = daemon.client()
        buf = client.alloc(4096)

Each `Daemon` has a unique name and (by default) a runtime dir of its own, so
several can run side by side and none disturbs a daemon the user runs. It is
started as `python -m shmarena daemon` in a child process, waited for until it
answers a ping (with a deadline, never a bare sleep), stopped with SIGTERM and,
after a deadline, SIGKILL; closing it removes what a daemon that died without
cleaning up leaves behind: its socket, lock, `/dev/shm/shmarena-NAME*` entries
and the runtime dir the harness made. The daemon's output goes to an unlinked
temporary file, so a chatty daemon never blocks on a full pipe, and comes back
in the message of every error.

This module is a leaf for users and tests: nothing else in shmarena imports it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

from shmarena.client import chosen
from shmarena.client.client import Client, connect
from shmarena.config import shm_name, socket_path
from shmarena.daemon.clock import ManualClock  # re-exported: pure tests of timers
from shmarena.errors import DaemonUnavailable

__all__ = [
    "Daemon",
    "DaemonError",
    "ManualClock",
    "start_daemon",
    "unique_name",
    "wait_until",
]

# The repository (or site-packages dir) this shmarena comes from: the daemon's
# child process imports the same code, even when it is not installed.
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHM_MOUNT = "/dev/shm"

T = TypeVar("T")


class DaemonError(RuntimeError):
    """A test daemon did not start, did not stop on SIGTERM, or left files behind.

    The message says which daemon and what it wrote on stdout and stderr.
    """


def unique_name(prefix: str = "t") -> str:
    """A daemon name no other daemon on this host uses: PREFIX-PID-RANDOM."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def new_runtime_dir(prefix: str = "shma-") -> str:
    """A fresh runtime dir under /tmp: short, so the ipc socket path stays
    under the kernel's 107-byte limit."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def wait_until(
    condition: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.01
) -> T:
    """Poll `condition` until it returns something truthy and return that;
    TimeoutError naming `what` when `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def _close_client(client: Client) -> Exception | None:
    """Close `client`; what it raised, so that the daemon is stopped anyway."""
    try:
        client.close()
    except Exception as error:  # noqa: BLE001 reported after the daemon is stopped
        return error
    return None


@dataclass
class Daemon:
    """One shmarena daemon in a child process, with a unique name.

    `size` is the arena size ("" starts without --size: a backing file knows
    its own), `extra` more daemon options, `environ` more environment
    variables. `own_run_dir`: `close()` removes `run_dir`. `new_session`: the
    daemon gets a session of its own, so Ctrl-C in the terminal reaches only
    the caller (which then stops the daemon in order). `popen` holds more
    keyword arguments for subprocess.Popen (a preexec_fn, say).
    """

    name: str
    run_dir: str
    size: str = "64M"
    extra: list[str] = field(default_factory=list)
    environ: dict[str, str] = field(default_factory=dict)
    own_run_dir: bool = False
    new_session: bool = False
    popen: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[str] | None = None
    clients: list[Client] = field(default_factory=list)
    stopped: bool = False
    _output: IO[str] | None = field(default=None, repr=False)
    _final_output: str = field(default="", repr=False)

    # -- where it lives -------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """The environment of the daemon and of every child started through
        this object: SHMARENA_NAME and SHMARENA_RUNTIME_DIR point at it."""
        env = dict(os.environ)
        env.update(self.environ)
        env["SHMARENA_RUNTIME_DIR"] = self.run_dir
        env["SHMARENA_NAME"] = self.name
        env["PYTHONPATH"] = _SOURCE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        return env

    @property
    def socket_path(self) -> str:
        """The daemon's ipc socket."""
        return socket_path(self.run_dir, self.name)

    @property
    def shm_path(self) -> str:
        """The arena's first segment in /dev/shm."""
        return f"{_SHM_MOUNT}/{shm_name(self.name).lstrip('/')}"

    @property
    def pid(self) -> int:
        """The daemon's process id (ValueError before start)."""
        if self.proc is None:
            raise ValueError(f"daemon {self.name} was not started")
        return self.proc.pid

    # -- start ----------------------------------------------------------------

    def start(self, timeout_s: float = 20.0) -> Daemon:
        """Start the daemon and return once it answers a ping; DaemonError
        (with its output) when it exits or stays silent for `timeout_s`."""
        size = ["--size", self.size] if self.size else []
        self._output = tempfile.TemporaryFile("w+", errors="replace")  # noqa: SIM115 closed by stop
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shmarena", "daemon", *size, *self.extra],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=self.new_session,
            **self.popen,
        )
        try:
            wait_until(self.answers, timeout_s, f"daemon {self.name} to answer", interval_s=0.02)
        except TimeoutError as error:
            self.proc.kill()  # silent: no use asking it politely
            self.proc.wait()
            self.stopped = True
            raise DaemonError(f"{error}:\n{self.output()}") from None
        return self

    def answers(self) -> bool:
        """Whether the daemon answers a ping now; DaemonError if it exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise DaemonError(
                f"daemon {self.name} exited with {self.proc.returncode}:\n{self.output()}"
            )
        try:
            with connect(self.name, runtime_dir=self.run_dir, timeout_s=0.5) as probe:
                probe.ping()
        except DaemonUnavailable:
            return False
        return True

    def output(self) -> str:
        """What the daemon wrote on stdout and stderr so far."""
        if self._output is None or self._output.closed:
            return self._final_output
        self._output.flush()
        self._output.seek(0)
        return self._output.read()

    # -- use ------------------------------------------------------------------

    def client(self, **kwargs: Any) -> Client:
        """A client of this daemon, closed by `stop()`."""
        client = connect(self.name, runtime_dir=self.run_dir, **kwargs)
        self.clients.append(client)
        return client

    def cli(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run `python -m shmarena ARGS...` against this daemon."""
        return subprocess.run(
            [sys.executable, "-m", "shmarena", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def python(self, code: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        """Start a Python child process running `code` that talks to this
        daemon (`shmarena.connect()` there finds it)."""
        return subprocess.Popen(
            [sys.executable, "-c", code, *args], env=self.env, text=True, **kwargs
        )

    # -- stop -----------------------------------------------------------------

    def stop(self, timeout_s: float = 10.0) -> str:
        """Close this object's clients, stop the daemon with SIGTERM and
        return its output. A daemon still running after `timeout_s` is
        killed, then DaemonError is raised. Stopping twice does nothing."""
        errors = [e for e in map(_close_client, self.clients) if e is not None]
        self.clients.clear()
        chosen.forget(self.name, self.run_dir)  # gone: not this process's default any more
        out = self._stop_process(timeout_s)
        if errors:
            raise DaemonError(f"closing a client of {self.name} raised {errors[0]!r}")
        return out

    def _stop_process(self, timeout_s: float) -> str:
        if self.proc is None or self.stopped:
            return ""
        self.stopped = True
        killed = False
        piped: str | None = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                # communicate(), not wait(): a subclass may have given it a pipe.
                piped, _ = self.proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                killed = True
        if piped is None:
            piped, _ = self.proc.communicate()
        out = (piped or "") + self.output()
        self._final_output = out
        if self._output is not None:
            self._output.close()
        if killed:
            raise DaemonError(f"daemon {self.name} ignored SIGTERM for {timeout_s:g} s:\n{out}")
        return out

    def leftovers(self) -> list[str]:
        """What of this daemon exists on disk: socket, lock and other files
        of its name in the runtime dir (logs excepted), and /dev/shm entries.
        Empty after a clean stop."""
        found = [p for p in (self.socket_path, self.shm_path) if os.path.exists(p)]
        found += glob.glob(glob.escape(self.shm_path) + ".*")  # added segments
        if os.path.isdir(self.run_dir):
            found += [
                os.path.join(self.run_dir, f)
                for f in sorted(os.listdir(self.run_dir))
                if f.startswith(self.name) and not f.endswith(".log")
            ]
        return list(dict.fromkeys(found))

    def assert_clean(self) -> None:
        """AssertionError naming what the daemon left behind, if anything."""
        leftovers = self.leftovers()
        assert not leftovers, f"daemon {self.name} left behind: {leftovers}"

    def remove_leftovers(self) -> list[str]:
        """Remove what `leftovers()` finds (and the runtime dir, if this
        object made it); return what was there."""
        found = self.leftovers()
        for path in found:
            with contextlib.suppress(FileNotFoundError):  # gone meanwhile: as wanted
                os.unlink(path)
        if self.own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return found

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the daemon and remove everything of it; DaemonError when it
        had to be killed or left files behind (they are removed anyway)."""
        try:
            self.stop(timeout_s)
        finally:
            left = self.remove_leftovers()
        if left:
            raise DaemonError(f"daemon {self.name} left behind: {left}")

    def __enter__(self) -> Daemon:
        return self if self.proc is not None else self.start()

    def __exit__(self, *_exc_info: object) -> None:
        self.close()


def start_daemon(
    size: str = "64M",
    extra: Sequence[str] = (),
    *,
    name: str | None = None,
    run_dir: str | None = None,
    environ: dict[str, str] | None = None,
    timeout_s: float = 20.0,
    **options: Any,
) -> Daemon:
    """Start a daemon with a unique name (or `name`) in a fresh runtime dir
    (or `run_dir`) and return it once it answers. Use it as a context manager
    (`with start_daemon() as daemon:`) or call `close()`; `options` are the
    other fields of `Daemon` (new_session, popen)."""
    daemon = Daemon(
        name=name or unique_name(),
        run_dir=run_dir or new_runtime_dir(),
        size=size,
        extra=list(extra),
        environ=dict(environ or {}),
        own_run_dir=run_dir is None,
        **options,
    )
    try:
        return daemon.start(timeout_s)
    except BaseException:
        daemon.remove_leftovers()
        raise
