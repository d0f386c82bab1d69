"""A pid reused by a new process is never mistaken for the client that had it
(issue 4, item 3).

Each test runs one script as pid 1 of a private PID namespace (`unshare --pid
--fork --mount-proc`, as root), where pids are few and
/proc/sys/kernel/ns_last_pid chooses the next one: the script starts its own
daemon there, lets client A die and starts client B with A's very pid.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import can_unshare, subprocess_env, unique_name

# Shared by the scripts below: waiting, /proc, and starting a process at a
# chosen pid.
INNER_PRELUDE = r"""
import json, os, signal, subprocess, sys, time
import shmarena

PIPE = subprocess.PIPE
RUN_DIR = os.environ["SHMARENA_RUNTIME_DIR"]
NAME = os.environ["SHMARENA_NAME"]
SOCKET = os.path.join(RUN_DIR, NAME + ".sock")


def wait_for(condition, what, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)


def stat_fields(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rfind(b")") + 2 :].split()


def start_ticks(pid):
    return int(stat_fields(pid)[19])  # field 22 of /proc/PID/stat


def start(code, *args):
    return subprocess.Popen([sys.executable, "-c", code, *args], stdin=PIPE, stdout=PIPE, text=True)


def start_at(pid, code, *args):
    # The next pid the kernel hands out is ns_last_pid + 1, if nothing takes
    # it first (a thread of ours, say): then try again.
    for attempt in range(1, 21):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc = start(code, *args)
        if proc.pid == pid:
            return proc, attempt
        proc.kill()
        proc.wait()
    raise AssertionError(f"pid {pid} was taken by something else 20 times in a row")


def tell(proc, line):
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def ask(proc, line):
    tell(proc, line)
    return json.loads(proc.stdout.readline())


