"""The daemon's log: each lifecycle event once, rendered as text or as JSON.

An event is a name (`start`, `client_died`, `oom`, ...), a level, its fields
and a one-line message. Whoever notices it (the server, or the pure service
through its queue, see `Service.take_log`) builds one `LogEvent`; `EventLog`
renders it either as the message alone (`--log-format text`, the lines the
daemon always printed) or as one JSON object per line (`--log-format json`)
for journald, Docker and log shippers. No clock or stream is read here: the
server hands both in, which keeps this module pure.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

LOG_FORMATS = ("text", "json")
# Keys every JSON line has; an event's fields never replace them.
RESERVED = ("ts", "level", "event", "msg")


@dataclass(frozen=True)
class LogEvent:
    """One thing that happened to the daemon: `event` names it, `message` says
    it in a line for people, `fields` carry its figures for machines."""

    event: str
    message: str
    level: str = "info"
    fields: dict[str, Any] = field(default_factory=dict)


def iso_utc(ts: float) -> str:
    """`ts` (seconds since the epoch) as ISO 8601 in UTC, to the millisecond."""
    moment = datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render_text(event: LogEvent) -> str:
    """The text form: the message as it always read, nothing added."""
    return event.message


def render_json(event: LogEvent, ts: float) -> str:
    """The JSON form: one object on one line, `ts`, `level`, `event`, `msg`
    first, then the event's fields (values JSON cannot hold become strings)."""
    record: dict[str, Any] = {
        "ts": iso_utc(ts),
        "level": event.level,
        "event": event.event,
        "msg": event.message,
    }
    for key, value in event.fields.items():
        record[key if key not in RESERVED else f"{key}_"] = value
    return json.dumps(record, default=str, separators=(",", ":"))


class EventLog:
    """Where the daemon's events go: rendered in `fmt` ("text" or "json") and
    handed to `write` one line at a time, stamped with `clock()`."""

    def __init__(self, fmt: str, write: Callable[[str], None], clock: Callable[[], float]) -> None:
        if fmt not in LOG_FORMATS:
            raise ValueError(f"log format {fmt!r}: expected one of {', '.join(LOG_FORMATS)}")
        self.fmt = fmt
        self.write = write
        self.clock = clock

    def render(self, event: LogEvent) -> str:
        """The line `event` is written as, in this log's format."""
        return render_json(event, self.clock()) if self.fmt == "json" else render_text(event)

    def emit(self, event: LogEvent) -> None:
        """Write one event."""
        self.write(self.render(event))

    def __call__(
        self, message: str, event: str = "note", level: str = "info", **fields: Any
    ) -> None:
        """Write the event `event` with this message and fields. A bare
        `log(message)` (as the store's callback is called) is a `note`."""
        self.emit(LogEvent(event, message, level, fields))
