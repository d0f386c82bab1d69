"""The generation table of a persistent arena (`--backing`): a file beside
the backing file, kept across a daemon crash (the epoch stays, so do the
handles) and rebuilt from the recovered allocation table at start. Live
handles still attach after the restart, stale ones are still refused, a
producer that died while the daemon was down has its handles refused, and a
client that resumed its session keeps writing the same table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import shmarena
from shmarena import Handle
from tests.conftest import Daemon, wait_for
from tests.integration.test_attach_check import attach_in_child
from tests.persist.test_resume import GRACE_S, backing_args, crash_and_restart

KiB, MiB = 1 << 10, 1 << 20
SIZE = "32M"

PRODUCER = """
import json, sys, shmarena
c = shmarena.connect()
handles = []
for size in map(int, sys.argv[1:]):
    buf = c.alloc(size)
    buf.view[:4] = b"gone"
    handles.append(list(buf.handle))
c.sync()
print(json.dumps(handles), flush=True)
sys.stdin.readline()
"""


def test_handles_keep_their_verdict_across_a_daemon_crash(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    path = tmp_path / "arena"
    first = make_daemon(size=SIZE, extra=backing_args(path))
    table = Path(str(path) + ".gens")
    assert table.exists()
    producer = first.client()
    live = [producer.alloc(64 * KiB), producer.alloc(4 * MiB)]  # cached, daemon
    freed = [producer.alloc(64 * KiB), producer.alloc(4 * MiB)]
    for i, buf in enumerate(live + freed):
        buf.view[:4] = f"blk{i}".encode()
    live_handles = [b.handle for b in live]
    freed_handles = [b.handle for b in freed]
    # A second producer holds blocks and dies while the daemon is down.
    doomed = first.python(
        PRODUCER, str(64 * KiB), str(4 * MiB), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert doomed.stdout is not None
    doomed_handles = [Handle(*h) for h in json.loads(doomed.stdout.readline())]
    for buf in freed:  # after the second producer's allocations: not reused by them
        buf.free()
    producer.sync()

    def kill_doomed() -> None:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=10)

    restart = crash_and_restart(make_daemon, first, path, kill_doomed)
    second = restart.daemon
    rows = attach_in_child(second, live_handles + freed_handles + doomed_handles)
    assert rows[:2] == [
        ["ok " + b"blk0".hex()] * 2,
        ["ok " + b"blk1".hex()] * 2,
    ], rows
    for plain, retained in rows[2:4]:
        assert plain.startswith("stale:") and "freed" in plain, plain
        assert retained.startswith("stale:"), retained
    for plain, retained in rows[4:]:
        assert plain.startswith("stale:") and "session ended" in plain, plain
        assert retained.startswith("stale:"), retained

    # The producer's session resumes; it frees a cached block it had
    # published: the table it writes is the one the new daemon keeps.
    def resumed() -> bool:
        with shmarena.connect(second.name, runtime_dir=second.run_dir, cache=False) as obs:
            return bool(obs.stats()["counters"]["sessions_resumed"] >= 1)

    wait_for(resumed, timeout_s=GRACE_S + 10, what="the producer's session to resume")
    live[0].free()
    [[plain, _]] = attach_in_child(second, [live_handles[0]])
    assert plain.startswith("stale:") and "freed" in plain, plain
    producer.sync()
    assert producer.check() == []
    second.stop()
    assert table.exists() and os.path.exists(path)  # kept files, like the backing itself
