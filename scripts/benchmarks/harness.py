"""Daemons and child processes of a run, each stopped by the ExitStack that started it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Any

import shmarena
from benchmarks.common import CLEANUP_PROBLEMS, cleanup, signals_deferred
from shmarena import testing


class Daemon:
    """One shmarena daemon started for this run (a shmarena.testing.Daemon
    named bench-PID-N, with a runtime dir of its own)."""

    serial = 0

    def __init__(self, size: str, min_block: str, extra: Sequence[str] = ()) -> None:
        Daemon.serial += 1
        self.harness = testing.Daemon(
            name=f"bench-{os.getpid()}-{Daemon.serial}",
            run_dir=tempfile.mkdtemp(prefix="shmb-"),
            size=size,
            extra=["--min-block", min_block, *extra],  # more options: --backing ...
            own_run_dir=True,
            new_session=True,  # Ctrl-C is ours: we stop the daemon, in order
        )

    @property
    def name(self) -> str:
        return self.harness.name

    @property
    def run_dir(self) -> str:
        return self.harness.run_dir

    def start(self) -> None:
        self.harness.start(timeout_s=60)

    def connect(self, cache: bool) -> shmarena.Client:
        return shmarena.connect(self.name, runtime_dir=self.run_dir, cache=cache)

    def rss_bytes(self) -> int:
        """The daemon's VmRSS."""
        with open(f"/proc/{self.harness.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        """SIGTERM (a daemon holding a million blocks may take a while to
        exit), SIGKILL after 30 s; its arena, socket and runtime dir go."""
        try:
            self.harness.close(timeout_s=30)
        except testing.DaemonError as error:
            CLEANUP_PROBLEMS.append(str(error).splitlines()[0])


def started_daemon(
    stack: contextlib.ExitStack, size: str, min_block: str, extra: Sequence[str] = ()
) -> Daemon:
    """Start a daemon whose shutdown is registered on `stack` first. Ctrl-C
    waits until the start is over (a second or so), so that a daemon is
    either running and known, or not started at all."""
    daemon = Daemon(size, min_block, extra)
    stack.callback(cleanup(daemon.stop))
    with signals_deferred():
        daemon.start()
    return daemon


def connected(stack: contextlib.ExitStack, daemon: Daemon, cache: bool) -> shmarena.Client:
    client = daemon.connect(cache)
    stack.callback(cleanup(client.close))
    return client


def stop_process(process: SpawnProcess, timeout_s: float = 5.0) -> None:
    """Join; terminate and kill if it does not end by itself."""
    if process.pid is None:  # never started
        return
    process.join(timeout_s)
    if process.is_alive():
        process.terminate()
        process.join(2.0)
    if process.is_alive():
        process.kill()
        process.join(2.0)


def started_process(
    stack: contextlib.ExitStack,
    ctx: SpawnContext,
    target: Callable[..., None],
    args: tuple[Any, ...],
    name: str,
) -> SpawnProcess:
    process = ctx.Process(target=target, args=args, name=name, daemon=True)
    stack.callback(cleanup(stop_process, process))  # first, so no window is left open
    with signals_deferred():  # started, or not at all
        process.start()
    return process
