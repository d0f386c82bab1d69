"""How full the arena has been: the peak of used bytes and the --warn-used
alarm. Pure.

`used_bytes` is what `stats` calls it: the carved bytes of blocks owners
hold (blocks sitting free in a client cache are not used; `cached_bytes`
counts them). Its peak is kept exact by the ledger, in the one place used
bytes grow (`Ledger._own`); this module stamps it with the time the service
first saw it (`peak_at`) and resets it on an administrator's request.

`shmarena daemon --warn-used 90%` (or `0.9`, or an absolute size such as
`900M`) sets an alarm on used bytes. The threshold is a share of the arena's
capacity: its size, or for a growing arena (`--max-size`) its cap, since a
growing arena is near full only near its cap. The alarm has two states
(`Alarm`): it goes up when used bytes reach the threshold, and back down only
when they fall to the threshold less HYSTERESIS of the capacity (5 points of
a percentage) or below, so use that hovers around the threshold logs one
`used_high` and one `used_normal`, not a line per request. Each rise is
counted (`counters.used_warnings`). The service calls `Usage.observe` after
each request and timer whose used bytes or peak moved (one compare per
request when nothing did).

Neither the peak nor the alarm's state is kept in a `--backing` table: after
a restart the peak starts at the used bytes recovered, and the alarm looks
afresh (an arena recovered over its threshold logs `used_high` again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shmarena.config import format_size, parse_size
from shmarena.errors import DaemonStartError

if TYPE_CHECKING:
    from shmarena.daemon.ledger import Ledger
    from shmarena.daemon.model import ArenaInfo
    from shmarena.daemon.service import Service

# The alarm falls back at the threshold less this share of the capacity.
HYSTERESIS = 0.05
UP, DOWN = "used_high", "used_normal"
EXAMPLES = "give a percentage (90%), a fraction (0.9) or a size (900M)"


@dataclass(frozen=True)
class WarnLevel:
    """A --warn-used threshold as given: a share of the capacity, or bytes."""

    text: str
    fraction: float | None = None
    size_bytes: int | None = None

    def threshold_bytes(self, capacity: int) -> int:
        """The used bytes at which the alarm goes up, for an arena of `capacity`."""
        if self.size_bytes is not None:
            return self.size_bytes
        assert self.fraction is not None
        return max(1, math.ceil(self.fraction * capacity))


def parse_warn_used(text: str) -> WarnLevel:
    """A --warn-used value: "90%", "0.9" or "900M"; ValueError says what is wrong."""
    given = text.strip()
    if given.endswith("%"):
        try:
            percent = float(given[:-1])
        except ValueError:
            percent = -1.0
        if not 0 < percent <= 100:
            raise ValueError(
                f"--warn-used {text!r}: a percentage must be over 0 and at most 100; {EXAMPLES}"
            )
        return WarnLevel(given, fraction=percent / 100)
    try:
        number = float(given)
    except ValueError:
        number = None
    if number is not None and ("." in given or number <= 1):
        if not 0 < number <= 1:
            raise ValueError(
                f"--warn-used {text!r}: a fraction must be over 0 and at most 1; {EXAMPLES}"
            )
        return WarnLevel(given, fraction=number)
    try:
        size = parse_size(given)
    except ValueError:
        raise ValueError(f"--warn-used {text!r} is not a threshold; {EXAMPLES}") from None
    if size <= 0:
        raise ValueError(f"--warn-used {text!r}: a size must be over 0 bytes; {EXAMPLES}")
    return WarnLevel(given, size_bytes=size)


class Alarm:
    """The alarm's two states: `step(used)` says UP when used bytes reach
    `high` from below, DOWN when they fall to `low` or under while up, and
    None otherwise (never two UPs without a DOWN between them)."""

    def __init__(self, high: int, low: int) -> None:
        if not 0 <= low < high:
            raise ValueError(f"alarm needs 0 <= low < high, got low {low}, high {high}")
        self.high = high
        self.low = low
        self.up = False

    def step(self, used: int) -> str | None:
        if not self.up and used >= self.high:
            self.up = True
            return UP
        if self.up and used <= self.low:
            self.up = False
            return DOWN
        return None


class Usage:
    """The service's view of how full the arena has been: the peak's time
    and the --warn-used alarm (see the module's docstring)."""

    def __init__(self, info: ArenaInfo) -> None:
        self.name = info.name
        self.capacity = max(info.max_size_bytes, info.size_bytes)
        # What `observe` saw last: the service calls it when either moved.
        self.used = 0
        self.peak = 0
        self.peak_at = info.started_at
        self.level = parse_warn_used(info.warn_used) if info.warn_used else None
        self.alarm: Alarm | None = None
        if self.level is not None:
            high = self.level.threshold_bytes(self.capacity)
            if high > self.capacity:
                raise DaemonStartError(
                    f"--warn-used {self.level.text}: {format_size(high)} is more than the "
                    f"arena can ever use ({format_size(self.capacity)}, its "
                    f"{'--max-size' if info.max_size_bytes > info.size_bytes else 'size'}), so "
                    "the warning could never fire; give a smaller size or a percentage"
                )
            low = max(0, high - math.floor(HYSTERESIS * self.capacity))
            self.alarm = Alarm(high, min(low, high - 1))

    def observe(self, svc: Service, now: float) -> None:
        """Note the ledger's used bytes and peak now: stamp a new peak, and
        log (and count) the alarm going up or down."""
        ledger = svc.ledger
        self.used = used = ledger.owned_bytes
        if ledger.peak_bytes != self.peak:
            self.peak, self.peak_at = ledger.peak_bytes, now
        if self.alarm is None:
            return
        moved = self.alarm.step(used)
        if moved is None:
            return
        if moved == UP:
            svc.counters.used_warnings += 1
        svc.log(moved, self.message(moved, used), "warning" if moved == UP else "info",
                **self.fields(used))  # fmt: skip

    def restart(self, svc: Service, now: float) -> None:
        """A ledger recovered from a --backing table: its peak starts at its
        used bytes now, and the alarm looks afresh."""
        svc.ledger.peak_bytes = svc.ledger.owned_bytes
        if self.alarm is not None:
            self.alarm.up = False
        self.observe(svc, now)

    def reset_peak(self, ledger: Ledger, now: float) -> dict[str, Any]:
        """Set the peak to the used bytes now (an administrator asked); the
        peak before and after, with their times."""
        before = {"peak_used_bytes": ledger.peak_bytes, "peak_at": self.peak_at}
        ledger.peak_bytes = self.peak = ledger.owned_bytes
        self.peak_at = now
        return {
            "previous_peak_used_bytes": before["peak_used_bytes"],
            "previous_peak_at": before["peak_at"],
            "peak_used_bytes": self.peak,
            "peak_at": now,
        }

    def stats(self, ledger: Ledger) -> dict[str, Any]:
        """The `stats` keys of this module."""
        alarm = self.alarm
        figures: dict[str, Any] = {
            "peak_used_bytes": ledger.peak_bytes,
            "peak_at": self.peak_at,
            "warn_used": None if alarm is None else round(alarm.high / self.capacity, 4),
            "used_warning": alarm is not None and alarm.up,
        }
        if alarm is not None:  # (absent without --warn-used: sizes are never null)
            figures["warn_used_bytes"], figures["warn_clear_bytes"] = alarm.high, alarm.low
        return figures

    def fields(self, used: int) -> dict[str, Any]:
        """The figures of a used_high / used_normal event."""
        assert self.alarm is not None
        return {
            "used_bytes": used,
            "size_bytes": self.capacity,
            "percent": round(100 * used / self.capacity, 1),
            "threshold_bytes": self.alarm.high,
            "threshold": round(self.alarm.high / self.capacity, 4),
            "clear_bytes": self.alarm.low,
        }

    def message(self, moved: str, used: int) -> str:
        """The event's line for people."""
        assert self.alarm is not None
        figures = self.fields(used)
        share = f"{figures['percent']:g} % used ({format_size(used)} of " + (
            f"{format_size(self.capacity)})"
        )
        if moved == UP:
            return (
                f"arena {self.name!r} is {share}, at or over --warn-used "
                f"{format_size(self.alarm.high)}; logged again once use falls to "
                f"{format_size(self.alarm.low)} or less and rises again"
            )
        return (
            f"arena {self.name!r} is back to {share}, at or under "
            f"{format_size(self.alarm.low)} (--warn-used {format_size(self.alarm.high)} less "
            f"{HYSTERESIS:.0%} of the size)"
        )
