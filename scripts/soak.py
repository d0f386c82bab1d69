"""Soak test: many client processes churn one daemon while some are SIGKILLed.

What one run does:

- starts its own daemon (`python -m shmarena daemon --name soak-<pid>-<rand>`)
  with a private runtime dir (a fresh temporary directory);
- runs --procs worker processes for --duration seconds. Each allocates and
  frees buffers of 64 B .. 4 MiB (log-uniform: most are served by the
  per-process cache, sizes above 1 MiB go to the daemon), into a few
  session-scoped named owners and into its session's own owner, recycles a
  named owner now and then, stamps every buffer (a header with worker id,
  incarnation, sequence number, size and offset; a body derived from it),
  verifies the stamp before every free and recycle, and all its live buffers
  every --verify-every seconds; an OutOfMemory makes it free half of what it
  holds (counted, not an error);
- every --handoff-every seconds a worker hands the handle of one live buffer
  to a checker process, which attaches it from its own session and verifies
  the stamp (see `checker_main` for why this check cannot raise a false
  alarm);
- every --kill-every seconds SIGKILLs a random worker, measures how long the
  daemon takes to drop the killed session (polling `list_clients`), checks
  that its owners went with it, and starts a new incarnation of that worker;
- meanwhile a thread polls `stats`, `owners`, `clients` and `check` through a
  client and another runs the `shmarena status` command now and then, timing
  each; `check` must return [] every time, and every `stats` must satisfy
  size = used + cached + retained-only + free (the extremes of used, cached
  and free bytes go into the figures);
- at the end the workers stop, verify their stamps one last time, `sync()`
  and report what they hold. The daemon's `requested_bytes` must then equal
  the sum of the sizes they hold, and `used_bytes` the sum of those blocks'
  carved sizes (the size class for cached sizes, else the size rounded up to
  the minimum block). After the workers close: nothing used, nothing cached,
  one session (this script's own), `check` clean. Then the daemon is stopped
  with SIGTERM and its socket and arena must be gone.

Run it from the repository root with shmarena installed:

    python scripts/soak.py                          # 8 workers, 2 minutes
    python scripts/soak.py --procs 4 --duration 10 --kill-every 1 --json soak.json

Counters of a killed worker are its last report (sent every 0.25 s), so the
op counts slightly undercount; errors and corruptions are sent at once.

Exit status: 0 when no error, no corrupted byte, `check` always clean and the
accounting held; 1 otherwise (the reasons are printed); 130 on Ctrl-C, 143
on SIGTERM. Everything it started is stopped and removed in every case.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Client as connect_to
from multiprocessing.connection import Connection, Listener, wait
from typing import Any

# Only what the worker and checker processes need is imported at the top: they
# re-import this file when they start (multiprocessing "spawn").

MIN_SIZE = 64
MAX_SIZE = 4 << 20
# The stamp's header: magic, worker id, incarnation, sequence number, size, offset.
HEADER = struct.Struct("<8sIIQQQ")
MAGIC = b"SHMSOAK1"
# The body is a slice of one pseudo-random pattern, the same in every process,
# starting at a shift derived from the header.
PATTERN_SEED = 0x50A1
PATTERN_SHIFTS = 4093
# Worker -> checker: the handle (epoch, segment, offset, size, generation), then
# worker id, incarnation and sequence number. Checker -> worker: a sequence
# number the checker found stale.
HANDOFF = struct.Struct("<QQQQQQQQ")
STALE_ACK = struct.Struct("<Q")

COUNT_KEYS = (
    "allocs",
    "frees",
    "recycles",
    "oom",
    "verified",
    "handoffs",
    "stale_acks",
    "errors",
    "corrupted",
)

_PATTERN: bytes | None = None


def pattern() -> bytes:
    global _PATTERN
    if _PATTERN is None:
        _PATTERN = random.Random(PATTERN_SEED).randbytes(MAX_SIZE + PATTERN_SHIFTS)
    return _PATTERN


def body_shift(wid: int, inc: int, seq: int) -> int:
    return (seq * 7919 + wid * 131 + inc * 17) % PATTERN_SHIFTS


def write_stamp(view: memoryview, wid: int, inc: int, seq: int, offset: int) -> None:
    size = len(view)
    view[: HEADER.size] = HEADER.pack(MAGIC, wid, inc, seq, size, offset)
    shift = body_shift(wid, inc, seq)
    view[HEADER.size :] = memoryview(pattern())[shift : shift + size - HEADER.size]


def stamp_problem(view: memoryview, wid: int, inc: int, seq: int, offset: int) -> str | None:
    """None when `view` holds exactly the stamp written for (wid, inc, seq) at
    `offset`, else what differs (where, expected, found)."""
    size = len(view)
    expected_header = HEADER.pack(MAGIC, wid, inc, seq, size, offset)
    header = bytes(view[: HEADER.size])
    if header != expected_header:
        return (
            f"header of w{wid}.{inc} seq {seq} (offset {offset:#x}, {size} B) differs: "
            f"expected {HEADER.unpack(expected_header)}, found {HEADER.unpack(header)}"
        )
    shift = body_shift(wid, inc, seq)
    if pattern().startswith(view[HEADER.size :], shift):  # a memcmp, no copy
        return None
    expected = pattern()[shift : shift + size - HEADER.size]
    body = bytes(view[HEADER.size :])
    first = next(i for i in range(len(body)) if body[i] != expected[i])
    wrong = sum(1 for a, b in zip(body, expected, strict=True) if a != b)
    return (
        f"body of w{wid}.{inc} seq {seq} (offset {offset:#x}, {size} B) differs at byte "
        f"{HEADER.size + first} (expected {expected[first]:#04x}, found {body[first]:#04x}); "
        f"{wrong} byte(s) wrong"
    )


def log_uniform_size(rng: random.Random) -> int:
    value = math.exp(rng.uniform(math.log(MIN_SIZE), math.log(MAX_SIZE)))
    return max(MIN_SIZE, min(MAX_SIZE, int(value)))


def ignore_sigint() -> None:
    """In child processes: Ctrl-C is the parent's business; it stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def send_quietly(conn: Connection, message: Any) -> bool:
    try:
        conn.send(message)
        return True
    except (OSError, ValueError):
        return False


