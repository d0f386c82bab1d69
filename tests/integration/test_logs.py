"""The daemon's log, as people and machines read it: `--log-format json` gives
one JSON object per line for each lifecycle event (start, client joined, died
or left with what was reclaimed, OOM with its figures, stop); the default text
format prints the lines it always printed, the start line first."""

from __future__ import annotations

import datetime
import json
import re
import signal
import subprocess
from typing import Any

import pytest

import shmarena
from tests.conftest import wait_for

MiB = 1 << 20

# A client process that holds three blocks (cache off: each is the daemon's,
# none sits in a client cache), says so, and waits to be killed.
HOLDER = """
import shmarena, sys
c = shmarena.connect(cache=False, label="holder")
bufs = [c.alloc(n) for n in (MiB, 256 << 10, 12345)]
print(c.session, flush=True)
sys.stdin.read()
""".replace("MiB", str(MiB))


def parse_lines(out: str) -> list[dict[str, Any]]:
    """Every line of the daemon's output as JSON (fails on one that is not)."""
    records = []
    for number, line in enumerate(out.splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"line {number} of the daemon's output is not JSON: {line!r}\n{out}")
        assert isinstance(record, dict), line
        records.append(record)
    return records


def only(records: list[dict[str, Any]], event: str, **match: Any) -> dict[str, Any]:
    """The one record of `event` whose fields include `match`."""
    found = [
        r for r in records if r["event"] == event and all(r.get(k) == v for k, v in match.items())
    ]
    assert len(found) == 1, f"{len(found)} {event} events with {match}: {found}"
    return found[0]


def test_json_log_has_one_object_per_lifecycle_event(make_daemon) -> None:
    daemon = make_daemon(size="8M", extra=["--log-format", "json"])
    client = daemon.client(cache=False, label="main")
    kept = client.alloc(2 * MiB)

    holder = daemon.python(HOLDER, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout is not None
    holder_session = int(holder.stdout.readline())
    row = next(r for r in client.list_clients() if r["session"] == holder_session)
    held_blocks, held_bytes = row["blocks"], row["bytes"]
    assert held_blocks == 3 and held_bytes >= MiB + (256 << 10) + 12345
    used_with_holder = client.stats()["used_bytes"]
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert holder.stdin is not None
    holder.stdin.close()
    holder.stdout.close()
    wait_for(
        lambda: all(r["session"] != holder_session for r in client.list_clients()),
        what="the killed holder's session to be reclaimed",
    )
    assert client.stats()["used_bytes"] == used_with_holder - held_bytes

    with pytest.raises(shmarena.OutOfMemory) as oom:
        client.owner("big").alloc(64 * MiB)
    assert kept.view.nbytes == 2 * MiB
    out = daemon.stop()
    records = parse_lines(out)

    for record in records:
        assert {"ts", "level", "event", "msg"} <= set(record), record
        assert record["level"] in ("info", "warning", "error"), record
        moment = datetime.datetime.fromisoformat(record["ts"].replace("Z", "+00:00"))
        assert moment.utcoffset() == datetime.timedelta(0), record["ts"]
    assert records[0]["event"] == "start" and records[-1]["event"] == "stop", out
    pid = daemon.proc.pid
    start = records[0]
    assert start["name"] == daemon.name and start["pid"] == pid
    assert start["size_bytes"] == 8 * MiB and start["socket"] == daemon.socket_path
    assert start["shm"] == "/shmarena-" + daemon.name
    assert start["version"] == shmarena.__version__ and isinstance(start["protocol"], int)
    assert records[-1]["pid"] == pid and records[-1]["reason"] == "SIGTERM"

    joined = only(records, "client_joined", session=client.session)
    assert joined["label"] == "main" and joined["pid"] > 0 and joined["watch"] == "pidfd"
    assert only(records, "client_joined", session=holder_session)["label"] == "holder"

    died = only(records, "client_died", session=holder_session)
    assert died["reason"] == "exited" and died["label"] == "holder"
    assert died["blocks_reclaimed"] == held_blocks
    assert died["bytes_reclaimed"] == held_bytes

    event = only(records, "oom", session=client.session)
    assert event["level"] == "warning" and event["owner"] == "big" and event["op"] == "alloc"
    assert event["requested_bytes"] == 64 * MiB == oom.value.requested_bytes
    assert event["largest_free_bytes"] == oom.value.largest_free_bytes
    assert event["free_bytes"] == oom.value.free_bytes
    assert event["pid"] == joined["pid"]

    left = only(records, "client_left", session=client.session)
    assert left["reason"] == "ended"
    assert left["blocks_reclaimed"] == 1 and left["bytes_reclaimed"] == 2 * MiB


def test_text_log_keeps_its_lines(make_daemon) -> None:
    daemon = make_daemon()
    with daemon.client(label="texty") as client:
        client.alloc(MiB)
        session = client.session
    out = daemon.stop()
    lines = out.splitlines()
    pid = daemon.proc.pid
    assert re.fullmatch(
        rf"shmarena daemon '{re.escape(daemon.name)}' \(pid {pid}\) serving 64 MiB at "
        rf"/dev/shm/shmarena-{re.escape(daemon.name)}, socket {re.escape(daemon.socket_path)}",
        lines[0],
    ), out
    assert lines[-1] == f"shmarena daemon '{daemon.name}' stopping (SIGTERM)", out
    assert f"client session {session} joined: pid " in out
    assert "label 'texty', watched by pidfd" in out
    assert f"client session {session} (pid " in out and ") left: reclaimed" in out
    assert not any(line.startswith("{") for line in lines), out
