"""The lifecycle of a Buffer, as a table: its states, the events that move
it, and the one function that applies an event or refuses it.

A Buffer is *owned* (allocated by this process), *attached* (another
process's block, no reference taken) or *retained* (attached with a
reference), and ends *done*: freed, released, recycled or closed (`gone`
says which). Every change of state goes through `move`; an event the table
does not list for the state at hand raises the lifetime error that names the
broken rule (errors.lifetime_error). A leaf: it imports nothing of
`shmarena.client` at runtime.
"""

from __future__ import annotations

from enum import Enum
from typing import Protocol

from shmarena.errors import StaleHandle, lifetime_error
from shmarena.shm.segments import OFFSET_MASK, SEGMENT_SHIFT

__all__ = ["LIVE_STATES", "TRANSITIONS", "State", "move", "refusal"]


class State(str, Enum):
    """Where a Buffer is in its life (compares equal to its value's string)."""

    OWNED = "owned"
    ATTACHED = "attached"
    RETAINED = "retained"
    DONE = "done"

    def __str__(self) -> str:
        return self.value

    # Hash as the string it equals, so a plain "retained" (from a caller that
    # predates this Enum) finds the same table entries without a conversion:
    # `State(x)` costs a microsecond, too much for attach or a free.
    __hash__ = str.__hash__


OWNED, ATTACHED, RETAINED, DONE = State.OWNED, State.ATTACHED, State.RETAINED, State.DONE
# A Buffer in any of these states still maps its block (not freed or released).
LIVE_STATES = (OWNED, ATTACHED, RETAINED)
# Its value (or the member itself) -> the member.
STATES: dict[str, State] = {state.value: state for state in State}

# (state, event) -> the state after it. A pair not listed is refused by `move`.
# "use" (view, ndarray, handle) leaves a live Buffer as it is; "free" of an
# attached or retained Buffer is the daemon's to judge (it was another
# process's block); "recycle", "close" and "release" end a Buffer whatever it
# was (a recycled Buffer may still hold a reference this process releases).
TRANSITIONS: dict[tuple[State, str], State] = {
    **{(state, "use"): state for state in LIVE_STATES},
    **{(state, "free"): DONE for state in LIVE_STATES},
    (OWNED, "retain"): OWNED,
    (ATTACHED, "retain"): RETAINED,
    (RETAINED, "retain"): RETAINED,
    (DONE, "retain"): DONE,  # by a handle read before: the daemon judged it
    (RETAINED, "unretain"): ATTACHED,  # a retain undone (a cancelled asyncio call)
    **{(state, event): DONE for state in State for event in ("recycle", "close", "release")},
}

# The word a done Buffer's errors use for the event that ended it.
_GONE = {"free": "freed", "release": "released", "recycle": "recycled", "close": "closed"}


class Lived(Protocol):
    """What `move` reads and writes of a Buffer."""

    _state: State
    _gone: str
    _address: int
    _size: int
    _gen: int


def move(buf: Lived, event: str, what: str = "") -> None:
    """Apply `event` to `buf`: its state after, from TRANSITIONS; a Buffer
    that ends records how (`_gone`). StaleHandle, naming the rule, if the
    table does not allow `event` now; `what` names the call for the message
    (a use: "view", "handle", ...)."""
    after = TRANSITIONS.get((buf._state, event))
    if after is None:
        raise refusal(buf, event, what)
    buf._state = after
    if after is DONE:
        buf._gone = _GONE.get(event, buf._gone)


def refusal(buf: Lived, event: str, what: str = "") -> StaleHandle:
    """The error for `event` on a Buffer that is done already."""
    gone = buf._gone or "freed"  # "freed", "released", "recycled" or "closed"
    address = buf._address
    offset, segment = address & OFFSET_MASK, address >> SEGMENT_SHIFT
    if event == "free":
        where = f"offset {offset:#x}" + (f" of segment {segment}" if segment else "")
        recycled = gone == "recycled"
        return lifetime_error(
            "owner_recycled" if recycled else "double_free",
            f"free of the buffer at {where} (generation {buf._gen})",
            "its owner was recycled already; nothing was freed"
            if recycled
            else "this Buffer was freed (or released) already; nothing was freed",
            offset=offset,
            generation=buf._gen,
        )
    return lifetime_error(
        "owner_recycled" if gone == "recycled" else "use_after_free",
        f"Buffer.{what or event} of the buffer at offset {offset:#x} ({buf._size} bytes)",
        f"it was {gone} already, so it has no bytes any more (its block may be another "
        "allocation's by now); views made before that stay valid: the block is pinned "
        "until the last of them is gone",
        offset=address,
        generation=buf._gen,
    )
