"""A client process killed at any point of its conversation with the daemon
(issue 4, item 1): everything its sessions held comes back, exactly, and
nothing else moves: its detached owner keeps its bytes, the other clients keep
theirs, and the ledger checks clean.

How a victim dies. The client's fault hook (`SHMARENA_FAULT=POINT:OP#N`, see
shmarena/client/transport.py) makes it SIGKILL itself at POINT of its Nth
request of kind OP. The victim script below builds the same state every time,
so how many requests of each kind it makes before the one under test is fixed
(VICTIM_COUNTS). It prints READY, with its detached owner's handles, just
before that request: a victim that dies before READY, or does not die by
SIGKILL at all, fails the test instead of passing it.

Two kinds of message do not fit that scheme:
- `post`, the one-way bookkeeping batches: they leave from the client's
  flusher thread at moments the scheduler decides, so how many went before
  READY is not fixed. For them the victim arms the hook itself right after
  READY (`transport._FAULT = transport._parse_fault(spec)`: the parser and the
  kill of the environment variable, armed later), and its first post dies.
- `free`: the client library never sends a FREE request; a free of a block the
  daemon handed out travels as an event in a post. The `free` case frees such
  a block and dies at the post that carries it.
A post gets no reply, so neither has an after_reply point.

Reclaim time, printed as FIGURE: from the moment the victim's exit is
reported (a pidfd of the test's own: when waitpid would return) to the first
clients listing of the daemon without the victim's pid. The test reaps a
victim only after that (it reads the exit status with waitid(WNOWAIT)), so
meanwhile its pid cannot go to another process, and a hello it sent just
before dying (hello at after_send) still names it, is watched by pidfd and is
reclaimed at once rather than after a lease.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import shmarena
from tests.conftest import Daemon, unique_name, wait_for

MiB = 1 << 20
OBSERVER_ID = 1  # this test process's stamps
SURVIVOR_ID = 2  # the survivor child's
_victim_ids = itertools.count(10)


def pattern(offset: int, cid: int, size: int) -> bytes:
    """The bytes client `cid` stamps its block at `offset` with."""
    unit = offset.to_bytes(8, "little") + cid.to_bytes(8, "little")
    return (unit * (size // 16 + 1))[:size]


def stamp(buf: shmarena.Buffer, cid: int) -> None:
    buf.view[:] = pattern(buf.offset, cid, buf.size)


def stamped(buf: shmarena.Buffer, cid: int) -> bool:
    return bytes(buf.view) == pattern(buf.offset, cid, buf.size)


CHILD_PRELUDE = (
    "from __future__ import annotations\n"
    "import json, random, sys, threading\n"
    "import shmarena\n"
    "from shmarena.client import transport\n"
    + "".join(inspect.getsource(f) for f in (pattern, stamp, stamped))
)

# A client that holds stamped blocks and re-checks them on every line of stdin.
SURVIVOR = (
    CHILD_PRELUDE
    + r"""
cid = int(sys.argv[1])
c = shmarena.connect(label="survivor")
bufs = c.alloc_many([4096, 65536, 65536, 2 << 20])
bufs += c.owner("survivor-s").alloc_many([8192, 3 << 20])
for buf in bufs:
    stamp(buf, cid)
c.sync()
print("ready", flush=True)
for line in sys.stdin:
    bad = [hex(b.offset) for b in bufs if not stamped(b, cid)]
    print("ok" if not bad else "bad " + " ".join(bad), flush=True)
"""
)

# The victim: argv is its id, what to do after READY, and a fault spec to arm
# after READY ("" for none). The comments count the requests of each kind.
VICTIM = (
    CHILD_PRELUDE
    + r"""
cid, action, arm = int(sys.argv[1]), sys.argv[2], sys.argv[3]
MiB = 1 << 20
c = shmarena.connect(label=f"victim-{cid}")  # hello 1
n = shmarena.connect(label=f"victim-{cid}-nocache", cache=False)  # hello 2
kept = [c.alloc(2 * MiB, site="victim")]  # alloc 1 (labelled: not from the cache)
kept += [c.alloc(65536) for _ in range(3)]  # fill 1 (2 blocks), a cache hit, fill 2
kept += n.alloc_many([4096, 12288])  # alloc_many 1
session_owner = c.owner(f"victim-{cid}-s")  # owner 1
kept += session_owner.alloc_many([8192, 8192, 3 * MiB])  # fill 3 (3 MiB direct)
detached = c.owner(f"victim-{cid}-d", detached=True)  # owner 2
held = detached.alloc_many([4096, 65536, MiB, 2 * MiB])  # alloc_many 2
for buf in kept + held:
    stamp(buf, cid)
