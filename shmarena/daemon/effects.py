"""What the service asks the server to do: small frozen values. Pure.

The service decides and the server acts (as h11's connection returns events
and its caller does the socket work). Each call into the service hands back
the replies to send and the effects to perform; the service never calls the
server back. Replies to a request are in `Outcome.replies`, in the order they
go out; effects follow the request's own handling, in the order they arose.

The one exception is growth: making a segment is I/O whose answer the
allocation under way needs (a block is carved in it, or the request is
refused with OutOfMemory), so the server hands the service a `Grow`
capability at start (see `SegmentMaker`) instead of getting an effect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from shmarena.daemon.logs import LogEvent


@dataclass(frozen=True, slots=True)
class Watch:
    """Watch this client process (a pidfd) and say whether it could, with
    `Service.watched`: the session's hello is answered then."""

    session: int
    pid: int
    start_ticks: int


@dataclass(frozen=True, slots=True)
class Unwatch:
    """The session is over: stop watching its process."""

    session: int


@dataclass(frozen=True, slots=True)
class Log:
    """Write this event to the daemon's log."""

    event: LogEvent


@dataclass(frozen=True, slots=True)
class Stop:
    """An administrator asked the daemon to stop: finish this turn and stop."""


Effect = Watch | Unwatch | Log | Stop


@dataclass(slots=True)
class Outcome:
    """What one call into the service produced: (peer, frame) replies to
    send, in order, and the effects to perform."""

    replies: list[tuple[bytes, bytes]] = field(default_factory=list)
    effects: list[Effect] = field(default_factory=list)


# maker(index, size_bytes): make segment `index` of `size_bytes` now; whether
# it could. The one capability the server hands the service (see above).
SegmentMaker = Callable[[int, int], bool]
