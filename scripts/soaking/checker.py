"""The checker process: attaches handed-off handles from its own session and
verifies their stamps.

Why a mismatch here is always real corruption, never a race: the checker
attaches with `retain=True`. The daemon grants the retain only while the
block is live under exactly that handle's generation (else StaleHandle), and
from then until `release` the block cannot be reused, whatever its owner does
(free, recycle, being SIGKILLed). The worker wrote the whole stamp before
sending the handle and never writes a buffer again after that. So after a
granted retain the bytes must be the stamp. StaleHandle (the owner let go
before the retain arrived) is no error by itself; the checker sends it back
to the worker, which checks that it really had let go of that buffer (see
`Worker.read_acks`): a refusal of a block the worker still holds is an error
of shmarena's.
"""

from __future__ import annotations

import os
import threading
import time
from multiprocessing.connection import Connection, Listener, wait
from typing import Any

from soaking.stamps import HANDOFF, STALE_ACK, ignore_sigint, send_quietly, stamp_problem

REPORT_EVERY_S = 0.25  # how often the soak hears the checker's counts


class Checker:
    """The checker's state: its client, the workers' connections, its counts."""

    def __init__(self, client: Any, address: str, conn: Connection, parent_pid: int) -> None:
        import shmarena

        self.shmarena = shmarena
        self.client = client
        self.conn = conn
        self.parent_pid = parent_pid
        self.counts = {"checked": 0, "verified": 0, "stale": 0, "errors": 0, "corrupted": 0}
        self.listener = Listener(address, family="AF_UNIX")
        self.accepted: list[Connection] = []
        self.sources: list[Connection] = []
        self.lock = threading.Lock()
        self.closing = threading.Event()

    def accept_loop(self) -> None:
        """In a thread: take in the workers' connections as they come."""
        while True:
            try:
                new = self.listener.accept()
            except OSError:
                if self.closing.is_set():
                    return
                continue  # a worker killed while connecting
            with self.lock:
                self.accepted.append(new)

    def report(self, kind: str, text: str) -> None:
        self.counts[kind] += 1
        send_quietly(self.conn, ("error" if kind == "errors" else "corrupt", f"checker: {text}"))

    def check_one(self, source: Connection) -> bool:
        """Verify one handed-off handle; False when `source` is gone."""
        try:
            data = source.recv_bytes()
        except (EOFError, OSError):
            return False  # its worker exited or was killed (maybe mid-message)
        if len(data) != HANDOFF.size:  # a torn message raises above instead
            self.report("errors", f"a hand-off of {len(data)} bytes, expected {HANDOFF.size}")
            return True
        *fields, wid, inc, seq = HANDOFF.unpack(data)
        handle = self.shmarena.Handle(*fields)
        self.counts["checked"] += 1
        try:
            buf = self.client.attach(handle, retain=True)
        except self.shmarena.StaleHandle:
            self.counts["stale"] += 1
            try:
                source.send_bytes(STALE_ACK.pack(seq))
            except OSError:
                return False
            return True
        except Exception as exc:  # noqa: BLE001 any other refusal is a finding to report
            self.report("errors", f"attach(retain=True) of {tuple(handle)} raised {exc!r}")
            return True
        try:
            self.verify(buf, wid, inc, seq, handle.offset)
        finally:
            self.release(buf, handle)
        return True

    def verify(self, buf: Any, wid: int, inc: int, seq: int, offset: int) -> None:
        problem = stamp_problem(buf.view, wid, inc, seq, offset)
        if problem:
            self.report("corrupted", problem)
        else:
            self.counts["verified"] += 1

    def release(self, buf: Any, handle: Any) -> None:
        try:
            self.client.release(buf)
        except Exception as exc:  # noqa: BLE001 a failed release is a finding to report
            self.report("errors", f"release of {tuple(handle)} raised {exc!r}")

    def serve_ready(self, ready: list[Any]) -> None:
        """Check what the ready workers sent; drop the ones that are gone."""
        for source in ready:
            if source is not self.conn and not self.check_one(source):
                source.close()
                self.sources.remove(source)

    def run(self) -> None:
        """Until the soak says stop: check hand-offs, report counts, and exit
        at once if the soak is gone."""
        next_report = time.monotonic() + REPORT_EVERY_S
        while True:
            with self.lock:
                self.sources += self.accepted
                self.accepted.clear()
            ready = wait([self.conn, *self.sources], timeout=0.1)
            if self.conn in ready and self.conn.recv() == "stop":
                break
            self.serve_ready(ready)
            if time.monotonic() >= next_report:
                send_quietly(self.conn, ("counts", dict(self.counts)))
                next_report = time.monotonic() + REPORT_EVERY_S
            if os.getppid() != self.parent_pid:
                os._exit(3)

    def close(self) -> None:
        for source in self.sources:
            source.close()
        self.closing.set()
        self.listener.close()
        self.client.close()
        self.conn.send(("final", dict(self.counts)))


def checker_main(name: str, run_dir: str, address: str, conn: Connection, parent_pid: int) -> None:
    """The checker process' entry point (see the module's docstring)."""
    ignore_sigint()
    import shmarena

    client = shmarena.connect(name, runtime_dir=run_dir, label="soak-checker")
    checker = Checker(client, address, conn, parent_pid)
    threading.Thread(target=checker.accept_loop, name="soak-accept", daemon=True).start()
    conn.send(("ready", os.getpid(), client.session))
    checker.run()
    checker.close()
