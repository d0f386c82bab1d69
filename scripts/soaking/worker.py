"""The worker process: random alloc / free / recycle of stamped buffers,
hand-offs to the checker, reports to the soak."""

from __future__ import annotations

import os
import random
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Client as connect_to
from multiprocessing.connection import Connection
from typing import Any

from soaking.stamps import (
    COUNT_KEYS,
    HANDOFF,
    STALE_ACK,
    ignore_sigint,
    log_uniform_size,
    send_quietly,
    stamp_problem,
    write_stamp,
)


@dataclass
class Live:
    """A buffer a worker holds, with what its stamp and the accounting need."""

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

    def carved(self, size: int, buf: Any) -> int:
        """The bytes the daemon carves for `size` (docs/stats.md: the size
        class for sizes the cache serves, else rounded up to the minimum block;
        a kept large block reused for a smaller size: its own, as the cache says)."""
        if size <= self.cache_max:
            return int(self.size_class(size, self.min_block))
        entry = getattr(self.client._cache, "out", {}).get(buf._address)
        if entry is not None and entry[0] == buf._gen:
            return int(entry[3])
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
            self.live[self.seq] = Live(buf, name, self.seq, size, self.carved(size, buf))
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
            if self.conn.poll() and self.conn.recv() == "stop":
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
        except Exception as exc:  # noqa: BLE001 reported; the final report must still go out
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
