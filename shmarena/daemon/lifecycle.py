"""The lifecycle of a daemon session, as a table: its states, the events
that move it, and the one function that applies an event or refuses it. Pure.

A session is *joining* from its hello until the server says how it watches
the client's process (`Service.watched` answers the hello), then *live*
(watched by a pidfd, or on a lease: `Session.watched` says which). A session
rebuilt from a persistent table is *recovering* until its client is back
(`resumed`: a request, its socket reconnecting, or a hello with its token)
or the grace is over (`not_resumed`). Every session ends: bye (`ended`), its
process's exit, its lease running out, or quarantine after a daemon bug;
*ended* is final. The end events are named as the reasons
`Service.end_session` is given, so a reason is its own event.

Every change of state goes through `move`; an event the table does not list
for the state at hand is a bug of the daemon: `move` raises InternalError,
which the service's isolation turns into a quarantined session, not a crash.
A leaf: it imports only the errors.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from enum import Enum
from typing import Protocol

from shmarena.errors import InternalError

__all__ = ["END_EVENTS", "TRANSITIONS", "IllegalMove", "SessionState", "check", "move"]


class SessionState(str, Enum):
    """Where a daemon session is in its life (compares equal to its value)."""

    JOINING = "joining"
    LIVE = "live"
    RECOVERING = "recovering"
    ENDED = "ended"

    def __str__(self) -> str:
        return self.value


JOINING, LIVE, RECOVERING = SessionState.JOINING, SessionState.LIVE, SessionState.RECOVERING
ENDED = SessionState.ENDED

# The reasons a session ends for (Service.end_session), each an event.
END_EVENTS = ("ended", "exited", "lease_expired", "not_resumed", "quarantined")

# (state, event) -> the state after it. A pair not listed is refused by `move`.
# A Session record starts JOINING: opened by a hello, or rebuilt from a table
# (then the service adopts it: "restored"). "watched" again of a live or
# recovering session is the server watching a restored session's process,
# or putting a session on a lease when it could not reclaim it after its
# pidfd said the process died (the lease ends it then). A lease
# runs only while the process is not known to be watched: never while the
# session is recovering (the grace is its clock then), and only a recovered
# session can miss the grace.
TRANSITIONS: dict[tuple[SessionState, str], SessionState] = {
    (JOINING, "watched"): LIVE,
    (LIVE, "watched"): LIVE,
    (RECOVERING, "watched"): RECOVERING,
    (JOINING, "restored"): RECOVERING,
    (RECOVERING, "resumed"): LIVE,
    **{
        (state, event): ENDED
        for state in (JOINING, LIVE, RECOVERING)
        for event in ("ended", "exited", "quarantined")
    },
    (JOINING, "lease_expired"): ENDED,
    (LIVE, "lease_expired"): ENDED,
    (RECOVERING, "not_resumed"): ENDED,
}


class IllegalMove(InternalError):
    """A session was asked to make a move its lifecycle does not allow: a
    bug of the daemon. An InternalError, so the service handles it as one
    (counted, logged with its traceback, the state checked) rather than
    answering it like a refusal of the client's request."""


class Stateful(Protocol):
    """What `move` reads and writes of a session (records.Session)."""

    id: int
    state: SessionState


def move(session: Stateful, event: str) -> SessionState:
    """Apply `event` to `session` and return its state after it (from
    TRANSITIONS). InternalError naming the session, its state and the event
    when the table does not allow `event` now: the state is left as it was."""
    after = TRANSITIONS.get((session.state, event))
    if after is None:
        raise IllegalMove(
            f"session {session.id} is {session.state.value}: the daemon may not apply "
            f"{event!r} to it now (a bug of the daemon)",
            session=session.id,
            state=session.state.value,
            event=event,
        )
    session.state = after
    return after


def check(sessions: Iterable[Stateful], recovering: Container[int]) -> list[str]:
    """The sessions' states against the admission's recovering sessions
    (the ones with a grace deadline): the two must agree, and an ended
    session is no longer among the live ones."""
    problems = []
    for session in sessions:
        if session.state is ENDED:
            problems.append(f"session {session.id} is ended but still kept")
        elif (session.state is RECOVERING) != (session.id in recovering):
            problems.append(
                f"session {session.id} is {session.state.value} but its grace "
                f"deadline is {'missing' if session.id not in recovering else 'set'}"
            )
    return problems
