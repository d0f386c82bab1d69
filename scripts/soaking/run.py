"""The soak run (parent process): its daemon (shmarena.testing), the children,
the kills, the admin pollers and the final accounting."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any, cast

from soaking.checker import checker_main
from soaking.stamps import COUNT_KEYS, send_quietly
from soaking.worker import worker_main

if TYPE_CHECKING:
    from shmarena import testing


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that every cleanup runs."""


def on_sigterm(_signum: int, _frame: object) -> None:
    """The SIGTERM handler of the soak: unwind like Ctrl-C does."""
    raise Terminated


def _parent_death_signal() -> None:
    """In the daemon child, before exec: SIGTERM it (a clean stop) if this
    script dies without cleaning up (SIGKILL)."""
    with contextlib.suppress(Exception):  # best effort: not every libc has prctl
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


@dataclass
class Incarnation:
    """One worker process (worker id `wid`, its `inc`-th start) as the soak sees it."""

    wid: int
    inc: int
    proc: Any  # SpawnProcess
    conn: Connection
    pid: int = 0
    session: int = 0
    ready: bool = False
    killed: bool = False
    lost: bool = False  # its pipe closed (killed, or exited)
    final: dict[str, Any] | None = None
    closed: bool = False
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"w{self.wid}.{self.inc}"