def pattern(offset, cid, size):
    unit = offset.to_bytes(8, "little") + cid.to_bytes(8, "little")
    return (unit * (size // 16 + 1))[:size]


# A client: starts, then connects when told, then allocates or checks its
# stamped blocks on each command; answers every command with a JSON line.
CLIENT = r'''
import json, sys
import shmarena
label, size, cid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def pattern(offset, cid, size):
    unit = offset.to_bytes(8, "little") + cid.to_bytes(8, "little")
    return (unit * (size // 16 + 1))[:size]

print(json.dumps("started"), flush=True)
client = None
bufs = []
for line in sys.stdin:
    command = line.strip()
    if command == "connect":
        client = shmarena.connect(label=label, cache=False)
        answer = {"session": client.session, "watched": client.info["watched"]}
    elif command == "alloc":
        buf = client.alloc(size)
        buf.view[:] = pattern(buf.offset, cid, size)
        bufs.append(buf)
        answer = {"offset": buf.offset}
    elif command == "check":
        answer = all(bytes(b.view) == pattern(b.offset, cid, b.size) for b in bufs)
    print(json.dumps(answer), flush=True)
'''


def start_daemon():
    log = open(os.path.join(RUN_DIR, "inner-daemon.log"), "w")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "shmarena", "daemon", "--size", "16M", "--lease", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def answers():
        if daemon.poll() is not None:
            raise AssertionError(f"the daemon exited with {daemon.returncode}")
        try:
            with shmarena.connect(timeout_s=0.5) as probe:
                probe.ping()
            return True
        except shmarena.DaemonUnavailable:
            return False

    wait_for(answers, "the daemon to answer", timeout_s=30)
    return daemon


def rows_of(observer, pid):
    return [row for row in observer.list_clients() if row["pid"] == pid]


def stop_all(daemon, children):
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait()
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGCONT)
        daemon.terminate()
        daemon.wait(timeout=20)
    with open(os.path.join(RUN_DIR, "inner-daemon.log")) as f:
        log = f.read()
    print("daemon log:\n" + log, file=sys.stderr)  # shown when the test fails
    if os.path.exists(f"/dev/shm/shmarena-{NAME}"):
        raise AssertionError(f"the daemon left its arena behind; its log:\n{log}")
    return log
"""

# A is killed, B gets its pid and says hello: B's session is its own.
REUSED_AFTER_DEATH = (
    INNER_PRELUDE
    + r"""
daemon = start_daemon()
children = []
try:
    observer = shmarena.connect(label="observer", cache=False)
    a = start(CLIENT, "A", "65536", "1")
    children.append(a)
    assert json.loads(a.stdout.readline()) == "started"
    info_a = ask(a, "connect")
    ask(a, "alloc")
    (row_a,) = rows_of(observer, a.pid)
    assert (row_a["watch"], row_a["blocks"], row_a["bytes"]) == ("pidfd", 1, 65536), row_a
    a.kill()
    a.wait()

    b, attempts = start_at(a.pid, CLIENT, "B", "8192", "2")
    children.append(b)
    assert json.loads(b.stdout.readline()) == "started"
    info_b = ask(b, "connect")
    assert info_b["watched"] and info_b["session"] != info_a["session"], (info_a, info_b)

    def b_alone():
        rows = rows_of(observer, b.pid)
        return rows if [r["session"] for r in rows] == [info_b["session"]] else None

    (row_b,) = wait_for(b_alone, "A's session to end, B's to be the only one of the pid")
    fresh = (row_b["watch"], row_b["owners"], row_b["blocks"], row_b["bytes"])
    assert fresh == ("pidfd", 0, 0, 0), row_b
    assert [o for o in observer.list_owners() if o["pid"] == b.pid] == []
    assert observer.stats()["used_bytes"] == 0

    ask(b, "alloc")
    (row_b,) = rows_of(observer, b.pid)
    assert (row_b["session"], row_b["blocks"], row_b["bytes"]) == (info_b["session"], 1, 8192)
    owners = [(o["name"], o["blocks"], o["bytes"]) for o in observer.list_owners()]
    assert owners == [(f"session-{info_b['session']}", 1, 8192)], owners
    assert observer.stats()["used_bytes"] == 8192
    assert ask(b, "check") is True
    assert observer.check() == []
    b.kill()
    b.wait()
    wait_for(lambda: observer.stats()["used_bytes"] == 0, "B's block to come back")
    assert observer.check() == []
    print(f"FIGURE: pid {b.pid} reused after {attempts} attempt(s)", flush=True)
    print("PASS", flush=True)
finally:
    stop_all(daemon, children)
"""
)

# A bare DEALER that completes the ZeroMQ handshake, then (told so) sends HELLO
# with its own pid and start time and an ALLOC, closes with linger and exits.
RAW_A = r"""
import os, sys, time
import msgpack, zmq
from shmarena.protocol import PROTOCOL_VERSION, Op

with open("/proc/self/stat", "rb") as f:
    data = f.read()
ticks = int(data[data.rfind(b")") + 2 :].split()[19])
context = zmq.Context()
sock = context.socket(zmq.DEALER)
sock.connect("ipc://" + sys.argv[1])
sock.send(msgpack.packb([int(Op.PING), 0]))  # refused (no session yet), but answered
assert sock.poll(10000), "the daemon did not answer"
sock.recv()
print(f"connected {os.getpid()} {ticks}", flush=True)
sys.stdin.readline()
sock.send(msgpack.packb([int(Op.HELLO), 1, PROTOCOL_VERSION, os.getpid(), ticks, "A-raw"]))
sock.send(msgpack.packb([int(Op.ALLOC), 1, 65536, None, False]))  # state changes count from 1
started = time.monotonic()
sock.close(linger=5000)
context.term()
print(f"sent {(time.monotonic() - started) * 1000:.1f}", flush=True)
"""

# A's hello reaches the daemon only after A died and B took its pid.
HELLO_AFTER_REUSE = (
    INNER_PRELUDE
    + "RAW_A = "
    + repr(RAW_A)
    + r"""
daemon = start_daemon()
children = []
try:
    observer = shmarena.connect(label="observer", cache=False)
    a = start(RAW_A, SOCKET)
    children.append(a)
    word, pid_a, ticks_a = a.stdout.readline().split()
    assert word == "connected" and int(pid_a) == a.pid

    daemon.send_signal(signal.SIGSTOP)
    wait_for(lambda: stat_fields(daemon.pid)[0] == b"T", "the daemon to stop")
    tell(a, "go")
    word, close_ms = a.stdout.readline().split()
    assert word == "sent" and a.wait() == 0
    b, attempts = start_at(a.pid, CLIENT, "B", "8192", "2")
    children.append(b)
    assert json.loads(b.stdout.readline()) == "started"
    ticks_b = start_ticks(b.pid)
    # Within one clock tick of each other the two would be indistinguishable;
    # A's whole life (an interpreter start) lies between them.
    assert ticks_b != int(ticks_a), (ticks_a, ticks_b)

    daemon.send_signal(signal.SIGCONT)
    resumed = time.monotonic()

    def a_row():  # once its alloc is handled too (the two may come in two reads)
        rows = [r for r in observer.list_clients() if r["label"] == "A-raw"]
        return rows if rows and rows[0]["blocks"] else None

    (row_a,) = wait_for(a_row, "A's hello and alloc to be handled")
    seen = (row_a["pid"], row_a["watch"], row_a["blocks"], row_a["bytes"])
    assert seen == (b.pid, "lease", 1, 65536), row_a
    info_b = ask(b, "connect")
    assert info_b["watched"], info_b
    ask(b, "alloc")
    side_by_side = len(rows_of(observer, b.pid)) == 2

    def a_gone():
        return not any(r["label"] == "A-raw" for r in observer.list_clients())

    wait_for(a_gone, "A's lease to run out")
    reclaim_s = time.monotonic() - resumed
    (row_b,) = rows_of(observer, b.pid)
    assert (row_b["session"], row_b["watch"]) == (info_b["session"], "pidfd"), row_b
    assert (row_b["blocks"], row_b["bytes"]) == (1, 8192), row_b
    assert observer.stats()["used_bytes"] == 8192
    assert ask(b, "check") is True
    ask(b, "alloc")  # B goes on as before
    assert ask(b, "check") is True
    assert observer.stats()["used_bytes"] == 2 * 8192
    assert observer.check() == []
    b.kill()
    b.wait()
    wait_for(lambda: observer.stats()["used_bytes"] == 0, "B's blocks to come back")
    assert observer.check() == []
    print(
        f"FIGURE: A's orphan session reclaimed by its 1 s lease {reclaim_s:.2f} s after "
        f"the daemon resumed; pid {b.pid} reused after {attempts} attempt(s); A's close "
        f"with linger took {close_ms} ms; B had its session while A's was still open: "
        f"{side_by_side}",
        flush=True,
    )
    print("PASS", flush=True)
finally:
    stop_all(daemon, children)
"""
)

needs_pid_namespace = pytest.mark.skipif(
    not can_unshare("--pid", "--fork", "--mount-proc"),
    reason="needs unshare --pid --fork --mount-proc (root, or user namespaces)",
)


def run_in_pid_namespace(run_dir: str, script: str) -> str:
    """Run `script` as pid 1 of a new PID namespace; its stdout. Fails on a
    non-zero exit or when it did not print PASS."""
    name = unique_name()
    arena = f"/dev/shm/shmarena-{name}"
    try:
        result = subprocess.run(
            [
                "unshare",
                "--pid",
                "--fork",
                "--kill-child",
                "--mount-proc",
                sys.executable,
                "-c",
                script,
            ],
            env=subprocess_env(run_dir, name),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        # The namespace dies with its pid 1: a daemon killed with it cannot
        # remove its arena, so do it here and say so.
        left = os.path.exists(arena)
        if left:
            os.unlink(arena)
    assert not left, f"{arena} was left behind"
    print(result.stdout)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "PASS" in result.stdout.splitlines(), result.stdout
    return result.stdout


@needs_pid_namespace
def test_reused_pid_starts_a_clean_session(run_dir: str) -> None:
    """A holds a stamped block and is SIGKILLed; B is started with A's pid and
    connects. B's session is new and watched by pidfd; B's row and owners
    show nothing of A's; the daemon's used bytes are B's alone; the pid is
    listed once."""
    run_in_pid_namespace(run_dir, REUSED_AFTER_DEATH)


@needs_pid_namespace
def test_hello_of_a_dead_client_is_not_pinned_on_its_pid_reuser(run_dir: str) -> None:
    """What is proven: a hello whose (pid, start time) names a process that
    has died is not watched through the pidfd of the process that now has
    that pid, so the orphan session lives on a lease and is reclaimed when it
    runs out, while the new process's own session stays.

    How: A (a bare ZeroMQ DEALER) completes the connection handshake while the
    daemon runs (a request before hello gets an answer, so the connection is
    up). Then the daemon is SIGSTOPped; A sends HELLO with its real pid and
    start ticks, then ALLOC, closes with linger (its frames are written to
    the kernel's socket buffer, which the stopped daemon cannot drain) and
    exits. B is started with A's pid (ns_last_pid) while the daemon is still
    stopped, and only then is the daemon resumed. It reads A's hello and
    alloc from the buffer of a connection already closed (ZeroMQ delivers
    frames received before the peer's disconnect), opens a pidfd on A's pid,
    which is B's process now, finds B's start time, not A's, and falls back
    to a lease: the clients row of A's session says "lease" while it holds
    A's block. The daemon runs with --lease 1, so that session, which never
    heartbeats, ends a second later and its block comes back, while B,
    connected meanwhile under the same pid, keeps its session (pidfd) and
    its stamped blocks and allocates as before. With a check of the pid
    alone the daemon would watch B for A and keep A's block as long as B
    lives, and the row would say "pidfd"."""
    run_in_pid_namespace(run_dir, HELLO_AFTER_REUSE)
