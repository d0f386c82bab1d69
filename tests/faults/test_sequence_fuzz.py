"""Seeded random sequences of requests against a real daemon: several raw
DEALER sockets interleave valid and invalid requests (waiting allocs,
lookups, puts and gets, queue closes, recycles, duplicate retains and
releases, malformed frames), say bye or just vanish, while real client
processes are SIGKILLed mid-work. Afterwards the daemon is the same process,
answers, counted no internal error, and `shmarena check` passes.

Bounded: SEQUENCES sequences of up to STEPS requests, and FUZZ_BUDGET_S
seconds at most (the figure line says how many ran)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import zmq

from shmarena.protocol import (
    OK,
    PROTOCOL_VERSION,
    Op,
)
from tests.conftest import Daemon, wait_for
from tests.unit.test_sequences import RequestIds

SEQUENCES = 40
STEPS = 60
PEERS_AT_ONCE = 4
FUZZ_BUDGET_S = 20.0
REPLY_TIMEOUT_MS = 10_000
OWNERS = ("o1", "o2", "shared")
NAMES = ("n1", "n2")
QUEUES = ("q1", "q2")

CLIENT_AT_WORK = """
import os, random, sys, shmarena
c = shmarena.connect()
rng = random.Random(int(sys.argv[1]))
held, retained = [], []
print("ready", flush=True)
while True:
    try:
        with c.owner("work-%d-%d" % (os.getpid(), rng.randrange(3))) as owner:
            for _ in range(rng.randrange(1, 5)):
                held.append(owner.alloc(rng.randrange(1, 64 * 1024)))
        held = [b for b in held if rng.random() < 0.5]
        retained.append(c.alloc(4096).handle)
        c.retain(retained[-1])
        if len(retained) > 8:
            c.release(retained.pop(0))
    except shmarena.OutOfMemory:  # the fuzzers hold the arena full for a while
        held.clear()
