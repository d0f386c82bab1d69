"""Where the daemon reads the time: a clock object, so tests drive timers.

The service is handed `now` on every call and reads no clock; the server
reads one `Clock` for both: `time()` (seconds since the epoch: what the
service is handed, what stats and logs show) and `monotonic()` (its own
scheduling: the lease tick, held replies, caches). A daemon process uses
`SystemClock`. `ManualClock` stands still until a test moves it with
`jump(seconds)` (as trio's MockClock), so leases, waits and expiry are
tested without sleeping.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """The time, as the server reads it."""

    def time(self) -> float:
        """Seconds since the epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...


class SystemClock:
    """The operating system's clocks."""

    def time(self) -> float:
        """Seconds since the epoch (time.time)."""
        return time.time()

    def monotonic(self) -> float:
        """Seconds on the monotonic clock (time.monotonic)."""
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told to: both readings advance together
    by `jump`."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self._now = float(start)

    def time(self) -> float:
        """The time it was set to, as seconds since the epoch."""
        return self._now

    def monotonic(self) -> float:
        """The same reading: it never goes back."""
        return self._now

    def jump(self, seconds: float) -> None:
        """Move the clock forward by `seconds` (never back)."""
        if seconds < 0:
            raise ValueError(f"a clock never goes back: jump({seconds})")
        self._now += seconds
