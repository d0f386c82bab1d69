"""The records the ledger keeps: blocks, owners, sessions, and what changed. Pure.

Plain data and the rules on names and sizes that every record obeys; the
ledger (daemon/ledger.py) is the only code that changes them, the table
(daemon/table.py) writes and reads them back, the audit (daemon/audit.py)
checks that they agree. Nothing here imports the ledger, so all three may
import this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shmarena.daemon.lifecycle import SessionState
from shmarena.errors import InvalidRequest
from shmarena.limits import MAX_OWNER_NAME, MAX_SIZE_BYTES

# An owner's scope: recycled with its session, or kept until recycled.
SESSION = "session"
DETACHED = "detached"
IMPLICIT_PREFIX = "session-"
# The retainer key of references held by queued messages (daemon/exchange.py):
# sessions are numbered from 1, so 0 is nobody's session.
QUEUED = 0
MAX_SITE = 200  # characters of an allocation site kept


@dataclass(eq=False, slots=True)
class Block:
    """One allocation: where it is, how big, which hand-out, who holds it."""

    address: int
    size: int  # bytes the user asked for (the class size while cached)
    carved: int  # bytes the allocator holds for it (size rounded up to min block)
    generation: int
    owner: str | None  # None while cached, or once freed/recycled while still retained
    retainers: dict[int, int] | None = None  # session id -> count
    cache_session: int = 0  # the session whose cache it came from, 0 for none
    cached: bool = False  # sitting in that cache right now
    site: str = ""  # where it was allocated, if the client said (leak hunting)
    pins: dict[int, int] | None = None  # session id -> PINs not yet UNPINned


@dataclass(eq=False)
class Owner:
    """A named group of blocks, recycled together (scope SESSION or DETACHED)."""

    name: str
    scope: str
    session_id: int
    pid: int
    created_at: float
    blocks: dict[int, Block] = field(default_factory=dict)  # address -> block
    bytes: int = 0
    quota: int = 0  # carved bytes it may hold; 0: no quota of its own
    # session -> the id ASSIGN events of that session use for this owner
    ids: dict[int, int] = field(default_factory=dict)
    uid: int = -1  # the user of the session that created it (-1: not known)


@dataclass(eq=False)
class Session:
    """One connected client process, and what it holds besides its owners."""

    id: int
    pid: int
    start_ticks: int
    label: str
    since: float
    last_seen: float
    watched: bool  # True: a pidfd tells us when it dies; False: lease
    owners: set[str] = field(default_factory=set)
    retained: set[int] = field(default_factory=set)  # addresses of blocks it retains
    pinned: set[int] = field(default_factory=set)  # addresses of blocks it pins
    cached: set[int] = field(default_factory=set)  # addresses of blocks in its cache
    notices: list[int] = field(default_factory=list)  # flat address, generation pairs
    # ASSIGN events name owners by number: id -> name and back, for the
    # owners that exist (an id goes with its owner and is never given again,
    # so a post still on the way cannot come to mean another owner). Id 0 is
    # the session's own owner, for as long as the session lives.
    owner_ids: dict[int, str] = field(default_factory=dict)
    owner_id_of: dict[str, int] = field(default_factory=dict)
    next_owner_id: int = 1
    cached_bytes: int = 0
    # Who the process is, as the kernel told the daemon (docs/reliability.md, "Access"): an
    # administrator may act on every user's owners and blocks, others on their
    # own uid's only. The defaults are for the pure core's tests.
    uid: int = 0
    gid: int = 0
    admin: bool = True
    # Where it is in its life (lifecycle.py; changed only by lifecycle.move).
    # Not kept in a table: a restored session is made recovering by adopt.
    state: SessionState = SessionState.JOINING


@dataclass
class Changes:
    """What changed since the last `take_changes`: the keys of blocks, owners
    and sessions to write again (or as gone, when no longer there), and
    owner ids as (session, index, name), name None for an id that went with
    its owner. A persistent daemon writes these to its journal; the others
    just drop them."""

    blocks: set[int] = field(default_factory=set)
    owners: set[str] = field(default_factory=set)
    sessions: set[int] = field(default_factory=set)
    owner_ids: list[tuple[int, int, str | None]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.blocks or self.owners or self.sessions or self.owner_ids)


@dataclass(frozen=True)
class Freed:
    """How many blocks, of how many carved bytes, a free or recycle let go."""

    blocks: int
    bytes: int


def implicit_owner(session_id: int) -> str:
    """The name of the owner a session's blocks go to when it names none."""
    return f"{IMPLICIT_PREFIX}{session_id}"


def check_owner_name(name: str) -> None:
    """InvalidRequest unless `name` may name an owner."""
    if not name or len(name) > MAX_OWNER_NAME or not name.isprintable():
        raise InvalidRequest(
            f"owner name must be 1-{MAX_OWNER_NAME} printable characters, got {name!r:.60}",
            owner=name[:MAX_OWNER_NAME],
        )


def check_size(size: int) -> None:
    """InvalidRequest unless `size` is a size a buffer may have."""
    if size <= 0 or size > MAX_SIZE_BYTES:
        raise InvalidRequest(
            f"buffer size must be a positive number of bytes, got {size}",
            requested_bytes=size,
        )