spare = [c.alloc(size) for size in (4096, 16384, 16384, 131072)]  # fill 4, 5, 6
spare[1].handle  # escapes: freed through the daemon, back to the cache by notice
c.free(spare)  # the cache holds them now
loose = c.alloc(32768)  # fill 7: a hand-out, reported by the sync
stamp(loose, cid)
c.sync()  # sync 1: the daemon knows all of the above
ready = {"detached": detached.name, "handles": [list(b.handle) for b in held]}
print("READY " + json.dumps(ready), flush=True)
if arm:
    transport._FAULT = transport._parse_fault(arm)
if action == "idle":
    sys.stdin.read()  # until the test kills it
elif action == "loop":
    rng = random.Random(cid)
    live = []
    while True:  # until the test kills it
        size = rng.choice((4096, 8192, 65536, 200000, 2 * MiB))
        where = rng.choice((c.alloc, session_owner.alloc, n.alloc))
        buf = where(size)
        stamp(buf, cid)
        if rng.random() < 0.2:
            buf.handle  # some escape: freed through the daemon
        live.append(buf)
        if len(live) > 8:
            old = live.pop(rng.randrange(len(live)))
            assert stamped(old, cid), hex(old.offset)
            old.free()
elif action == "hello":
    shmarena.connect(label=f"victim-{cid}-late")  # hello 3
elif action == "alloc":
    c.alloc(3 * MiB, site="victim")  # alloc 2 (labelled: not from the cache)
elif action == "alloc_many":
    n.alloc_many([4096, 8192])  # alloc_many 3
elif action == "fill":
    c.alloc(24576)  # fill 8: a class not cached yet
elif action == "owner":
    c.owner(f"victim-{cid}-s2")  # owner 3
elif action == "recycle":
    c.recycle(session_owner.name)  # recycle 1
elif action == "sync":
    c.alloc(65536).handle  # a hand-out for the sync to carry
    c.sync()  # sync 2
elif action == "post":
    for _ in range(4):
        c.alloc(8192).handle  # hand-outs the flusher reports within 5 ms
    threading.Event().wait(2)
elif action == "free":
    kept[0].free()  # a block from the daemon: its free is an event of a post
    threading.Event().wait(2)
print("SURVIVED", flush=True)
"""
)

# op -> N: the victim's request of that kind right after READY.
VICTIM_COUNTS = {
    "hello": 3,
    "alloc": 2,
    "alloc_many": 3,
    "fill": 8,
    "owner": 3,
    "recycle": 1,
    "sync": 2,
}
ARMED_AFTER_READY = ("post", "free")
POINTS = ("before_send", "after_send", "after_reply")
KILL_POINTS = [(point, op) for op in VICTIM_COUNTS for point in POINTS] + [
    (point, op) for op in ARMED_AFTER_READY for point in POINTS[:2]
]


def fault_for(point: str, op: str) -> tuple[str, str]:
    """(SHMARENA_FAULT for the victim's environment, spec it arms after READY)."""
    if op in VICTIM_COUNTS:
        return f"{point}:{op}#{VICTIM_COUNTS[op]}", ""
    return "", f"{point}:post"


def read_line(proc: subprocess.Popen[str], timeout_s: float, what: str) -> str:
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], timeout_s)[0]:
        pytest.fail(f"no line from {what} within {timeout_s} s")
    return proc.stdout.readline().strip()


@dataclass
class Arena:
    """A daemon, this process's client and a survivor child, all holding
    stamped blocks that every test checks after its kill."""

    daemon: Daemon
    client: shmarena.Client
    mine: list[shmarena.Buffer]
    survivor: subprocess.Popen[str]

    def survivors_intact(self) -> None:
        bad = [hex(b.offset) for b in self.mine if not stamped(b, OBSERVER_ID)]
        assert not bad, f"this process's blocks were overwritten: {bad}"
        assert self.survivor.stdin is not None
        self.survivor.stdin.write("check\n")
        self.survivor.stdin.flush()
        assert read_line(self.survivor, 10, "the survivor") == "ok"


