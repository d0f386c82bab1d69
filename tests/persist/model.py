"""What the persistence tests share: a restartable daemon on a backing file,
the random-workload driver (driver.py) as a child process, and the model of
acknowledged operations that every recovered table must match."""

from __future__ import annotations

import json
import mmap
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import shmarena
from tests.conftest import subprocess_env, wait_for

DRIVER = os.path.join(os.path.dirname(__file__), "driver.py")
STAMP = struct.Struct("<QQ")
# Sessions recovered after a restart wait this long for their client. The
# test process's own short-lived clients (the "is it up" pings) may be among
# them: their process lives on, their socket is gone, so they wait it out.
GRACE_S = 3.0
Block = tuple[int, int, int]  # offset, size, generation


@dataclass
class Arena:
    """A daemon named `name` serving the backing file `path`, started again
    and again (each start may be told to crash itself)."""

    name: str
    run_dir: str
    path: str
    size: str = "256M"
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def env(self) -> dict[str, str]:
        return subprocess_env(self.run_dir, self.name)

    def start(self, *extra: str, expect_up: bool = True) -> bool:
        """Start the daemon; True once it answers, False if it died first
        (a crash point reached while starting)."""
        log = open(os.path.join(self.run_dir, f"{self.name}.log"), "ab")  # noqa: SIM115 - the daemon writes it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shmarena", "daemon", "--backing", self.path,
             "--size", self.size, "--grace", str(GRACE_S), *extra],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        self.starts += 1

        def up_or_dead() -> str | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return "dead"
            try:
                with shmarena.connect(self.name, runtime_dir=self.run_dir, timeout_s=0.5) as c:
                    c.ping()
                return "up"
            except shmarena.DaemonUnavailable:
                return None

        state = wait_for(up_or_dead, timeout_s=30, what=f"daemon {self.name} to answer or die")
        if expect_up and state != "up":
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
        return state == "up"

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """A clean stop (SIGTERM); nothing of the daemon's but the backing
        file and its table may remain."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        assert code == 0, f"daemon exit {code}:\n{self.log()}"
        for suffix in (".sock", ".lock"):
            leftover = os.path.join(self.run_dir, self.name + suffix)
            assert not os.path.exists(leftover), leftover

    def log(self) -> str:
        try:
            with open(os.path.join(self.run_dir, f"{self.name}.log"), errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def inspect(self) -> dict[str, Any]:
        result = subprocess.run(
            [sys.executable, "-m", "shmarena", "inspect", self.path, "--json"],
            env=self.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        report = json.loads(result.stdout)
        assert (result.returncode == 0) == (not report["problems"]), result
        return report

    def stamps_ok(self, blocks: set[Block], data_offset: int) -> list[str]:
        """Problems with the 16 stamp bytes each block starts with."""
        problems = []
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            for offset, size, gen in sorted(blocks):
                if size < STAMP.size:
                    continue
                found = STAMP.unpack_from(m, data_offset + offset)
                if found != (gen, offset):
                    problems.append(f"block {offset:#x} gen {gen}: stamp reads {found}")
        return problems


class Driver:
    """driver.py as a child process. Its lines are read from the pipe
    without a thread, so that `freeze` can tell when every line it wrote
    has been read."""

    def __init__(self, arena: Arena, seed: int, ops: int) -> None:
        self.stop_path = os.path.join(arena.run_dir, f"{arena.name}.stop-driver")
        self.proc = subprocess.Popen(
            [sys.executable, DRIVER, str(seed), str(ops), self.stop_path],
            env=arena.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.partial = b""
        self.seen: list[dict[str, Any]] = []
        self.taken = 0
        self.ends = self.dones = 0  # lines with "end", with "done"

    def pump(self, wait_s: float = 0.0) -> None:
        """Read what the pipe holds (waiting up to `wait_s` for something)."""
        if wait_s and not select.select([self.fd], [], [], wait_s)[0]:
            return
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                return
            *lines, self.partial = (self.partial + chunk).split(b"\n")
            for line in lines:
                record = json.loads(line)
                self.seen.append(record)
                self.ends += "end" in record
                self.dones += "done" in record

    def take(self) -> list[dict[str, Any]]:
        """Every line not taken before."""
        self.pump()
        new, self.taken = self.seen[self.taken :], len(self.seen)
        return new

    def freeze(self) -> None:
        """Stop the driver (SIGSTOP) and read every line it wrote: each is one
        write() of a whole line, so once it is stopped the pipe holds them all."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        wait_for(lambda: _state(self.proc.pid) in ("T", "t", "Z", ""), what="the driver to stop")
        self.pump()
        assert not self.partial, self.partial

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def wait_line(self, key: str, timeout_s: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        checked = 0
        while time.monotonic() < deadline:
            for line in self.seen[checked:]:
                if key in line:
                    return line
            checked = len(self.seen)
            if self.proc.poll() is not None:
                self.pump()
                if not any(key in line for line in self.seen[checked:]):
                    raise AssertionError(f"driver exited with {self.proc.returncode}")
            self.pump(0.1)
        raise AssertionError(f"driver said no {key!r} within {timeout_s} s")

    def done_count(self) -> int:
        if self.proc.poll() is not None:
            self.pump()
            if not self.ends:
                raise AssertionError(f"driver exited with {self.proc.returncode}")
        self.pump()
        return self.dones

    def finish(self) -> dict[str, Any]:
        """Stop starting operations; the driver's last line."""
        with open(self.stop_path, "w"):
            pass
        return self.wait_line("end")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return ""


@dataclass
class Model:
    """The blocks of owners m-0..m-7 as acknowledged operations left them."""

    owners: dict[int, set[Block]] = field(default_factory=dict)
    pending: dict[str, Any] | None = None  # begun, not (yet) acknowledged
    acknowledged: int = 0

    def feed(self, lines: list[dict[str, Any]]) -> None:
        for line in lines:
            if "begin" in line:
                self.pending = line
            elif "done" in line:
                self.acknowledged += 1
                self.pending = None
                self._apply(line, self.owners)

    @staticmethod
    def _apply(line: dict[str, Any], owners: dict[int, set[Block]]) -> None:
        held = owners.setdefault(line["owner"], set())
        if line["op"] == "alloc":
            held.update((h[2], h[3], h[4]) for h in line["handles"])
        elif line["op"] == "free":
            held.difference_update((h[2], h[3], h[4]) for h in line["handles"])
        elif line["op"] == "recycle":
            held.clear()

    def compare(self, report: dict[str, Any]) -> list[str]:
        """Problems with a table (inspect --json) against the model: every
        acknowledged block present, nothing else, except what the one pending
        operation may or may not have done."""
        table: dict[int, set[Block]] = {}
        for b in report.get("blocks", []):
            owner = b["owner"] or ""
            if owner.startswith("m-"):
                table.setdefault(int(owner[2:]), set()).add(
                    (b["offset"], b["size"], b["generation"])
                )
        problems = list(report.get("problems", []))
        for k in set(table) | set(self.owners):
            found, want = table.get(k, set()), self.owners.get(k, set())
            if found == want:
                continue
            if not self._pending_explains(k, found, want):
                problems.append(
                    f"owner m-{k}: table has {len(found)} blocks, model {len(want)}; missing "
                    f"{sorted(want - found)[:3]}, extra {sorted(found - want)[:3]}; pending "
                    f"{self.pending}"
                )
        return problems

    def _pending_explains(self, k: int, found: set[Block], want: set[Block]) -> bool:
        line = self.pending
        if line is None or line["owner"] != k:
            return False
        if line["op"] == "alloc":
            extra = found - want
            return want <= found and Counter(s for _, s, _ in extra) == Counter(line["sizes"])
        if line["op"] == "free":
            return found == want - {(h[2], h[3], h[4]) for h in line["handles"]}
        if line["op"] == "recycle":
            return not found
        return False

    def blocks(self) -> set[Block]:
        return set().union(*self.owners.values()) if self.owners else set()