class Soak:
    """One soak run: its daemon, checker and workers, the kills, the pollers
    and every figure they produce."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size_bytes: int = args.size
        # --max-size: the arena grows by segments; the workers aim at the cap.
        top = max(args.max_size or 0, self.size_bytes)
        self.live_bytes: int = args.live_bytes or top // (4 * args.procs)
        self.name = f"soak-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.run_dir = tempfile.mkdtemp(prefix="soak-", dir="/tmp")  # short: socket path limit
        self.checker_address = os.path.join(self.run_dir, "checker.sock")
        self.ctx = mp.get_context("spawn")
        self.daemon: testing.Daemon | None = None
        self.daemon_pid = 0
        self.admin: Any = None  # the client that stays to the end
        self.monitor: Any = None  # the client that watches for reclaimed sessions
        self.checker: Any = None
        self.checker_conn: Connection | None = None
        self.checker_counts: dict[str, int] = {}
        self.checker_final: dict[str, int] | None = None
        self.incarnations: list[Incarnation] = []
        self.current: dict[int, Incarnation] = {}
        self.errors: list[str] = []
        self.corruptions: list[str] = []
        self.lock = threading.Lock()
        self.stop_polling = threading.Event()
        self.threads: list[threading.Thread] = []
        self.latency: dict[str, list[float]] = {
            c: [] for c in ("stats", "owners", "clients", "check", "cli status")
        }
        self.check_runs = 0
        self.arena_peaks: dict[str, int] = {}  # extremes seen by the admin poller
        self.check_failures: list[str] = []
        self.reclaim_s: list[float] = []  # SIGKILL -> session gone from list_clients
        self.exit_s: list[float] = []  # SIGKILL -> waitpid sees the process dead
        self.kills = 0
        self.started = 0.0
        self.elapsed = 0.0
        self.accounting: dict[str, Any] = {"ok": False, "reached": False}
        self.cleanup_figures: dict[str, Any] = {}
        self.daemon_counters: dict[str, Any] = {}

    # -- problems ------------------------------------------------------------

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)

    # -- daemon --------------------------------------------------------------

    @property
    def shm_path(self) -> str:
        from shmarena.config import shm_name

        return f"/dev/shm/{shm_name(self.name).lstrip('/')}"

    def cli_command(self, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "shmarena",
            *args,
            "--name",
            self.name,
            "--runtime-dir",
            self.run_dir,
        ]

    def growth_options(self) -> list[str]:
        if not self.args.max_size:
            return []
        return ["--max-size", str(self.args.max_size), "--shrink-after", "1"]

    def start_daemon(self) -> None:
        from shmarena import testing

        self.daemon = testing.Daemon(
            name=self.name,
            run_dir=self.run_dir,
            size=str(self.size_bytes),
            extra=self.growth_options(),
            new_session=True,  # Ctrl-C is ours to handle, in order
            popen={"preexec_fn": _parent_death_signal},
        )
        self.daemon.start(timeout_s=30)
        self.daemon_pid = self.daemon.pid

    def connect(self, label: str) -> Any:
        import shmarena

        return shmarena.connect(self.name, runtime_dir=self.run_dir, label=label, timeout_s=10)

    # -- children ------------------------------------------------------------

    def start_checker(self) -> None:
        parent_end, child_end = self.ctx.Pipe()
        self.checker = self.ctx.Process(
            target=checker_main,
            args=(self.name, self.run_dir, self.checker_address, child_end, os.getpid()),
            name="soak-checker",
            daemon=True,
        )
        self.checker.start()
        child_end.close()
        self.checker_conn = parent_end
        if not parent_end.poll(60):
            raise RuntimeError("the checker process did not start within 60 s")
        message = parent_end.recv()
        if message[0] != "ready":
            raise RuntimeError(f"the checker failed to start: {message}")

    def start_worker(self, wid: int, inc: int) -> Incarnation:
        parent_end, child_end = self.ctx.Pipe()
        config = {
            "seed": self.args.seed,
            "live_bytes": self.live_bytes,
            "verify_every": self.args.verify_every,
            "handoff_every": self.args.handoff_every,
        }
        proc = self.ctx.Process(
            target=worker_main,
            args=(
                wid,
                inc,
                self.name,
                self.run_dir,
                self.checker_address,
                child_end,
                config,
                os.getpid(),
            ),
            name=f"soak-w{wid}.{inc}",
            daemon=True,
        )
        proc.start()
        child_end.close()
        incarnation = Incarnation(wid, inc, proc, parent_end, pid=proc.pid or 0)
        self.incarnations.append(incarnation)
        self.current[wid] = incarnation
        return incarnation

    def pump(self, timeout_s: float) -> None:
        """Take in what the children sent, waiting at most `timeout_s`."""
        sources: dict[Connection, Incarnation | None] = {
            i.conn: i for i in self.incarnations if not i.lost
        }
        if self.checker_conn is not None:
            sources[self.checker_conn] = None
        ready = cast("list[Connection]", wait(list(sources), timeout=timeout_s))
        for conn in ready:
            owner = sources[conn]
            while True:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    if owner is None:
                        self.checker_conn = None
                        if self.checker_final is None:
                            self.error("the checker's pipe closed before its final report")
                    else:
                        owner.lost = True
                    conn.close()
                    break
                self.take(owner, message)
                if not conn.poll():
                    break

    def take(self, source: Incarnation | None, message: tuple[Any, ...]) -> None:
        kind = message[0]
        label = "checker" if source is None else source.label
        if kind == "error":
            self.error(f"{label}: {message[1]}")
        elif kind == "corrupt":
            with self.lock:
                self.corruptions.append(f"{label}: {message[1]}")
        elif source is None:
            if kind == "counts":
                self.checker_counts = message[1]
            elif kind == "final":
                self.checker_counts = self.checker_final = message[1]
        elif kind == "ready":
            source.pid, source.session, source.ready = message[1], message[2], True
        elif kind == "counts":
            source.counts = message[1]
        elif kind == "final":
            source.final = message[1]
            source.counts = message[1]["counts"]
        elif kind == "closed":
            source.closed = True
            source.counts = message[1]

    # -- kills ---------------------------------------------------------------

    def kill_one(self, rng: random.Random) -> None:
        candidates = [
            i for i in self.current.values() if i.ready and not i.killed and i.proc.is_alive()
        ]
        if not candidates:
            return
        victim = rng.choice(candidates)
        started = time.perf_counter()
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim.pid, signal.SIGKILL)
        victim.killed = True
        self.kills += 1
        exited = None
        while True:
            if exited is None and victim.proc.exitcode is not None:
                exited = time.perf_counter() - started
            sessions = {row["session"] for row in self.monitor.list_clients()}
            waited = time.perf_counter() - started
            if victim.session not in sessions:
                self.reclaim_s.append(waited)
                # When the session went before waitpid saw the exit, the two
                # happened within one poll: count the exit at the reclaim.
                self.exit_s.append(waited if exited is None else exited)
                break
            if waited > 15:
                self.error(f"{victim.label} (session {victim.session}) not reclaimed in 15 s")
                break
            time.sleep(0.0005)
        victim.proc.join(10)
        left = [
            row["name"]
            for row in self.monitor.list_owners()
            if row["session"] == victim.session and row["scope"] != "detached"
        ]
        if left:
            self.error(f"{victim.label}: owners of the killed session survived: {left}")
        self.start_worker(victim.wid, victim.inc + 1)

    def watch_exits(self) -> None:
        for incarnation in list(self.current.values()):
            if incarnation.killed or incarnation.proc.exitcode is None:
                continue
            self.error(
                f"{incarnation.label} exited by itself with code {incarnation.proc.exitcode}"
            )
            incarnation.killed = True  # not to be waited for at the end
            self.start_worker(incarnation.wid, incarnation.inc + 1)

    # -- admin pollers -------------------------------------------------------

    def time_call(self, command: str, call: Any) -> Any:
        started = time.perf_counter()
        result = call()
        elapsed = time.perf_counter() - started
        with self.lock:
            self.latency[command].append(elapsed)
        return result

    def admin_loop(self) -> None:
        client = self.admin
        while not self.stop_polling.is_set():
            try:
                stats = self.time_call("stats", client.stats)
                parts = ("used_bytes", "cached_bytes", "retained_only_bytes", "free_bytes")
                if stats["size_bytes"] != sum(stats[k] for k in parts):
                    self.error(f"stats do not add up: {{{', '.join(parts)}}} = {stats}")
                with self.lock:
                    peaks = self.arena_peaks
                    for key in ("used_bytes", "cached_bytes", "retained_only_bytes"):
                        peaks[f"max_{key}"] = max(peaks.get(f"max_{key}", 0), stats[key])
                    for key in ("free_bytes", "largest_free_bytes"):
                        peaks[f"min_{key}"] = min(peaks.get(f"min_{key}", stats[key]), stats[key])
                self.time_call("owners", client.list_owners)
                rows = self.time_call("clients", client.list_clients)
                most = max((row["cached_bytes"] for row in rows), default=0)
                with self.lock:
                    peaks = self.arena_peaks
                    peaks["max_session_cached_bytes"] = max(
                        peaks.get("max_session_cached_bytes", 0), most
                    )
                problems = self.time_call("check", client.check)
                with self.lock:
                    self.check_runs += 1
                    if problems:
                        self.check_failures.append(repr(problems))
            except Exception as exc:  # noqa: BLE001 a poller's failure is a finding, not the end
                self.error(f"admin poller: {exc!r}")
            self.stop_polling.wait(self.args.admin_every)

    def cli_loop(self) -> None:
        env = dict(os.environ, SHMARENA_RUNTIME_DIR=self.run_dir)
        while True:
            started = time.perf_counter()
            try:
                result = subprocess.run(
                    self.cli_command("status"),
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    start_new_session=True,  # not hit by a Ctrl-C meant for the script
                )
                elapsed = time.perf_counter() - started
                with self.lock:
                    self.latency["cli status"].append(elapsed)
                if result.returncode != 0:
                    self.error(f"shmarena status exited {result.returncode}: {result.stderr}")
            except subprocess.TimeoutExpired:
                self.error("shmarena status did not finish within 60 s")
            if self.stop_polling.wait(self.args.cli_every):
                return

    # -- the run -------------------------------------------------------------

    def totals(self) -> dict[str, int]:
        totals = dict.fromkeys(COUNT_KEYS, 0)
        for incarnation in self.incarnations:
            for key in COUNT_KEYS:
                totals[key] += incarnation.counts.get(key, 0)
        return totals

    def run(self) -> None:
        args = self.args
        self.start_daemon()
        self.admin = self.connect("soak-admin")
        self.monitor = self.connect("soak-monitor")
        self.start_checker()
        for wid in range(args.procs):
            self.start_worker(wid, 1)
        for target in (self.admin_loop, self.cli_loop):
            thread = threading.Thread(target=target, name=target.__name__, daemon=True)
            thread.start()
            self.threads.append(thread)
        rng = random.Random(args.seed)
        self.started = time.monotonic()
        end = self.started + args.duration
        next_kill = self.started + args.kill_every if args.kill_every > 0 else math.inf
        with self.progress() as update:
            while True:
                now = time.monotonic()
                if now >= end:
                    break
                if now >= next_kill:
                    self.kill_one(rng)
                    next_kill = max(next_kill + args.kill_every, time.monotonic())
                self.watch_exits()
                self.pump(max(0.0, min(0.1, next_kill - now, end - now)))
                update(now - self.started, self.totals(), len(self.errors), len(self.corruptions))
        self.elapsed = time.monotonic() - self.started
        self.finish()

    @contextlib.contextmanager
    def progress(self) -> Any:
        """A rich progress bar on a terminal (unless --no-progress); else nothing."""
        if self.args.no_progress or not sys.stdout.isatty():
            yield lambda *_: None
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (
            TextColumn("soak"),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
        )
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task("soak", total=self.args.duration, info="")
            last = [0.0]

            def update(elapsed: float, totals: dict[str, int], errors: int, bad: int) -> None:
                if elapsed - last[0] < 0.5:
                    return
                last[0] = elapsed
                ops = totals["allocs"] + totals["frees"] + totals["recycles"]
                info = f"ops {ops}  kills {self.kills}  errors {errors}  corrupted {bad}"
                bar.update(task, completed=elapsed, info=info)

            yield update

    def wait_all(self, what: str, done: Any, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                self.error(f"timed out after {timeout_s:g} s waiting for {what}")
                return False
            self.pump(0.05)
        return True

    def wait_daemon(self, what: str, condition: Any, timeout_s: float = 15) -> dict[str, Any]:
        """The daemon's stats once `condition` holds (or, after `timeout_s`, as
        they are: the comparison that follows then fails and says why)."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.admin.stats()
            if condition(stats):
                return dict(stats)
            if time.monotonic() > deadline:
                self.error(f"timed out after {timeout_s:g} s waiting for {what}")
                return dict(stats)
            time.sleep(0.01)

    def finish(self) -> None:
        """Stop everything in order and check the daemon's accounting."""
        survivors = [i for i in self.current.values() if not i.killed and i.ready and not i.lost]
        stragglers = [i for i in self.current.values() if not i.killed and i not in survivors]
        for incarnation in stragglers:  # started just now, never got going: not counted
            incarnation.proc.kill()
            incarnation.proc.join(10)
            incarnation.killed = True
        self.stop_polling.set()
        for thread in self.threads:
            thread.join(90)
        for incarnation in survivors:
            send_quietly(incarnation.conn, "stop")
        self.wait_all(
            "the workers' final reports", lambda: all(i.final or i.lost for i in survivors), 120
        )
        if self.checker_conn is not None:
            send_quietly(self.checker_conn, "stop")
        self.wait_all("the checker's final report", lambda: self.checker_final is not None, 60)
        if self.checker is not None:
            self.checker.join(30)
        self.monitor.close()
        reported = [i for i in survivors if i.final]
        expected_sessions = 1 + len(reported)
        stats = self.wait_daemon(
            f"{expected_sessions} sessions", lambda s: s["sessions"] == expected_sessions
        )
        problems = self.admin.check()
        self.check_runs += 1
        self.daemon_counters = dict(stats["counters"])
        expected = {
            "requested_bytes": sum(i.final["requested"] for i in reported if i.final),
            "used_bytes": sum(i.final["carved"] for i in reported if i.final),
            "live_blocks": sum(i.final["buffers"] for i in reported if i.final),
            "retained_only_bytes": 0,
            "sessions": expected_sessions,
        }
        held = {key: {"daemon": stats[key], "expected": value} for key, value in expected.items()}
        for incarnation in reported:
            send_quietly(incarnation.conn, "close")
        self.wait_all("the workers to close", lambda: all(i.closed or i.lost for i in reported), 60)
        for incarnation in survivors:
            incarnation.proc.join(30)
            if incarnation.proc.exitcode != 0:
                self.error(f"{incarnation.label} exited with {incarnation.proc.exitcode}")
        after = self.wait_daemon("one session", lambda s: s["sessions"] == 1)
        problems_after = self.admin.check()
        self.check_runs += 1
        after_expected = {
            "used_bytes": 0,
            "requested_bytes": 0,
            "cached_bytes": 0,
            "retained_only_bytes": 0,
            "live_blocks": 0,
            "owners": 0,
            "sessions": 1,
        }
        closed = {k: {"daemon": after[k], "expected": v} for k, v in after_expected.items()}
        ok = (
            len(reported) == len(survivors)
            and all(v["daemon"] == v["expected"] for v in held.values())
            and all(v["daemon"] == v["expected"] for v in closed.values())
            and not problems
            and not problems_after
        )
        self.accounting = {
            "ok": ok,
            "reached": True,
            "survivors": len(survivors),
            "survivors_reported": len(reported),
            "with_survivors": held,
            "after_close": closed,
            "check_with_survivors": problems,
            "check_after_close": problems_after,
        }
        if problems or problems_after:
            with self.lock:
                self.check_failures.append(repr(problems or problems_after))
        self.admin.close()
        self.admin = None
        self.stop_daemon()

    def stop_daemon(self) -> None:
        """SIGTERM, SIGKILL after 15 s; then its socket and arena must be gone."""
        from shmarena import testing

        daemon = self.daemon
        if daemon is None:
            return
        self.daemon = None
        try:
            daemon.stop(timeout_s=15)
            code = daemon.proc.returncode if daemon.proc is not None else None
        except testing.DaemonError:
            code = None
            self.error("the daemon ignored SIGTERM for 15 s; killed it")
        self.cleanup_figures = {
            "daemon_exit": code,
            "socket_gone": not os.path.exists(daemon.socket_path),
            "arena_gone": not os.path.exists(daemon.shm_path),
        }
        if code != 0:
            self.error(f"the daemon exited with {code}:\n{daemon.output()[-4000:]}")
        leftovers = daemon.remove_leftovers()
        if leftovers:
            self.error(f"the daemon left behind {leftovers}")

    def cleanup(self) -> None:
        """Whatever happened: no child, daemon, socket, arena or temp dir left."""
        self.stop_polling.set()
        for incarnation in self.incarnations:
            if incarnation.proc.is_alive():
                incarnation.proc.kill()
            incarnation.proc.join(10)
            incarnation.conn.close()
        if self.checker is not None:
            if self.checker.is_alive():
                self.checker.kill()
            self.checker.join(10)
        for client in (self.monitor, self.admin):
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
        self.admin = self.monitor = None
        for thread in self.threads:
            thread.join(10)
        self.stop_daemon()
        shutil.rmtree(self.run_dir, ignore_errors=True)