@pytest.fixture(scope="module")
def arena() -> Iterator[Arena]:
    run_dir = tempfile.mkdtemp(prefix="shma-", dir="/tmp")
    daemon = Daemon(unique_name(), run_dir, "128M", ["--lease", "1"])
    survivor: subprocess.Popen[str] | None = None
    try:
        daemon.start()
        client = daemon.client()
        mine = client.alloc_many([4096, 8192, 65536, 3 * MiB])
        mine += client.owner("observer-s").alloc_many([16384, 2 * MiB])
        for buf in mine:
            stamp(buf, OBSERVER_ID)
        survivor = daemon.python(
            SURVIVOR, str(SURVIVOR_ID), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert read_line(survivor, 30, "the survivor") == "ready"
        yield Arena(daemon, client, mine, survivor)
    finally:
        if survivor is not None:
            survivor.kill()
            survivor.wait(timeout=10)
            for pipe in (survivor.stdin, survivor.stdout):
                if pipe is not None:
                    pipe.close()
        daemon.stop()
        daemon.assert_clean()
        shutil.rmtree(run_dir, ignore_errors=True)


@dataclass
class Victim:
    proc: subprocess.Popen[str]
    cid: int
    ready: dict[str, Any]

    def output(self) -> str:
        out = self.proc.stdout.read() if self.proc.stdout else ""
        err = self.proc.stderr.read() if self.proc.stderr else ""
        return f"stdout after READY: {out!r}\nstderr: {err}"


def start_victim(arena: Arena, cid: int, action: str, fault: str, arm: str) -> Victim:
    env = dict(arena.daemon.env)
    env.pop("SHMARENA_FAULT", None)
    if fault:
        env["SHMARENA_FAULT"] = fault
    proc = subprocess.Popen(
        [sys.executable, "-c", VICTIM, str(cid), action, arm],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = read_line(proc, 30, f"victim {cid}")
    if not line.startswith("READY "):
        proc.kill()
        proc.wait(timeout=10)
        victim = Victim(proc, cid, {})
        pytest.fail(
            f"victim {cid} ({action}, fault {fault or arm!r}) ended before READY with "
            f"{proc.returncode}: the fault fired too early?\n{victim.output()}"
        )
    return Victim(proc, cid, json.loads(line[len("READY ") :]))


def await_death(victim: Victim, timeout_s: float = 30.0) -> float:
    """Wait for the victim's exit without reaping it; the monotonic time of
    the exit. Fails unless it was SIGKILLed."""
    fd = os.pidfd_open(victim.proc.pid)
    try:
        exited = select.select([fd], [], [], timeout_s)[0]
        died_at = time.monotonic()
    finally:
        os.close(fd)
    if not exited:
        pytest.fail(f"victim {victim.cid} still alive after {timeout_s} s")
    status = os.waitid(os.P_PID, victim.proc.pid, os.WEXITED | os.WNOWAIT)
    assert status is not None
    if status.si_code != os.CLD_KILLED or status.si_status != signal.SIGKILL:
        pytest.fail(
            f"victim {victim.cid} was not SIGKILLed (si_code {status.si_code}, status "
            f"{status.si_status}): the fault hook did not fire\n{victim.output()}"
        )
    return died_at


def await_reclaim(arena: Arena, victim: Victim, died_at: float) -> float:
    """Wait until the daemon lists no session of the victim's pid; the time
    since its death, in ms."""
    pid, client = victim.proc.pid, arena.client

    def gone() -> bool:
        return not any(row["pid"] == pid for row in client.list_clients())

    wait_for(gone, timeout_s=15, interval_s=0.001, what=f"victim {victim.cid}'s sessions to end")
    return (time.monotonic() - died_at) * 1000


def check_reclaimed(arena: Arena, victim: Victim, base: dict[str, Any]) -> None:
    """Only the detached owner is left of the victim, with its bytes intact;
    recycling it brings the arena back to `base`."""
    client = arena.client
    handles = [shmarena.Handle(*h) for h in victim.ready["handles"]]
    name = victim.ready["detached"]
    unit = base["min_block_bytes"]
    detached_bytes = sum(-(-h.size // unit) * unit for h in handles)
    stats = client.stats()
    assert (stats["used_bytes"], stats["cached_bytes"], stats["free_bytes"]) == (
        base["used_bytes"] + detached_bytes,
        base["cached_bytes"],
        base["free_bytes"] - detached_bytes,
    )
    left = [
        (row["name"], row["scope"], row["blocks"], row["bytes"], row["alive"])
        for row in client.list_owners()
        if row["pid"] == victim.proc.pid
    ]
    assert left == [(name, "detached", len(handles), detached_bytes, False)]
    for handle in handles:
        assert stamped(client.attach(handle), victim.cid), f"detached block {handle} changed"
    arena.survivors_intact()
    assert client.check() == []
    assert client.recycle(name) == shmarena.Recycled(len(handles), detached_bytes)
    stats = client.stats()
    assert (stats["used_bytes"], stats["cached_bytes"], stats["free_bytes"]) == (
        base["used_bytes"],
        base["cached_bytes"],
        base["free_bytes"],
    )


def kill_cycle(
    arena: Arena, action: str, point: str | None = None, rng: random.Random | None = None
) -> float:
    """One victim: build its state, die (at `point` of `action`, or killed by
    the test for "idle" and "loop"), be reclaimed, be checked. The reclaim
    time in ms."""
    base = arena.client.stats()
    arena.survivors_intact()
    fault, arm = fault_for(point, action) if point else ("", "")
    victim = start_victim(arena, next(_victim_ids), action, fault, arm)
    try:
        if action == "loop":  # a moment chosen by the daemon's count of its requests
            rng = rng or random.Random(victim.cid)
            counters = ("posts", "allocs", "fills")
            start = sum(arena.client.stats()["counters"][k] for k in counters)
            target = start + rng.randint(1, 40)
            wait_for(
                lambda: sum(arena.client.stats()["counters"][k] for k in counters) >= target,
                what="the looping victim to make requests",
            )
        if action in ("idle", "loop"):
            victim.proc.send_signal(signal.SIGKILL)
        died_at = await_death(victim)
        reclaim_ms = await_reclaim(arena, victim, died_at)
    finally:
        victim.proc.kill()  # harmless on a dead one; reaps below
        victim.proc.wait(timeout=10)
        for pipe in (victim.proc.stdin, victim.proc.stdout, victim.proc.stderr):
            if pipe is not None:
                pipe.close()
    assert victim.proc.returncode == -signal.SIGKILL
    check_reclaimed(arena, victim, base)
    return reclaim_ms


def _ids(case: tuple[str, str]) -> str:
    return f"{case[1]}-{case[0]}"


@pytest.mark.parametrize("case", KILL_POINTS, ids=_ids)
def test_victim_killed_at_a_fault_point(arena: Arena, case: tuple) -> None:
    point, op = case
    reclaim_ms = kill_cycle(arena, op, point)
    print(f"\nFIGURE: killed at {point} of {op}: sessions gone {reclaim_ms:.1f} ms after death")


def test_victim_killed_while_idle(arena: Arena) -> None:
    reclaim_ms = kill_cycle(arena, "idle")
    print(f"\nFIGURE: killed while idle: sessions gone {reclaim_ms:.1f} ms after death")


def test_victim_killed_in_an_alloc_free_loop(arena: Arena) -> None:
    reclaim_ms = kill_cycle(arena, "loop", rng=random.Random(4))
    print(f"\nFIGURE: killed in a loop: sessions gone {reclaim_ms:.1f} ms after death")


def run_cycles(arena: Arena, count: int, seed: int) -> None:
    rng = random.Random(seed)
    cases = [("idle", None), ("loop", None)]
    cases += [(op, point) for point, op in KILL_POINTS]
    client = arena.client
    base = client.stats()
    times = []
    for _ in range(count):
        action, point = rng.choice(cases)
        times.append(kill_cycle(arena, action, point, rng))
    wait_for(
        lambda: client.stats()["sessions"] == base["sessions"],
        what="no session but the survivors' to be left",
    )
    stats = client.stats()
    leaked = (stats["used_bytes"] + stats["cached_bytes"]) - (
        base["used_bytes"] + base["cached_bytes"]
    )
    assert leaked == 0
    assert stats["free_bytes"] == base["free_bytes"]
    assert client.check() == []
    arena.survivors_intact()
    print(
        f"\nFIGURE: {count} kill cycles, leaked bytes {leaked}, worst reclaim "
        f"{max(times):.1f} ms, median {statistics.median(times):.1f} ms"
    )


def test_kill_cycles(arena: Arena) -> None:
    run_cycles(arena, count=20, seed=20)


@pytest.mark.slow
def test_kill_cycles_long(arena: Arena) -> None:
    run_cycles(arena, count=300, seed=21)