# -- the worker process ------------------------------------------------------


@dataclass
class Live:
    buf: Any  # shmarena.Buffer
    owner: str | None  # None: the session's own owner
    seq: int
    size: int
    carved: int


class Worker:
    """One incarnation of a worker: random alloc / free / recycle with stamps."""

    OWNERS = 4  # named session-scoped owners alive at any time

    def __init__(
        self,
        wid: int,
        inc: int,
        client: Any,
        conn: Connection,
        checker: Connection | None,
        config: dict[str, Any],
        parent_pid: int,
    ) -> None:
        import shmarena
        from shmarena.client.cache import size_class

        self.shmarena = shmarena
        self.size_class = size_class
        self.wid, self.inc = wid, inc
        self.client = client
        self.conn = conn
        self.checker = checker
        self.config = config
        self.parent_pid = parent_pid
        self.rng = random.Random(f"{config['seed']}-{wid}-{inc}")
        self.counts = dict.fromkeys(COUNT_KEYS, 0)
        self.live: dict[int, Live] = {}
        self.members: dict[str, set[int]] = {}
        self.owners: dict[str, Any] = {}
        self.owner_serial = 0
        self.live_bytes = 0
        self.seq = 0
        self.min_block = int(client.info["min_block_bytes"])
        self.cache_max = client.cache_max_bytes
        for _ in range(self.OWNERS):
            self.new_owner()

    # reporting

    def error(self, text: str) -> None:
        self.counts["errors"] += 1
        send_quietly(self.conn, ("error", text))

    def corrupt(self, text: str) -> None:
        self.counts["corrupted"] += 1
        send_quietly(self.conn, ("corrupt", text))

    # bookkeeping

    def carved(self, size: int) -> int:
        """The bytes the daemon carves for `size` (README, stats keys: the size
        class for sizes the cache serves, else rounded up to the minimum block)."""
        if size <= self.cache_max:
            return int(self.size_class(size, self.min_block))
        return -(-size // self.min_block) * self.min_block

    def new_owner(self) -> None:
        self.owner_serial += 1
        name = f"soak-w{self.wid}-i{self.inc}-o{self.owner_serial}"
        self.owners[name] = self.client.owner(name)
        self.members[name] = set()

    def forget(self, seq: int) -> Live:
        entry = self.live.pop(seq)
        self.live_bytes -= entry.size
        if entry.owner is not None:
            self.members[entry.owner].discard(seq)
        return entry

    # operations

    def alloc(self) -> None:
        rng = self.rng
        name = rng.choice([*self.owners, None])
        target = self.client if name is None else self.owners[name]
        many = rng.random() < 0.1
        sizes = [log_uniform_size(rng) for _ in range(rng.randint(2, 4) if many else 1)]
        try:
            bufs = target.alloc_many(sizes) if many else [target.alloc(sizes[0])]
        except self.shmarena.OutOfMemory:
            self.counts["oom"] += 1
            self.free_some(len(self.live) // 2)
            return
        for buf, size in zip(bufs, sizes, strict=True):
            if len(buf.view) != size:
                self.error(f"alloc({size}) gave a buffer of {len(buf.view)} bytes")
            self.seq += 1
            write_stamp(buf.view, self.wid, self.inc, self.seq, buf.offset)
            self.live[self.seq] = Live(buf, name, self.seq, size, self.carved(size))
            self.live_bytes += size
            if name is not None:
                self.members[name].add(self.seq)
            self.counts["allocs"] += 1

    def verify(self, entry: Live) -> None:
        problem = stamp_problem(entry.buf.view, self.wid, self.inc, entry.seq, entry.buf.offset)
        if problem:
            self.corrupt(problem)
        self.counts["verified"] += 1

    def free_one(self) -> None:
        entry = self.forget(self.rng.choice(list(self.live)))
        self.verify(entry)  # most buffers live shorter than --verify-every
        try:
            entry.buf.free()
        except self.shmarena.StaleHandle as exc:
            self.error(f"free of a buffer this worker holds was refused: {exc}")
        self.counts["frees"] += 1

    def free_some(self, count: int) -> None:
        for _ in range(min(count, len(self.live))):
            self.free_one()

    def recycle(self) -> None:
        name = self.rng.choice(list(self.owners))
        held = [self.live[seq] for seq in self.members[name]]
        for entry in held:
            self.verify(entry)
        result = self.client.recycle(name)
        expected = (len(held), sum(e.carved for e in held))
        if (result.blocks, result.bytes) != expected:
            self.error(
                f"recycle({name!r}) gave back {result.blocks} blocks / {result.bytes} B, "
                f"the worker held {expected[0]} blocks / {expected[1]} B (carved) there"
            )
        for entry in held:
            self.forget(entry.seq)
        del self.owners[name], self.members[name]
        self.counts["recycles"] += 1
        self.new_owner()

    def verify_all(self) -> None:
        for entry in list(self.live.values()):
            self.verify(entry)

    def hand_off(self) -> None:
        if self.checker is None or not self.live:
            return
        entry = self.live[self.rng.choice(list(self.live))]
        handle = entry.buf.handle
        message = HANDOFF.pack(*handle, self.wid, self.inc, entry.seq)
        try:
            self.checker.send_bytes(message)
            self.counts["handoffs"] += 1
        except OSError as exc:
            self.error(f"the checker's connection broke: {exc!r}")
            self.checker = None

    def read_acks(self) -> None:
        """A stale answer for a buffer still in `live` is a false refusal:
        acks are read between operations, and a buffer leaves `live` before
        (free) or as soon as (recycle) the worker lets go of it; it never
        comes back. So if it is still here, the worker held it when the
        checker's retain reached the daemon."""
        checker = self.checker
        while checker is not None and checker.poll():
            try:
                (seq,) = STALE_ACK.unpack(checker.recv_bytes())
            except (EOFError, OSError) as exc:
                self.error(f"the checker's connection broke: {exc!r}")
                self.checker = None
                return
            self.counts["stale_acks"] += 1
            if seq in self.live:
                entry = self.live[seq]
                self.error(
                    f"the checker's retain of seq {seq} (offset {entry.buf.offset:#x}, "
                    f"{entry.size} B) was refused as stale while this worker holds it"
                )

    def step(self) -> None:
        r = self.rng.random()
        if r < 0.02:
            self.recycle()
        elif self.live and (self.live_bytes > self.config["live_bytes"] or r < 0.47):
            self.free_one()
        else:
            self.alloc()

    # the loop

    def run(self) -> None:
        config = self.config
        now = time.monotonic()
        next_tick = now
        next_verify = now + config["verify_every"]
        next_handoff = now + config["handoff_every"] * self.rng.random()
        next_report = now + 0.25
        while True:
            self.step()
            now = time.monotonic()
            if now < next_tick:
                continue
            next_tick = now + 0.02
            if os.getppid() != self.parent_pid:
                os._exit(3)  # the soak script is gone: nobody to report to
            if self.conn.poll():
                if self.conn.recv() == "stop":
                    break
            self.read_acks()
            if now >= next_verify:
                self.verify_all()
                next_verify = time.monotonic() + config["verify_every"]
            if now >= next_handoff:
                self.hand_off()
                next_handoff = now + config["handoff_every"]
            if now >= next_report:
                send_quietly(self.conn, ("counts", dict(self.counts)))
                next_report = now + 0.25
        self.finish()

    def finish(self) -> None:
        self.read_acks()
        self.verify_all()
        try:
            self.client.sync()
        except Exception as exc:
            self.error(f"sync() at the end raised {exc!r}")
        entries = list(self.live.values())
        report = {
            "buffers": len(entries),
            "requested": sum(e.size for e in entries),
            "carved": sum(e.carved for e in entries),
            "counts": dict(self.counts),
        }
        self.conn.send(("final", report))
        while not self.conn.poll(0.5):
            if os.getppid() != self.parent_pid:
                os._exit(3)
        self.conn.recv()  # "close"
        if self.checker is not None:
            self.checker.close()
        self.client.close()
        self.conn.send(("closed", dict(self.counts)))


def worker_main(
    wid: int,
    inc: int,
    name: str,
    run_dir: str,
    checker_address: str,
    conn: Connection,
    config: dict[str, Any],
    parent_pid: int,
) -> None:
    ignore_sigint()
    import shmarena

    try:
        client = shmarena.connect(name, runtime_dir=run_dir, label=f"soak-w{wid}.{inc}")
        checker = connect_to(checker_address, family="AF_UNIX")
        conn.send(("ready", os.getpid(), client.session))
        worker = Worker(wid, inc, client, conn, checker, config, parent_pid)
        worker.run()
    except Exception:
        send_quietly(conn, ("error", f"worker crashed:\n{traceback.format_exc()}"))
        raise


# -- the checker process -----------------------------------------------------


def checker_main(name: str, run_dir: str, address: str, conn: Connection, parent_pid: int) -> None:
    """Attach handed-off handles from another session and verify their stamps.

    Why a mismatch here is always real corruption, never a race: the checker
    attaches with `retain=True`. The daemon grants the retain only while the
    block is live under exactly that handle's generation (else StaleHandle),
    and from then until `release` the block cannot be reused, whatever its
    owner does (free, recycle, being SIGKILLed). The worker wrote the whole
    stamp before sending the handle and never writes a buffer again after
    that. So after a granted retain the bytes must be the stamp.
    StaleHandle (the owner let go before the retain arrived) is no error by
    itself; the checker sends it back to the worker, which checks that it
    really had let go of that buffer (see `Worker.read_acks`): a refusal of a
    block the worker still holds is an error of shmarena's.
    """
    ignore_sigint()
    import shmarena

    counts = {"checked": 0, "verified": 0, "stale": 0, "errors": 0, "corrupted": 0}
    client = shmarena.connect(name, runtime_dir=run_dir, label="soak-checker")
    listener = Listener(address, family="AF_UNIX")
    accepted: list[Connection] = []
    lock = threading.Lock()
    closing = threading.Event()

    def accept_loop() -> None:
        while True:
            try:
                new = listener.accept()
            except OSError:
                if closing.is_set():
                    return
                continue  # a worker killed while connecting
            with lock:
                accepted.append(new)

    threading.Thread(target=accept_loop, name="soak-accept", daemon=True).start()
    conn.send(("ready", os.getpid(), client.session))

    def report(kind: str, text: str) -> None:
        counts[kind] += 1
        send_quietly(conn, ("error" if kind == "errors" else "corrupt", f"checker: {text}"))

    def check_one(source: Connection) -> bool:
        """Verify one handed-off handle; False when `source` is gone."""
        try:
            data = source.recv_bytes()
        except (EOFError, OSError):
            return False  # its worker exited or was killed (maybe mid-message)
        if len(data) != HANDOFF.size:  # a torn message raises above instead
            report("errors", f"a hand-off of {len(data)} bytes, expected {HANDOFF.size}")
            return True
        *fields, wid, inc, seq = HANDOFF.unpack(data)
        handle = shmarena.Handle(*fields)
        counts["checked"] += 1
        try:
            buf = client.attach(handle, retain=True)
        except shmarena.StaleHandle:
            counts["stale"] += 1
            try:
                source.send_bytes(STALE_ACK.pack(seq))
            except OSError:
                return False
            return True
        except Exception as exc:
            report("errors", f"attach(retain=True) of {tuple(handle)} raised {exc!r}")
            return True
        try:
            problem = stamp_problem(buf.view, wid, inc, seq, handle.offset)
            if problem:
                report("corrupted", problem)
            else:
                counts["verified"] += 1
        finally:
            try:
                client.release(buf)
            except Exception as exc:
                report("errors", f"release of {tuple(handle)} raised {exc!r}")
        return True

    sources: list[Connection] = []
    next_report = time.monotonic() + 0.25
    while True:
        with lock:
            sources += accepted
            accepted.clear()
        ready = wait([conn, *sources], timeout=0.1)
        if conn in ready:
            if conn.recv() == "stop":
                break
        for source in ready:
            if source is not conn and not check_one(source):
                source.close()
                sources.remove(source)
        if time.monotonic() >= next_report:
            send_quietly(conn, ("counts", dict(counts)))
            next_report = time.monotonic() + 0.25
        if os.getppid() != parent_pid:
            os._exit(3)
    for source in sources:
        source.close()
    closing.set()
    listener.close()
    client.close()
    conn.send(("final", dict(counts)))


# -- the soak script (parent process) ----------------------------------------


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that every cleanup runs."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def _parent_death_signal() -> None:
    """In the daemon child, before exec: SIGTERM it (a clean stop) if this
    script dies without cleaning up (SIGKILL)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def latency_figures(samples: list[float]) -> dict[str, float | int]:
    ordered = sorted(samples)
    return {
        "count": len(ordered),
        "p50_ms": round(percentile(ordered, 0.50) * 1e3, 3),
        "p99_ms": round(percentile(ordered, 0.99) * 1e3, 3),
        "max_ms": round(ordered[-1] * 1e3, 3) if ordered else 0.0,
    }


@dataclass
class Incarnation:
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
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_pid = 0
        self.daemon_log = os.path.join(self.run_dir, "daemon.log")
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
    def socket_path(self) -> str:
        from shmarena.config import socket_path

        return socket_path(self.run_dir, self.name)

    @property
    def shm_path(self) -> str:
        from shmarena.config import shm_name
        from shmarena.shm.arena import shm_path

        return shm_path(shm_name(self.name))

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
        import shmarena

        env = dict(os.environ, SHMARENA_RUNTIME_DIR=self.run_dir)
        with open(self.daemon_log, "wb") as log:
            self.daemon = subprocess.Popen(
                self.cli_command("daemon", "--size", str(self.size_bytes), *self.growth_options()),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C is ours to handle, in order
                preexec_fn=_parent_death_signal,
            )
        self.daemon_pid = self.daemon.pid
        deadline = time.monotonic() + 30
        while True:
            if self.daemon.poll() is not None:
                raise RuntimeError(
                    f"the daemon exited with {self.daemon.returncode}:\n{self.read_log()}"
                )
            try:
                with shmarena.connect(self.name, runtime_dir=self.run_dir, timeout_s=0.5) as c:
                    c.ping()
                return
            except shmarena.DaemonUnavailable:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the daemon did not answer within 30 s:\n{self.read_log()}"
                    ) from None
                time.sleep(0.05)

    def read_log(self) -> str:
        try:
            with open(self.daemon_log, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

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
        for conn in wait(list(sources), timeout=timeout_s):
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
            except Exception as exc:
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
            yield lambda *a: None
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
        daemon = self.daemon
        if daemon is None:
            return
        self.daemon = None
        code: int | None = daemon.poll()
        if code is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                code = daemon.wait(15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
                code = None
                self.error("the daemon ignored SIGTERM for 15 s; killed it")
        leftovers = [p for p in (self.socket_path, self.shm_path) if os.path.exists(p)]
        self.cleanup_figures = {
            "daemon_exit": code,
            "socket_gone": not os.path.exists(self.socket_path),
            "arena_gone": not os.path.exists(self.shm_path),
        }
        if code != 0:
            self.error(f"the daemon exited with {code}:\n{self.read_log()}")
        if leftovers:
            self.error(f"the daemon left behind {leftovers}")
            for path in leftovers:
                with contextlib.suppress(OSError):
                    os.unlink(path)

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

    # -- results -------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        totals = self.totals()
        ops = totals["allocs"] + totals["frees"] + totals["recycles"]
        reclaim = sorted(self.reclaim_s)
        exits = sorted(self.exit_s)
        checker = self.checker_final or self.checker_counts
        check_clean = not self.check_failures and self.check_runs > 0
        figures: dict[str, Any] = {
            "config": {
                "procs": self.args.procs,
                "duration_s": self.args.duration,
                "kill_every_s": self.args.kill_every,
                "size_bytes": self.size_bytes,
                "live_bytes_per_worker": self.live_bytes,
                "seed": self.args.seed,
                "verify_every_s": self.args.verify_every,
                "handoff_every_s": self.args.handoff_every,
                "admin_every_s": self.args.admin_every,
                "cli_every_s": self.args.cli_every,
            },
            "daemon": {
                "name": self.name,
                "pid": self.daemon_pid,
                "shm_path": self.shm_path,
                "run_dir": self.run_dir,
            },
            "processes": {
                "checker": self.checker.pid if self.checker is not None else None,
                "workers": [i.pid for i in self.incarnations],
            },
            "elapsed_s": round(self.elapsed, 3),
            "ops": ops,
            "ops_per_s": round(ops / self.elapsed, 1) if self.elapsed else 0.0,
            "allocs": totals["allocs"],
            "frees": totals["frees"],
            "recycles": totals["recycles"],
            "oom": totals["oom"],
            "verified_buffers": totals["verified"],
            "arena": self.arena_peaks,
            "incarnations": len(self.incarnations),
            "handoffs": {
                "sent": totals["handoffs"],
                "checked": checker.get("checked", 0),
                "verified": checker.get("verified", 0),
                "stale": checker.get("stale", 0),
            },
            "kills": self.kills,
            "reclaim_ms": {
                "count": len(reclaim),
                "median": round(statistics.median(reclaim) * 1e3, 3) if reclaim else None,
                "p90": round(percentile(reclaim, 0.9) * 1e3, 3) if reclaim else None,
                "max": round(reclaim[-1] * 1e3, 3) if reclaim else None,
                "samples": [round(s * 1e3, 3) for s in self.reclaim_s],
            },
            "exit_ms": {
                "median": round(statistics.median(exits) * 1e3, 3) if exits else None,
                "max": round(exits[-1] * 1e3, 3) if exits else None,
            },
            "errors": len(self.errors),
            "error_messages": self.errors[:20],
            "corrupted": len(self.corruptions),
            "corruption_messages": self.corruptions[:20],
            "admin": {c: latency_figures(s) for c, s in self.latency.items()},
            "check_runs": self.check_runs,
            "check_clean": check_clean,
            "check_failures": self.check_failures[:20],
            "accounting": self.accounting,
            "daemon_counters": self.daemon_counters,
            "cleanup": self.cleanup_figures,
        }
        reasons = []
        if figures["errors"]:
            reasons.append(f"{figures['errors']} error(s)")
        if figures["corrupted"]:
            reasons.append(f"{figures['corrupted']} corrupted buffer(s)")
        if not check_clean:
            reasons.append("check() was not clean every time")
        if not self.accounting.get("reached"):
            reasons.append("the run did not get as far as the accounting check")
        elif not self.accounting.get("ok"):
            reasons.append("the accounting did not hold")
        figures["ok"] = not reasons
        figures["reasons"] = reasons
        return figures


def print_summary(figures: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    config = figures["config"]
    reclaim = figures["reclaim_ms"]
    hand = figures["handoffs"]
    lines = [
        f"soak: {config['procs']} workers for {figures['elapsed_s']:.1f} s, "
        f"arena {config['size_bytes'] >> 20} MiB, daemon {figures['daemon']['name']}",
        f"ops        {figures['ops']} ({figures['ops_per_s']:.0f}/s): "
        f"{figures['allocs']} allocs, {figures['frees']} frees, {figures['recycles']} recycles, "
        f"{figures['oom']} OutOfMemory",
        f"verified   {figures['verified_buffers']} buffer stamps in the workers; handed off "
        f"{hand['sent']}, checked by the checker {hand['checked']} "
        f"({hand['verified']} verified, {hand['stale']} freed before the check)",
        f"kills      {figures['kills']} SIGKILLs, {figures['incarnations']} worker incarnations; "
        f"reclaim (SIGKILL to session gone) median {reclaim['median']} ms, "
        f"p90 {reclaim['p90']} ms, worst {reclaim['max']} ms; the process itself was seen "
        f"dead after median {figures['exit_ms']['median']} ms, "
        f"worst {figures['exit_ms']['max']} ms",
        f"errors     {figures['errors']}",
        f"corrupted  {figures['corrupted']}",
        f"check      {figures['check_runs']} runs, "
        + ("all clean" if figures["check_clean"] else "NOT clean"),
    ]
    for line in lines:
        print(line)
    accounting = figures["accounting"]
    if accounting.get("reached"):
        for phase in ("with_survivors", "after_close"):
            shown = ", ".join(
                f"{key} {v['daemon']}"
                + ("" if v["daemon"] == v["expected"] else f" != {v['expected']}")
                for key, v in accounting[phase].items()
            )
            print(f"accounting {phase.replace('_', ' ')}: {shown}")
    table = Table(title="admin latency (ms)")
    for column in ("command", "count", "p50", "p99", "max"):
        table.add_column(column, justify="left" if column == "command" else "right")
    for command, lat in figures["admin"].items():
        table.add_row(
            command,
            str(lat["count"]),
            f"{lat['p50_ms']:.2f}",
            f"{lat['p99_ms']:.2f}",
            f"{lat['max_ms']:.2f}",
        )
    console.print(table)
    for text in figures["error_messages"] + figures["corruption_messages"]:
        print(f"  ! {text}")
    print("PASS" if figures["ok"] else "FAIL: " + "; ".join(figures["reasons"]), flush=True)


def size_arg(text: str) -> int:
    from shmarena.config import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Soak test: worker processes allocate, stamp, verify, free and recycle "
        "buffers of 64 B .. 4 MiB in a daemon of their own while random workers are "
        "SIGKILLed and admin commands are timed; then the daemon's accounting is checked.",
        epilog="exit status: 0 passed; 1 an error, a corrupted byte, an unclean check or "
        "wrong accounting (reasons printed); 130 Ctrl-C; 143 SIGTERM",
    )
    parser.add_argument("--procs", type=int, default=8, help="worker processes (default 8)")
    parser.add_argument(
        "--duration", type=float, default=120.0, help="seconds of load (default 120)"
    )
    parser.add_argument(
        "--kill-every",
        type=float,
        default=2.0,
        help="SIGKILL a random worker (and start a new one) every this many seconds; "
        "0: never (default 2)",
    )
    parser.add_argument(
        "--size",
        type=size_arg,
        default="384M",
        help="arena size of the daemon (default 384M: the workers' live buffers take a "
        "quarter of it, their caches most of the rest, so OutOfMemory is rare but happens)",
    )
    parser.add_argument(
        "--max-size",
        type=size_arg,
        default=None,
        help="let the arena grow by segments up to this (the daemon's --max-size, with "
        "--shrink-after 1); the workers' live bytes are then a quarter of it",
    )
    parser.add_argument(
        "--live-bytes",
        type=size_arg,
        default=None,
        help="live bytes above which a worker only frees (default: arena size / (4 x procs))",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument(
        "--verify-every",
        type=float,
        default=0.5,
        help="seconds between a worker's checks of all its live buffers (default 0.5)",
    )
    parser.add_argument(
        "--handoff-every",
        type=float,
        default=0.1,
        help="seconds between a worker's hand-offs of a live buffer to the checker (default 0.1)",
    )
    parser.add_argument(
        "--admin-every",
        type=float,
        default=0.05,
        help="pause between rounds of stats/owners/clients/check (default 0.05 s)",
    )
    parser.add_argument(
        "--cli-every",
        type=float,
        default=15.0,
        help="seconds between runs of the `shmarena status` command, the first at the "
        "start (default 15)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH as JSON")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (there is none anyway when stdout is not a terminal)",
    )
    args = parser.parse_args(argv)
    if args.procs < 1:
        parser.error("--procs must be at least 1")
    if args.duration <= 0 or args.kill_every < 0:
        parser.error("--duration must be positive and --kill-every not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    soak = Soak(args)
    status = 1
    failure = ""
    try:
        soak.run()
    except KeyboardInterrupt:
        failure, status = "interrupted (Ctrl-C)", 130
    except Terminated:
        failure, status = "terminated (SIGTERM)", 143
    except Exception:
        failure = f"the soak itself failed:\n{traceback.format_exc()}"
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        soak.cleanup()
    figures = soak.figures()
    if failure:
        figures["ok"] = False
        figures["reasons"].insert(0, failure.splitlines()[0])
        figures["failure"] = failure
    print_summary(figures)
    if failure:
        print(failure, file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    if status != 1:
        return status
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