"""


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class Sequence(RequestIds):
    """One raw client: a DEALER socket, its request ids, and a seeded plan."""

    def __init__(self, context: zmq.Context, daemon: Daemon, seed: int) -> None:
        super().__init__()
        self.rng = random.Random(seed)
        self.daemon = daemon
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(f"ipc://{daemon.socket_path}")
        self.steps = self.rng.randrange(STEPS // 2, STEPS)
        self.queues = (*QUEUES, f"own-{seed}")  # shared ones, and one nobody else opens
        self.done = False
        self.sent = 0

    def request(self, op: Op, *args: Any, answer: bool = True) -> list[Any] | None:
        """Send one request; with `answer`, wait for its reply (others that
        arrive meanwhile, answers to kept requests, are set aside)."""
        rid = self.next_id(op)
        self.socket.send(msgpack.packb([int(op), rid, *args]))
        self.sent += 1
        if not answer:
            return None
        deadline = time.monotonic() + REPLY_TIMEOUT_MS / 1000
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not self.socket.poll(left_ms):
                proc = self.daemon.proc
                died = proc is not None and proc.poll() is not None
                raise AssertionError(
                    f"the daemon did not answer {op.name} {args!r:.120} within "
                    f"{REPLY_TIMEOUT_MS} ms"
                    + (f": it exited with {proc.returncode}" if died and proc else "")
                )
            reply = msgpack.unpackb(self.socket.recv(), raw=False, strict_map_key=False)
            if isinstance(reply, list) and len(reply) >= 2 and reply[1] == rid:
                return reply

    def junk(self, frame: bytes) -> None:
        self.socket.send(frame)
        self.sent += 1

    def close(self) -> None:
        self.socket.close(0)


class Fuzzer:
    def __init__(self, daemon: Daemon, seed: int) -> None:
        self.daemon = daemon
        self.rng = random.Random(seed)
        self.handles: list[list[int]] = []
        self.requests = 0

    def harvest(self, reply: list[Any] | None) -> None:
        def walk(value: Any) -> None:
            if isinstance(value, list):
                if len(value) == 5 and all(type(v) is int for v in value) and value[3] > 0:
                    self.handles.append(value)
                    del self.handles[:-32]
                else:
                    for item in value:
                        walk(item)

        if reply and reply[0] == OK:
            walk(reply[2:])

    def some(self, count: int) -> list[list[int]]:
        if not self.handles:
            return [[0, 0, 0, 4096, 1]]
        return [self.rng.choice(self.handles[-8:]) for _ in range(count)]

    def step(self, seq: Sequence) -> None:
        rng, some = self.rng, self.some
        wait = rng.choice([0.0, 0.0, 0.2, 0.5])
        kind = rng.randrange(20)
        r = seq.request
        if kind == 0:
            reply = r(Op.ALLOC, rng.randrange(1, 3 << 20), rng.choice((None, *OWNERS[:2])),
                      False, wait, "", answer=wait == 0)  # fmt: skip
        elif kind == 1:
            reply = r(Op.ALLOC_MANY, [rng.randrange(1, 1 << 20) for _ in range(rng.randrange(4))],
                      None, False, "")  # fmt: skip
        elif kind == 2:
            handles = some(rng.randrange(1, 3))
            reply = r(Op.FREE, handles + handles[:1] if rng.random() < 0.2 else handles)
        elif kind == 3:
            name = rng.choice(OWNERS)
            reply = r(Op.OWNER, name, name == "shared", -1)
        elif kind == 4:
            reply = r(Op.RECYCLE, rng.choice(OWNERS))
        elif kind in (5, 6):
            handles = some(rng.randrange(1, 3))
            dup = handles + handles[:1] if rng.random() < 0.3 else handles
            reply = r(Op.RETAIN if kind == 5 else Op.RELEASE, dup)
        elif kind == 7:
            reply = r(Op.PUBLISH, rng.choice(NAMES), some(1)[0], rng.random() < 0.5)
        elif kind == 8:
            reply = r(Op.LOOKUP, rng.choice(NAMES), wait, answer=wait == 0)
        elif kind == 9:
            reply = r(Op.UNPUBLISH, rng.choice(NAMES))
        elif kind == 10:
            reply = r(Op.QOPEN, rng.choice(seq.queues), rng.choice([1, 1, 2, 0]))
        elif kind in (11, 12):
            name = rng.choice(seq.queues)
            r(Op.QOPEN, name, 1)
            for _ in range(rng.randrange(1, 4)):  # pipelined, as an async producer sends
                handles = some(rng.randrange(0, 2)) if self.handles else []
                r(Op.QPUT, name, b"m" * rng.randrange(64), handles, wait, answer=wait == 0)
            reply = r(Op.QCLOSE, name) if rng.random() < 0.5 else None
        elif kind == 13:
            reply = r(Op.QGET, rng.choice(seq.queues), 0, wait, answer=wait == 0)
        elif kind == 14:
            reply = r(Op.QCLOSE, rng.choice(seq.queues))
        elif kind == 15:
            reply = r(Op.EVENTS, rng.randrange(-1, 5), "n", wait, answer=wait == 0)
        elif kind == 16:
            reply = r(rng.choice([Op.PING, Op.STATS, Op.OWNERS, Op.CLIENTS, Op.NAMES]))
        elif kind == 17:
            seq.junk(rng.randbytes(rng.randrange(0, 40)))
            reply = None
        elif kind == 18:  # a known op with arguments of the wrong shape
            op = rng.choice([o for o in Op if o not in (Op.SHUTDOWN, Op.HELLO, Op.BYE)])
            junk = [rng.choice([None, -1, 1 << 40, "x" * rng.randrange(5), b"\0", [1, 2], {}])
                    for _ in range(rng.randrange(4))]  # fmt: skip
            reply = r(op, *junk, answer=False)
        else:
            reply = r(Op.PING)
        self.harvest(reply)

    def run(self, seeds: list[int], deadline: float) -> int:
        """Run the sequences, PEERS_AT_ONCE interleaved at a time; how many ran."""
        context = zmq.Context()
        waiting = list(seeds)
        live: list[Sequence] = []
        finished = 0
        try:
            while (waiting or live) and time.monotonic() < deadline:
                while waiting and len(live) < PEERS_AT_ONCE:
                    seq = Sequence(context, self.daemon, waiting.pop())
                    hello = seq.request(Op.HELLO, PROTOCOL_VERSION, 4242, 1, "fuzz")
                    assert hello is not None and hello[0] == OK, hello
                    live.append(seq)
                seq = self.rng.choice(live)
                if seq.steps > 0:
                    seq.steps -= 1
                    self.step(seq)
                    continue
                if self.rng.random() < 0.5:
                    seq.request(Op.BYE)
                # else: the socket just goes away (its session ends on the lease)
                seq.close()
                live.remove(seq)
                self.requests += seq.sent
                finished += 1
        finally:
            for seq in live:
                self.requests += seq.sent
                seq.close()
            context.term()
        return finished


def test_random_sequences_never_stop_the_daemon(make_daemon: Callable[..., Daemon]) -> None:
    fuzz(make_daemon, SEQUENCES, FUZZ_BUDGET_S)


@pytest.mark.slow
def test_many_random_sequences_never_stop_the_daemon(make_daemon: Callable[..., Daemon]) -> None:
    fuzz(make_daemon, 10 * SEQUENCES, 15 * FUZZ_BUDGET_S)


def fuzz(make_daemon: Callable[..., Daemon], sequences: int, budget_s: float) -> None:
    """Two clients at work (SIGKILLed half-way) and `sequences` random
    sequences within `budget_s`; then the daemon lives, checks clean and
    caught no bug of its own."""
    daemon = make_daemon("16M", ["--lease", "1"])
    assert daemon.proc is not None
    pid = daemon.proc.pid
    before = rss_mib(pid)
    children = [daemon.python(CLIENT_AT_WORK, str(seed), stdout=subprocess.PIPE) for seed in (1, 2)]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        fuzzer = Fuzzer(daemon, seed=19)
        deadline = time.monotonic() + budget_s
        half = sequences // 2
        ran = fuzzer.run(list(range(100, 100 + half)), deadline)
        for child in children:  # killed mid-work: their sessions come back
            assert child.poll() is None, f"a client at work exited early: {child.returncode}"
            os.kill(child.pid, signal.SIGKILL)
        second = 100 + max(half, 100)  # seeds of the second half never repeat the first's
        ran += fuzzer.run(list(range(second, second + sequences - half)), deadline)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=10)
            if child.stdout is not None:
                child.stdout.close()
    assert daemon.proc.poll() is None, "the daemon stopped"
    client = daemon.client()
    client.ping()
    # the vanished sockets' sessions run out their lease, the killed clients' go at once
    wait_for(lambda: client.stats()["sessions"] == 1, timeout_s=20, what="sessions to end")
    stats = client.stats()
    assert stats["counters"]["internal_errors"] == 0, stats["counters"]["errors_by_code"]
    check = daemon.cli("check")
    assert check.returncode == 0, check.stdout + check.stderr
    after = rss_mib(pid)
    print(
        f"\nFIGURE sequence-fuzz: {ran} sequences, {fuzzer.requests} requests, "
        f"0 daemon deaths, check clean, daemon RSS {before:.1f} MiB before, {after:.1f} MiB after"
    )
    assert ran >= sequences // 4, f"only {ran} sequences ran within {budget_s:g} s"
