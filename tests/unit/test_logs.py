"""The log formatter (shmarena/daemon/logs.py): one event, two renderings."""

from __future__ import annotations

import json

import pytest

from shmarena.daemon.logs import EventLog, LogEvent, iso_utc, render_json, render_text


def test_iso_utc_is_iso_8601_in_utc_to_the_millisecond() -> None:
    assert iso_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1_700_000_000.25) == "2023-11-14T22:13:20.250Z"


def test_text_is_the_message_and_json_carries_the_fields() -> None:
    event = LogEvent("client_died", "client session 3 exited", "info", {"session": 3, "pid": 9})
    assert render_text(event) == "client session 3 exited"
    line = render_json(event, 0.0)
    assert "\n" not in line
    assert json.loads(line) == {
        "ts": "1970-01-01T00:00:00.000Z",
        "level": "info",
        "event": "client_died",
        "msg": "client session 3 exited",
        "session": 3,
        "pid": 9,
    }


def test_a_field_never_replaces_the_keys_every_line_has() -> None:
    event = LogEvent("note", "a\nb", "warning", {"event": "forged", "level": "debug", "x": {1}})
    record = json.loads(render_json(event, 0.0))
    assert record["event"] == "note" and record["level"] == "warning"
    assert record["event_"] == "forged" and record["level_"] == "debug"
    assert record["msg"] == "a\nb" and record["x"] == "{1}"  # one line; a set as a string


def test_event_log_writes_one_line_per_event_in_its_format() -> None:
    lines: list[str] = []
    text = EventLog("text", lines.append, lambda: 0.0)
    text("removed stale socket /x", "stale_socket_removed", path="/x")
    text("a bare note")  # as the store calls it
    as_json = EventLog("json", lines.append, lambda: 0.0)
    as_json("a bare note")
    assert lines[:2] == ["removed stale socket /x", "a bare note"]
    assert json.loads(lines[2])["event"] == "note"


def test_event_log_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="expected one of text, json"):
        EventLog("yaml", print, lambda: 0.0)


def test_queued_writer_drops_and_counts_instead_of_blocking() -> None:
    """A sink that does not take lines (a stderr nobody reads) costs lines,
    never a stall: writes return at once, the drop is reported in order."""
    import threading

    from shmarena.daemon.logwriter import QueuedWriter

    gate = threading.Event()
    written: list[str] = []

    def sink(line: str) -> None:
        gate.wait()
        written.append(line)

    writer = QueuedWriter(sink, lambda n: f"dropped {n}", capacity=3)
    for number in range(10):  # the thread holds one, the queue three, six are dropped
        writer(f"line {number}")
    assert writer.dropped >= 6
    gate.set()
    writer.close()  # writes what is queued, then the note
    assert written[0] == "line 0" and written[-1].startswith("dropped "), written
    kept = written[:-1]
    assert kept == [f"line {n}" for n in range(len(kept))]  # in order, the first ones
    assert len(kept) + int(written[-1].split()[1]) == 10  # each line written or counted
