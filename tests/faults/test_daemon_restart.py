"""The daemon dies under load and comes back: clients fail fast, keep their
mapped bytes readable, are told once that their session is gone, and carry on
with the new daemon; old handles are refused, never aliased."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable

import pytest

import shmarena
from tests.conftest import Daemon

# A worker under load: alloc, stamp, verify, free, as fast as it can, with a
# 1 s timeout. It reports each change of what its calls see as a JSON line and
# stops when its stdin closes.
WORKER = r"""
import json, os, sys, threading, time
import shmarena

cache = sys.argv[1] == "cache"
client = shmarena.connect(timeout_s=1.0, retry_s=0.2, cache=cache)
keep = client.alloc(3 << 20)                 # held across the crash
keep.view[:] = b"K" * len(keep.view)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()

def say(**fields):
    print(json.dumps(fields), flush=True)

state, ok, worst_fail = None, 0, 0.0
lost = unavailable = 0
epochs = {client.epoch}
say(event="ready", epoch=client.epoch)
while not stop.is_set():
    began = time.monotonic()
    try:
        size = (2 << 20) + 4096 if ok % 2 else 65536   # direct and (maybe) cached
        buf = client.alloc(size)
        buf.view[:8] = ok.to_bytes(8, "little")
        assert bytes(buf.view[:8]) == ok.to_bytes(8, "little")
        buf.free()
        client.sync()                                  # a round trip every time
        ok += 1
        epochs.add(client.epoch)
        new = "ok"
    except shmarena.DaemonUnavailable:
        worst_fail = max(worst_fail, time.monotonic() - began)
        unavailable += 1
        new = "unavailable"
    except shmarena.SessionLost as error:
        lost += 1
        new = "lost"
        say(event="lost", reason=error.details.get("reason"), message=str(error))
    if new != state:
        state = new
        say(event=new, epoch=client.epoch, ok=ok)
# The bytes mapped before the crash are still readable (old mapping, old arena).
intact = bytes(keep.view) == b"K" * len(keep.view)
try:
    keep.free()
    refused = None
except shmarena.StaleHandle as error:
    refused = str(error)
say(event="done", ok=ok, unavailable=unavailable, lost=lost, worst_fail_s=worst_fail,
    intact=intact, refused=refused, epochs=sorted(epochs), used_now=client.stats()["used_bytes"])
client.close()
"""


class Worker:
    def __init__(self, daemon: Daemon, mode: str) -> None:
        self.proc = daemon.python(
            WORKER, mode, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.events: list[dict] = []

    def wait_event(self, name: str, timeout_s: float = 20.0) -> dict:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                pytest.fail(f"worker exited ({self.proc.wait()}) before {name!r}:\n{err}")
            event = json.loads(line)
            self.events.append(event)
            if event["event"] == name:
                return event
        pytest.fail(f"worker did not report {name!r} within {timeout_s} s: {self.events}")

    def finish(self) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        done = self.wait_event("done")
        assert self.proc.wait(timeout=20) == 0, self.proc.stderr.read() if self.proc.stderr else ""
        return done

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def test_daemon_sigkill_under_load_then_restart(make_daemon: Callable[..., Daemon]) -> None:
    first = make_daemon(size="64M")
    assert first.proc is not None
    client = first.client(timeout_s=1.0, retry_s=0.2)
    old_epoch = client.epoch
    mine = client.alloc(2 << 20)
    mine.view[:4] = b"mine"
    old_handle = mine.handle
    old_inode = os.stat(first.shm_path).st_ino
    workers = [Worker(first, "cache"), Worker(first, "nocache")]
    try:
        for w in workers:
            w.wait_event("ready")
            w.wait_event("ok")

        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10)
        # Every call that needs the daemon now fails within its timeout.
        began = time.monotonic()
        with pytest.raises(shmarena.DaemonUnavailable, match="did not answer"):
            client.stats()
        own_fail_s = time.monotonic() - began
        for w in workers:
            w.wait_event("unavailable")
        assert bytes(mine.view[:4]) == b"mine"  # the mapping outlives the daemon
        # Left behind by the SIGKILL: the socket, the lock file and the arena.
        assert os.path.exists(first.socket_path) and os.path.exists(first.shm_path)

        second = make_daemon(size="64M", name=first.name)
        assert second.proc is not None
        new_inode = os.stat(second.shm_path).st_ino
        assert new_inode != old_inode  # a new arena, not the dead one reused
        # The first call after the restart says what happened, once ...
        with pytest.raises(shmarena.SessionLost, match="restarted") as lost:
            client.stats()
        assert lost.value.details["reason"] == "restarted"
        # ... and the client carries on with the new daemon.
        stats = client.stats()
        assert client.epoch == stats["epoch"] != old_epoch
        (mine_now,) = [r for r in client.list_clients() if r["session"] == client.session]
        assert mine_now["blocks"] == 0  # nothing of the old session came along
        with pytest.raises(shmarena.StaleHandle, match="epoch"):
            client.free(old_handle)
        with pytest.raises(shmarena.StaleHandle, match="epoch"):
            client.attach(old_handle)
        with pytest.raises(shmarena.StaleHandle, match="restarted"):
            mine.free()
        assert bytes(mine.view[:4]) == b"mine"  # still the old, now private, bytes
        fresh = client.alloc(4096)
        fresh.view[:4] = b"new!"
        assert bytes(mine.view[:4]) == b"mine"  # no aliasing between the two arenas

        for w in workers:
            w.wait_event("lost")
            w.wait_event("ok")
        done = [w.finish() for w in workers]
        for d in done:
            assert d["intact"] and d["refused"] and "epoch" in d["refused"]
            assert d["lost"] >= 1 and d["unavailable"] >= 1
            assert len(d["epochs"]) == 2
            assert d["worst_fail_s"] < 30  # bounded: no hang (the figure is printed)
        fresh.free()
        client.sync()
        assert client.stats()["used_bytes"] == 0
        assert client.check() == []
        print(
            f"\nFIGURE: daemon SIGKILL under load: own call failed after {own_fail_s:.2f} s "
            f"(timeout 1 s); workers' worst failing call "
            f"{max(d['worst_fail_s'] for d in done):.2f} s; "
            f"ops before+after {[d['ok'] for d in done]}; "
            f"calls refused as unavailable {[d['unavailable'] for d in done]}"
        )
        out = second.stop()
        assert "removed stale socket" in out
    finally:
        for w in workers:
            w.kill()


def test_reconnect_keeps_a_living_session_and_replaces_a_lost_one(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon(size="32M")
    client = daemon.client(timeout_s=1.0)
    buf = client.alloc(65536)
    session = client.session
    # The daemon still has the session: reconnect() keeps it and its blocks.
    client.reconnect()
    assert client.session == session
    client.sync()
    assert client.stats()["used_bytes"] == 65536
    buf.free()
    client.sync()
    assert client.stats()["used_bytes"] == 0
    (row,) = client.list_clients()
    assert row["session"] == session

    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(timeout=10)
    with pytest.raises(shmarena.DaemonUnavailable):
        client.ping()
    again = make_daemon(size="32M", name=daemon.name)
    del again
    # After a restart reconnect() opens a new session without raising.
    client.reconnect()
    assert client.stats()["sessions"] == 1
    assert client.alloc(4096).size == 4096
    assert client.check() == []
