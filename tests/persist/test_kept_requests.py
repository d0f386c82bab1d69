"""Requests the daemon was keeping waiting when it was SIGKILLed, on a
persistent arena (`--backing`): after the restart, the client's retry of a
kept `lookup`, `alloc(timeout=...)` or `Queue.get` is waited on again (and met
by what happens after the restart) or refused with its own error, never
answered with "applied already".

Real daemons on a backing file, a real client process blocked in the call,
an observer client in this process that watches `stats` and then does what
meets the waiter.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import shmarena
from tests.conftest import Daemon, wait_for

GRACE_S = 30.0
WAIT_S = 60.0  # the client's wait: longer than any restart here

# A client process that makes one waiting call and prints its outcome as JSON.
WAITER = r"""
import json, sys
import shmarena

what, arg = sys.argv[1], sys.argv[2]
client = shmarena.connect(timeout_s=60.0, retry_s=0.2)
print(json.dumps({"session": client.session}), flush=True)
try:
    if what == "lookup":
        buf = client.lookup(arg, timeout=float(sys.argv[3]))
        result = {"ok": bytes(buf.view[:16]).hex(), "size": buf.size}
    elif what == "alloc":
        buf = client.alloc(int(arg), timeout=float(sys.argv[3]))
        result = {"ok": "allocated", "size": buf.size}
    else:
        queue = shmarena.Queue(name=arg, client=client)
        result = {"ok": repr(queue.get(timeout=float(sys.argv[3])))}
except Exception as error:
    result = {"error": type(error).__name__, "message": str(error)}
print(json.dumps(result), flush=True)
client.close()
"""


def backing_args(path: Path) -> list[str]:
    return ["--backing", str(path), "--grace", f"{GRACE_S:g}"]


def waiting(daemon: Daemon, count: int) -> None:
    """Wait until `daemon` keeps `count` requests waiting."""
    with daemon.client(cache=False) as obs:
        wait_for(
            lambda: obs.stats()["waiting_requests"] == count,
            timeout_s=30,
            what=f"{count} kept request(s) at {daemon.name}",
        )


def run_across_crash(
    make_daemon: Callable[..., Daemon],
    tmp_path: Path,
    size: str,
    args: list[str],
    before: Callable[[Daemon], None],
    after: Callable[[shmarena.Client], None],
    kept_after: bool = True,
) -> dict[str, Any]:
    """Start a daemon on a backing file, run `before` with it, start the
    WAITER with `args`, wait until its request is kept, SIGKILL the daemon,
    start it again on the same file, wait until the retried request is kept
    again (the client resends it every retry_s; unless `kept_after` is False:
    then it is refused at once), run `after`, and return what the WAITER's
    call returned."""
    path = tmp_path / "arena"
    first = make_daemon(size=size, extra=backing_args(path))
    before(first)
    child = first.python(WAITER, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert child.stdout is not None
        json.loads(child.stdout.readline())
        waiting(first, 1)
        assert first.proc is not None
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10)
        second = make_daemon(size=size, extra=backing_args(path), name=first.name)
        with second.client(cache=False) as obs:

            def kept_again() -> bool:
                stats = obs.stats()
                assert stats["counters"]["errors_by_code"].get("protocol", 0) == 0, stats
                return bool(stats["waiting_requests"] == 1)

            if kept_after:
                wait_for(kept_again, timeout_s=30, what="the retried request to be kept again")
            after(obs)
            line = child.stdout.readline()
            assert line, child.stderr.read() if child.stderr else ""
            outcome: dict[str, Any] = json.loads(line)
            assert child.wait(timeout=30) == 0
            assert obs.check() == []
        return outcome
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


def test_a_kept_lookup_is_met_by_a_publish_after_the_restart(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    def publish(obs: shmarena.Client) -> None:
        buf = obs.alloc(5000)
        buf.view[:16] = b"published-after!"
        obs.publish("later", buf)

    outcome = run_across_crash(
        make_daemon, tmp_path, "16M", ["lookup", "later", str(WAIT_S)], lambda d: None, publish
    )
    assert outcome == {"ok": b"published-after!".hex(), "size": 5000}


def test_a_kept_lookup_gets_its_own_unknown_name_when_its_wait_is_over(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    # A wait of 6 s: the restart takes less on an idle machine, and the
    # client's own timeout (wait + 60 s) is far longer, so the answer is
    # the daemon's UnknownName at the original deadline (kept across the
    # restart), whatever the load.
    outcome = run_across_crash(
        make_daemon, tmp_path, "16M", ["lookup", "never", "6"], lambda d: None, lambda o: None
    )
    assert outcome["error"] == "UnknownName", outcome
    assert "'never'" in outcome["message"], outcome


def test_a_kept_alloc_is_met_by_a_recycle_after_the_restart(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    def fill(daemon: Daemon) -> None:  # a detached owner holds the whole arena
        with daemon.client(cache=False) as obs:
            obs.owner("all", detached=True).alloc(4 << 20)

    outcome = run_across_crash(
        make_daemon,
        tmp_path,
        "4M",
        ["alloc", str(3 << 20), str(WAIT_S)],
        fill,
        lambda obs: obs.recycle("all"),
    )
    assert outcome == {"ok": "allocated", "size": 3 << 20}


def test_a_kept_queue_get_is_refused_with_its_own_error_after_the_restart(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    # Queues are not kept across a restart: the retried get finds none.
    outcome = run_across_crash(
        make_daemon,
        tmp_path,
        "16M",
        ["qget", "jobs", str(WAIT_S)],
        lambda d: None,
        lambda o: None,
        kept_after=False,
    )
    assert outcome.get("error") != "ProtocolError", outcome
    assert "'jobs'" in outcome.get("message", ""), outcome
