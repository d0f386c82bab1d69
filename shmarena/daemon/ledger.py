"""Who holds what: sessions, owners, blocks and their generations. Pure.

The ledger is the only writer of the arena's allocator (`space`), so the two
can never disagree: every live allocation there is exactly one `Block` here.

- A *session* is one connected client process. Blocks it allocates without
  naming an owner go to its implicit owner ``session-<id>``, made on first use.
- An *owner* is a named group of blocks. Session scope: recycled when its
  session ends, however it ends. Detached: survives its creator and is only
  recycled explicitly.
- A *block* is one allocation. Its generation (a counter bumped on every
  allocation) makes stale handles and double frees detectable.
- A *retain* is a reader's reference on a block. Freeing or recycling a
  retained block takes it away from its owner at once, but the memory goes
  back to the arena only when the last retaining session releases it or ends.
- A *hold* is a reference kept by a message waiting in a queue (retainer key
  `QUEUED`): it keeps the block alive with nobody's session behind it, and
  passes to the session that takes the message (`pass_holds`).
- A *cached* block sits in a client's cache: carved from the arena and held by
  that session, but handed to no owner yet. The client hands cached blocks out
  without asking, numbering them in its session's generation space, and tells
  the ledger afterwards in batches (`apply_events`). A block that came from a
  session's cache goes back to that cache, not to the arena, whenever it is
  let go while the session lives (the session learns of it from a *notice*);
  so a client can never be left holding a block the ledger gave to someone
  else. When the session ends, its cache goes back to the arena.
- A *pin* is a session's word that its process still has views of a block
  (PIN/UNPIN events). A pinned block that its owner lets go stays out of the
  arena and out of every cache (counted as pinned) until the last pin goes,
  by UNPIN or by the end of the pinning session; then it goes where a
  released block goes.

Time comes in as ``now`` (seconds since the epoch); nothing here reads a clock.
Errors are raised as `shmarena.errors` exceptions; the service turns them into
replies.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from shmarena.config import format_size
from shmarena.errors import (
    AccessDenied,
    InvalidRequest,
    LimitReached,
    OutOfMemory,
    QuotaExceeded,
    ShmArenaError,
    StaleHandle,
    UnknownOwner,
    lifetime_error,
    lifetime_message,
)
from shmarena.protocol import (
    ASSIGN,
    DRAIN,
    FREE_EVENT,
    GEN_SHIFT,
    MAX_DETACHED_OWNERS,
    MAX_FILLS,
    MAX_OWNER_NAME,
    MAX_OWNERS_PER_SESSION,
    MAX_REMEMBERED_FREES,
    MAX_SIZE_BYTES,
    PIN,
    UNASSIGN,
    UNPIN,
    Handle,
)
from shmarena.shm import gens as words
from shmarena.shm.segments import (
    MAX_SEGMENTS,
    OFFSET_MASK,
    SEGMENT_SHIFT,
    Segmented,
    plan_growth,
)
from shmarena.shm.space import Space

SESSION = "session"
DETACHED = "detached"
# Why a block left its owner (Gone.reason): a free, its owner's recycle, or
# the end of the session its owner belonged to.
FREED = "freed"
RECYCLED = "recycled"
SESSION_ENDED = "session_ended"
_SESSION_ENDINGS = {  # Service.end_session's reasons, as a refusal says them
    "ended": "said bye (client.close)",
    "exited": "exited",
    "lease_expired": "stopped answering and its lease expired",
    "quarantined": "was cut off by the daemon",
}
IMPLICIT_PREFIX = "session-"
# The retainer key of references held by queued messages (daemon/exchange.py):
# sessions are numbered from 1, so 0 is nobody's session.
QUEUED = 0
MAX_SITE = 200  # characters of an allocation site kept


@dataclass(eq=False, slots=True)
class Block:
    offset: int
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
    name: str
    scope: str
    session_id: int
    pid: int
    created_at: float
    blocks: dict[int, Block] = field(default_factory=dict)  # offset -> block
    bytes: int = 0
    quota: int = 0  # carved bytes it may hold; 0: no quota of its own
    # session -> the id ASSIGN events of that session use for this owner
    ids: dict[int, int] = field(default_factory=dict)
    uid: int = -1  # the user of the session that created it (-1: not known)


@dataclass(eq=False)
class Session:
    id: int
    pid: int
    start_ticks: int
    label: str
    since: float
    last_seen: float
    watched: bool  # True: a pidfd tells us when it dies; False: lease
    owners: set[str] = field(default_factory=set)
    retained: set[int] = field(default_factory=set)  # offsets of blocks it retains
    pinned: set[int] = field(default_factory=set)  # offsets of blocks it pins
    cached: set[int] = field(default_factory=set)  # offsets of blocks in its cache
    notices: list[int] = field(default_factory=list)  # flat offset, generation pairs
    # ASSIGN events name owners by number: id -> name and back, for the
    # owners that exist (an id goes with its owner and is never given again,
    # so a post still on the way cannot come to mean another owner). Id 0 is
    # the session's own owner, for as long as the session lives.
    owner_ids: dict[int, str] = field(default_factory=dict)
    owner_id_of: dict[str, int] = field(default_factory=dict)
    next_owner_id: int = 1
    cached_bytes: int = 0
    # Who the process is, as the kernel told the daemon (README "Access"): an
    # administrator may act on every user's owners and blocks, others on their
    # own uid's only. The defaults are for the pure core's tests.
    uid: int = 0
    gid: int = 0
    admin: bool = True


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


@dataclass(frozen=True, slots=True)
class Gone:
    """What the ledger remembers of a block that left its owner."""

    generation: int
    reason: str  # FREED, RECYCLED or SESSION_ENDED
    how: str  # for SESSION_ENDED: how the session ended
    owner: str
    pid: int


@dataclass(frozen=True)
class Freed:
    blocks: int
    bytes: int


@dataclass
class Growth:
    """How the arena may grow (`--max-size`): up to `max_bytes` in all, by
    segments of whole `granule`s. `make(index, size)` is the server's: it
    creates the segment's memory and answers whether it could. An added
    segment that stays empty for `idle_s` seconds is released (0: never)."""

    max_bytes: int
    granule: int
    make: Callable[[int, int], bool]
    idle_s: float = 30.0
    failures: int = 0  # segments `make` could not create since the last it could
    last_failure: str = ""


class Ledger:
    def __init__(self, name: str, epoch: int, space: Space, growth: Growth | None = None) -> None:
        self.name = name
        self.epoch = epoch
        self.space = space  # the allocator of addresses: Extents, Buddy, or Segmented
        self.growth = growth if isinstance(space, Segmented) else None
        self.empty_since: dict[int, float] = {}  # added segment -> when it was seen empty
        self.sessions: dict[int, Session] = {}
        self.owners: dict[str, Owner] = {}
        self.blocks: dict[int, Block] = {}  # offset -> block, live or retained-only
        self.generation = 0
        self.requested_bytes = 0  # bytes asked for by the blocks owners hold
        self.owned_bytes = 0  # carved bytes of blocks owners hold
        self._next_session = 1
        self.changes = Changes()
        # Called with each block that leaves its owner (freed, recycled, handed
        # back to a cache): a name bound to it vanishes (daemon/exchange.py).
        self.unowned: Callable[[Block], None] | None = None
        # Called as (address, generation, reason) to keep the generation table
        # (shm/gens.py) right: LIVE when the daemon hands a block out itself,
        # a reason when a block leaves its owner, before it can be reused.
        self.gens: Callable[[int, int, int], None] | None = None
        # --quota-per-session: carved bytes a session may hold in the owners
        # it created (detached ones too, while it lives) and its cache (0: no
        # quota).
        self.session_quota = 0
        self.detached_owners = 0  # how many owners are detached now
        # Bounds (shmarena/protocol.py); attributes so the pure tests can try
        # the same code at a smaller bound.
        self.max_owners_per_session = MAX_OWNERS_PER_SESSION
        self.max_detached_owners = MAX_DETACHED_OWNERS
        # Why the last blocks left their owners, so that a stale handle's
        # refusal can say what happened to its block: address -> Gone, the
        # oldest forgotten first beyond max_remembered_frees. `_leaving` is
        # the reason of the blocks leaving now (set while a session ends).
        self.gone: OrderedDict[int, Gone] = OrderedDict()
        self.max_remembered_frees = MAX_REMEMBERED_FREES
        self._leaving: tuple[str, str] | None = None

    def limits(self) -> dict[str, int]:
        return {
            "owners_per_session": self.max_owners_per_session,
            "detached_owners": self.max_detached_owners,
            "remembered_frees": self.max_remembered_frees,
        }

    def take_changes(self) -> Changes:
        changes, self.changes = self.changes, Changes()
        return changes

    # -- sessions ------------------------------------------------------------

    def open_session(
        self, pid: int, start_ticks: int, label: str, now: float, watched: bool
    ) -> Session:
        session = Session(self._next_session, pid, start_ticks, label, now, now, watched)
        own = implicit_owner(session.id)
        session.owner_ids[0], session.owner_id_of[own] = own, 0
        self.changes.owner_ids.append((session.id, 0, own))
        self._next_session += 1
        self.sessions[session.id] = session
        self.changes.sessions.add(session.id)
        return session

    def end_session(self, session_id: int, reason: str = "ended") -> Freed:
        """Recycle every session-scoped owner of the session and drop its
        retains. Detached owners it created stay. `reason` (how the session
        ended: "ended", "exited", "lease_expired" ...) is what a stale handle
        of its blocks is told."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return Freed(0, 0)
        self.changes.sessions.add(session_id)
        blocks = freed = 0
        self._leaving = (SESSION_ENDED, reason)
        try:
            for name in sorted(session.owners):
                owner = self.owners.get(name)
                if owner is not None and owner.scope == SESSION:
                    result = self.recycle(name, words.ENDED)
                    blocks += result.blocks
                    freed += result.bytes
        finally:
            self._leaving = None
        for offset in list(session.retained):
            block = self.blocks.get(offset)
            if block is not None and block.retainers:
                block.retainers.pop(session_id, None)
                self.changes.blocks.add(offset)
                self._maybe_release(block)
        session.retained.clear()
        for offset in list(session.pinned):  # its process is gone or closed: so are its views
            block = self.blocks.get(offset)
            if block is not None and block.pins:
                block.pins.pop(session_id, None)
                self.changes.blocks.add(offset)
                self._maybe_release(block)
        session.pinned.clear()
        for offset in list(session.cached):
            if self.gens is not None:  # a hand-out it never reported dies with it
                self.gens(offset, words.any_of_session(session_id), words.ENDED)
            self._drain(session, self.blocks[offset])
        for name in session.owner_id_of:  # detached owners it had ids for
            owner = self.owners.get(name)
            if owner is not None:
                owner.ids.pop(session_id, None)
        return Freed(blocks, freed)

    def session(self, session_id: int) -> Session:
        return self.sessions[session_id]

    # -- owners --------------------------------------------------------------

    def open_owner(self, name: str, session_id: int, detached: bool, now: float) -> Owner:
        """The owner called `name`, created in `session_id` if it does not exist.

        Opening an existing owner is allowed from its own session, and for a
        detached owner from any session; the scope must match.
        """
        check_owner_name(name)
        session = self.sessions[session_id]
        scope = DETACHED if detached else SESSION
        owner = self.owners.get(name)
        if owner is None:
            if name.startswith(IMPLICIT_PREFIX) and name != implicit_owner(session_id):
                raise InvalidRequest(
                    f"owner names starting with {IMPLICIT_PREFIX!r} are reserved for "
                    f"sessions' own blocks; pick another name than {name!r}",
                    owner=name,
                )
            return self._create_owner(name, scope, session, now)
        if owner.scope != scope:
            raise InvalidRequest(
                f"owner {name!r} exists with scope {owner.scope!r}, asked for {scope!r}; "
                f"use another name or detached={owner.scope == DETACHED}",
                owner=name,
                scope=owner.scope,
            )
        if owner.uid != session.uid and not session.admin:
            raise AccessDenied(
                f"owner {name!r} was created by uid {owner.uid}; uid {session.uid} (session "
                f"{session_id}, pid {session.pid}) may use only its own user's owners. Use an "
                "owner of your own, or ask the daemon's user (or root) to act on it",
                owner=name,
                owner_uid=owner.uid,
                uid=session.uid,
            )
        if owner.scope == SESSION and owner.session_id != session_id:
            raise InvalidRequest(
                f"owner {name!r} belongs to session {owner.session_id} (pid {owner.pid}); "
                "a session-scoped owner is used only by the process that created it; "
                "use another name, or a detached owner to share one between processes",
                owner=name,
                session=owner.session_id,
                pid=owner.pid,
            )
        return owner

    def _create_owner(self, name: str, scope: str, session: Session, now: float) -> Owner:
        if len(session.owners) >= self.max_owners_per_session:
            raise LimitReached(
                f"owner {name!r} was not created: session {session.id} (pid {session.pid}) "
                f"has {len(session.owners)} owners, the most one session may create "
                "(owners_per_session, its detached ones included while it lives); recycle "
                "the owners it no longer needs (leaving `with client.owner(...)` does)",
                limit="owners_per_session",
                value=self.max_owners_per_session,
                owner=name,
            )
        if scope == DETACHED:
            if self.detached_owners >= self.max_detached_owners:
                raise LimitReached(
                    f"detached owner {name!r} was not created: arena {self.name!r} has "
                    f"{self.detached_owners} detached owners, the most it keeps "
                    "(detached_owners); recycle the ones nobody uses (`shmarena owners` "
                    "lists them with their age)",
                    limit="detached_owners",
                    value=self.max_detached_owners,
                    owner=name,
                )
            self.detached_owners += 1
        owner = Owner(name, scope, session.id, session.pid, now, uid=session.uid)
        self.owners[name] = owner
        self.changes.owners.add(name)
        session.owners.add(name)
        return owner

    def _undo_new_owner(self, name: str, session_id: int) -> None:
        """A refused request leaves no trace: the owner it created goes."""
        owner = self.owners.pop(name)
        self.sessions[session_id].owners.discard(name)
        if owner.scope == DETACHED:
            self.detached_owners -= 1

    def recycle(self, name: str, reason: int = words.RECYCLED) -> Freed:
        """Free every block the owner holds and forget the owner (`reason`:
        why, for the generation table: RECYCLED, or ENDED with its session)."""
        owner = self.owners.pop(name, None)
        if owner is None:
            raise UnknownOwner(
                f"no owner named {name!r} in arena {self.name!r}; "
                "`shmarena owners` lists the owners that exist",
                owner=name,
            )
        self.changes.owners.add(name)
        if owner.scope == DETACHED:
            self.detached_owners -= 1
        creator = self.sessions.get(owner.session_id)
        if creator is not None:
            creator.owners.discard(name)
        for session_id, owner_id in owner.ids.items():
            self._forget_owner_id(session_id, owner_id)
        count, freed = len(owner.blocks), owner.bytes
        why = self._leaving or (RECYCLED, "")
        for block in list(owner.blocks.values()):
            if self.gens is not None:
                # A session that ends takes every hand-out of its cache with
                # it, reported or not (a report may have died with it).
                ended = reason == words.ENDED and block.cache_session == owner.session_id
                self.gens(
                    block.offset,
                    words.any_of_session(block.cache_session) if ended else block.generation,
                    reason,
                )
            self._disown(block, owner, why=why)
        return Freed(count, freed)

    # -- blocks --------------------------------------------------------------

    def alloc(
        self,
        session_id: int,
        size: int,
        owner_name: str | None,
        detached: bool,
        now: float,
        site: str = "",
    ) -> Block:
        return self.alloc_many(session_id, [size], owner_name, detached, now, site)[0]

    def alloc_many(
        self,
        session_id: int,
        sizes: list[int],
        owner_name: str | None,
        detached: bool,
        now: float,
        site: str = "",
    ) -> list[Block]:
        """Allocate every size or none: on OutOfMemory, what was taken is given back."""
        for size in sizes:
            check_size(size)
        name = owner_name if owner_name is not None else implicit_owner(session_id)
        existed = name in self.owners
        owner = self.open_owner(name, session_id, detached and owner_name is not None, now)
        space = self.space
        try:
            self._check_quotas(session_id, owner, sizes)
        except QuotaExceeded:
            if not existed:  # a refused request leaves no trace
                self._undo_new_owner(name, session_id)
            raise
        offsets: list[int] = []
        for i, size in enumerate(sizes):
            offset = space.alloc(size)
            if (
                offset is None
                and self.growth is not None
                and self._grow(sum(map(space.carved_bytes, sizes[i:])), size)
            ):
                offset = space.alloc(size)
            if offset is None:
                for taken in offsets:
                    space.free(taken)
                if not existed:  # a refused request leaves no trace
                    self._undo_new_owner(name, session_id)
                raise self.never_fits(size) or self._out_of_memory(
                    size, sum(sizes) if len(sizes) > 1 else None
                )
            offsets.append(offset)
        if self.empty_since:  # a segment in use again is not idle
            self._busy(offsets)
        result = []
        for offset, size in zip(offsets, sizes, strict=True):
            self.generation += 1
            carved = space.allocation_bytes(offset) or 0
            block = Block(offset, size, carved, self.generation, None, site=site[:MAX_SITE])
            self.blocks[offset] = block
            self._own(block, owner)
            if self.gens is not None:
                self.gens(offset, block.generation, words.LIVE)
            result.append(block)
        return result

    def free(
        self, handles: Iterable[Handle], now: float = 0.0, session_id: int | None = None
    ) -> Freed:
        """Free blocks by handle, all or none: every handle is checked first.
        With `session_id`, a session that is not an administrator may free
        only blocks whose owner its own user created."""
        handles = list(handles)
        found = [self._find(h, for_free=True, asked="free") for h in handles]
        if len({id(b) for b, _ in found}) != len(found):
            raise lifetime_error(
                "double_free",
                f"free of {len(handles)} handles",
                "the same handle appears twice in it; nothing was freed",
            )
        if session_id is not None:
            self._check_may_free(self.sessions[session_id], [b for b, _ in found])
        blocks = self._settle_all(found, handles, now)
        freed = 0
        for block in blocks:
            owner = self.owners[block.owner] if block.owner is not None else None
            freed += block.carved
            if owner is not None:
                if self.gens is not None:
                    self.gens(block.offset, block.generation, words.FREED)
                self._disown(block, owner)
        return Freed(len(blocks), freed)

    def _check_may_free(self, session: Session, blocks: list[Block]) -> None:
        if session.admin:
            return
        for block in blocks:
            owner = self.owners.get(block.owner) if block.owner is not None else None
            if owner is not None and owner.uid != session.uid:
                raise AccessDenied(
                    f"free of block {block.offset:#x}: it is held by owner {owner.name!r} of "
                    f"uid {owner.uid}; uid {session.uid} (session {session.id}, pid "
                    f"{session.pid}) may free only its own user's blocks; nothing was freed. "
                    "Ask the daemon's user (or root) to free or recycle it",
                    owner=owner.name,
                    owner_uid=owner.uid,
                    uid=session.uid,
                )

    def retain(self, session_id: int, handles: Iterable[Handle], now: float = 0.0) -> int:
        session = self.sessions[session_id]
        handles = list(handles)
        found = [self._find(h, for_free=True, asked="retain") for h in handles]
        blocks = self._settle_all(found, handles, now)
        for block in blocks:
            if block.retainers is None:
                block.retainers = {}
            block.retainers[session_id] = block.retainers.get(session_id, 0) + 1
            session.retained.add(block.offset)
            self.changes.blocks.add(block.offset)
        return len(blocks)

    def hold(self, handles: Iterable[Handle], now: float = 0.0) -> list[Block]:
        """A reference on each block for a queued message, all or none."""
        handles = list(handles)
        found = [self._find(h, for_free=False, asked="queue put") for h in handles]
        blocks = self._settle_all(found, handles, now)
        for block in blocks:
            if block.retainers is None:
                block.retainers = {}
            block.retainers[QUEUED] = block.retainers.get(QUEUED, 0) + 1
            self.changes.blocks.add(block.offset)
        return blocks

    def pass_holds(self, session_id: int, blocks: Iterable[Block]) -> None:
        """A message's references become `session_id`'s retains (it took it)."""
        session = self.sessions[session_id]
        for block in blocks:
            assert block.retainers and block.retainers.get(QUEUED, 0) > 0
            self._drop_ref(block, QUEUED, release=False)
            block.retainers[session_id] = block.retainers.get(session_id, 0) + 1
            session.retained.add(block.offset)

    def drop_holds(self, blocks: Iterable[Block]) -> None:
        """A queued message is gone untaken (its queue was removed)."""
        for block in blocks:
            self._drop_ref(block, QUEUED)

    def _drop_ref(self, block: Block, key: int, release: bool = True) -> bool:
        """Drop one of `key`'s references on `block`; True if it was the last."""
        assert block.retainers is not None
        self.changes.blocks.add(block.offset)
        count = block.retainers[key] - 1
        if count:
            block.retainers[key] = count
            return False
        del block.retainers[key]
        if release:
            self._maybe_release(block)
        return True

    def release(self, session_id: int, handles: Iterable[Handle]) -> int:
        """Drop one of the session's retains per handle, all or none: a block
        listed n times must be retained at least n times."""
        session = self.sessions[session_id]
        handles = list(handles)
        found = [self._find(h, for_free=False, asked="release") for h in handles]
        blocks = self._settle_all(found, handles, 0.0)
        listed: dict[int, int] = {}
        for block in blocks:
            listed[block.offset] = listed.get(block.offset, 0) + 1
        for block in blocks:
            held = (block.retainers or {}).get(session_id, 0)
            if held < listed[block.offset]:
                twice = f" {listed[block.offset]} times" if listed[block.offset] > 1 else ""
                raise InvalidRequest(
                    lifetime_message(
                        "release_unretained",
                        f"release of block {block.offset:#x}{twice} by session {session_id}",
                        f"the session retains it {held} time(s)"
                        + (" (the same handle is listed twice)" if twice else "")
                        + "; nothing was released",
                    ),
                    rule="release_unretained",
                    offset=block.offset,
                    listed=listed[block.offset],
                    retained=held,
                )
        for block in blocks:
            if self._drop_ref(block, session_id):
                session.retained.discard(block.offset)
        return len(blocks)

    def lookup(self, handle: Handle, for_free: bool, now: float = 0.0) -> Block:
        """The block a handle names, or StaleHandle saying why it is not live.

        `for_free`: the block must still belong to an owner (not only be kept
        alive by readers after its owner let go).

        A handle a client cache made may arrive (from another process) before
        that client's report of it: the handle itself proves the hand-out, so
        the block is assigned here and then to the session's own owner; the
        report, when it comes, finds it done.
        """
        block, early = self._find(handle, for_free, "publish" if for_free else "use")
        if early:
            self._settle(block, handle, now)
        return block

    def _settle_all(
        self, found: list[tuple[Block, bool]], handles: list[Handle], now: float
    ) -> list[Block]:
        """After every handle of a request was found valid: apply the early
        hand-outs among them (see `lookup`), each block once even when a
        request lists it twice."""
        settled: set[int] = set()
        for (block, early), handle in zip(found, handles, strict=True):
            if early and block.offset not in settled:
                settled.add(block.offset)
                self._settle(block, handle, now)
        return [block for block, _ in found]

    def _find(self, handle: Handle, for_free: bool, asked: str = "use") -> tuple[Block, bool]:
        """`lookup` without changing anything: the block, and whether the
        handle is an early one whose hand-out must be applied first. `asked`
        names the operation for a refusal ("free", "retain", ...)."""
        if handle.epoch != self.epoch:
            raise StaleHandle(
                f"handle is from arena epoch {handle.epoch}, this daemon serves epoch "
                f"{self.epoch}: the daemon was restarted and the block no longer exists",
                handle=list(handle),
            )
        block = (
            self.blocks.get(handle.segment << SEGMENT_SHIFT | handle.offset)
            if 0 <= handle.offset <= OFFSET_MASK and 0 <= handle.segment < 1 << 22
            else None
        )
        if block is not None and self._early(block, handle):
            return block, True
        if block is not None and block.generation == handle.generation and not block.cached:
            if block.size != handle.size:  # (a cached block's size is its class's)
                raise lifetime_error(
                    "handle_altered",
                    f"{asked} of {handle.size} bytes at {_place(handle)}",
                    f"the live block there has {block.size} bytes: not a handle the daemon "
                    "gave out; nothing was done",
                    handle=list(handle),
                )
        if block is None or block.generation != handle.generation:
            raise self._gone_error(handle, asked, for_free, block)
        if block.cached or (for_free and block.owner is None):
            raise self._gone_error(handle, asked, for_free, block)
        return block, False

    def _gone_error(
        self, handle: Handle, asked: str, for_free: bool, block: Block | None
    ) -> StaleHandle:
        """Why the block `handle` names is not live (as far as the ledger
        remembers), as the rule the caller broke."""
        what = f"{asked} of the block at {_place(handle)} (generation {handle.generation})"
        memory = self.gone.get(handle.segment << SEGMENT_SHIFT | handle.offset)
        details: dict[str, object] = {"handle": list(handle), "reason": ""}
        if memory is not None and memory.generation == handle.generation:
            details.update(reason=memory.reason, owner=memory.owner, pid=memory.pid)
            if memory.reason == RECYCLED:
                found, rule = f"its owner {memory.owner!r} was recycled", "owner_recycled"
            elif memory.reason == SESSION_ENDED:
                how = _SESSION_ENDINGS.get(memory.how, f"ended ({memory.how})")
                found = (
                    f"its owner {memory.owner!r} went with its session when process "
                    f"{memory.pid} {how}"
                )
                rule = "producer_exited"
                details["ended"] = memory.how
            else:
                found, rule = f"it was freed by its owner {memory.owner!r}", "use_after_free"
        else:
            found, rule = (
                "it was freed, or its owner recycled or its process ended",
                ("use_after_free"),
            )
        if block is not None and block.generation != handle.generation and not block.cached:
            found += ", and the block has been handed out again since"
        elif block is not None and block.retainers and not block.cached:
            found += f"; it stays mapped only while {len(block.retainers)} reader(s) retain it"
        if for_free and asked == "free":
            found += "; nothing was freed"
            if rule != "owner_recycled":
                rule = "double_free"
        return lifetime_error(rule, what, found, **details)

    def _early(self, block: Block, handle: Handle) -> bool:
        """Whether `handle` is a newer hand-out of a cache block than the daemon
        has heard of: the block is in its session's cache, or its earlier
        hand-out was reported and the return (UNASSIGN) is still on the way."""
        if (
            not self._may_assign(block, handle.generation)
            or block.cache_session not in self.sessions
            or not 0 < handle.size <= block.carved
        ):
            return False
        if block.cached:
            return True
        return (
            block.owner is not None
            and not block.retainers
            and not block.pins
            and block.generation >> GEN_SHIFT == block.cache_session
        )

    def _settle(self, block: Block, handle: Handle, now: float) -> None:
        session = self.sessions[block.cache_session]
        if not block.cached:
            assert block.owner is not None
            self._disown(block, self.owners[block.owner], notify=False)
        self._assign(session, block, handle.size, handle.generation, 0, now)

    def _own(self, block: Block, owner: Owner) -> None:
        self.changes.blocks.add(block.offset)
        owner.blocks[block.offset] = block
        owner.bytes += block.carved
        self.owned_bytes += block.carved
        self.requested_bytes += block.size
        block.owner = owner.name

    def _unown(self, block: Block, owner: Owner) -> None:
        self.changes.blocks.add(block.offset)
        del owner.blocks[block.offset]
        owner.bytes -= block.carved
        self.owned_bytes -= block.carved
        self.requested_bytes -= block.size
        block.owner = None
        if self.unowned is not None:
            self.unowned(block)

    def _disown(
        self, block: Block, owner: Owner, notify: bool = True, why: tuple[str, str] = (FREED, "")
    ) -> None:
        self._remember(block, owner, why)
        self._unown(block, owner)
        self._maybe_release(block, notify)

    def _remember(self, block: Block, owner: Owner, why: tuple[str, str]) -> None:
        gone = self.gone
        gone.pop(block.offset, None)  # re-inserted: the newest is last
        gone[block.offset] = Gone(block.generation, why[0], why[1], owner.name, owner.pid)
        if len(gone) > self.max_remembered_frees:
            gone.popitem(last=False)

    def _maybe_release(self, block: Block, notify: bool = True) -> None:
        """A block nobody holds any more goes back where it came from: the
        cache of its (living) session, else the arena."""
        if block.owner is not None or block.retainers or block.pins:
            return
        session = self.sessions.get(block.cache_session) if block.cache_session else None
        if session is None:
            self.changes.blocks.add(block.offset)
            del self.blocks[block.offset]
            self.space.free(block.offset)
            return
        block.size = block.carved
        self._cache_in(session, block)
        if notify:
            session.notices += (block.offset, block.generation)
            self.changes.sessions.add(session.id)

    # -- client caches -------------------------------------------------------

    def fill(
        self,
        session_id: int,
        fills: list[int],
        mark: int,
        sizes: list[int],
        owner_name: str | None,
        detached: bool,
        now: float,
    ) -> tuple[list[list[int]], list[Block]]:
        """Refill a client cache (and allocate `sizes` directly, as alloc_many).

        `fills` is flat (class_bytes, count, need) triples: `need` blocks of each
        class are required, together with `sizes`, all or none; more, up to
        `count`, are carved if they fit. New cached blocks start at generation
        `mark`, which must lie in the session's space.
        """
        session = self.sessions[session_id]
        triples = self._check_fills(session_id, fills, mark)
        space = self.space
        taken: list[list[int]] = []
        room = None  # bytes the session may still take into its cache, None: any
        if self.session_quota:
            required = sum(c * need for c, _, need in triples)
            required += sum(space.carved_bytes(size) for size in sizes)
            held = self.session_held(session)
            if held + required > self.session_quota:
                raise self._over_session_quota(session, held, required)
            room = self.session_quota - held - required

        def give_back() -> None:
            for group in taken:
                for offset in group:
                    space.free(offset)

        for class_bytes, count, need in triples:
            offsets: list[int] = []
            taken.append(offsets)
            for _ in range(count):
                if room is not None and len(offsets) >= need:
                    if room < class_bytes:
                        break  # more would take the session over its quota
                    room -= class_bytes
                offset = space.alloc(class_bytes)
                if offset is None:
                    short = need - len(offsets)
                    if short <= 0 or self.growth is None:
                        break
                    if not self._grow(short * class_bytes, class_bytes):
                        break
                    offset = space.alloc(class_bytes)
                    if offset is None:
                        break
                offsets.append(offset)
            if len(offsets) < need:
                give_back()
                raise self._out_of_memory(class_bytes, class_bytes * need if need > 1 else None)
        try:
            direct = self.alloc_many(session_id, sizes, owner_name, detached, now) if sizes else []
        except BaseException:
            give_back()
            raise
        for (class_bytes, _, _), offsets in zip(triples, taken, strict=True):
            if self.empty_since:
                self._busy(offsets)
            for offset in offsets:
                block = Block(offset, class_bytes, class_bytes, mark, None, None, session_id)
                self.blocks[offset] = block
                self._cache_in(session, block)
        return taken, direct

    # -- quotas ----------------------------------------------------------------

    def session_held(self, session: Session) -> int:
        """Carved bytes the session holds against its quota: its cache and
        the blocks of the owners it created, detached ones included (else a
        detached owner would be a way around the quota)."""
        held = session.cached_bytes
        for name in session.owners:
            owner = self.owners.get(name)
            if owner is not None:
                held += owner.bytes
        return held

    def check_quotas(
        self, session_id: int, sizes: list[int], owner_name: str | None, detached: bool
    ) -> None:
        """Raise the QuotaExceeded that allocating `sizes` now would meet;
        change nothing (an owner that does not exist yet is not created)."""
        name = owner_name if owner_name is not None else implicit_owner(session_id)
        check_owner_name(name)
        owner = self.owners.get(name)
        if owner is None:  # a new owner has no quota of its own
            scope = DETACHED if detached and owner_name is not None else SESSION
            owner = Owner(name, scope, session_id, self.sessions[session_id].pid, 0.0)
        self._check_quotas(session_id, owner, sizes)

    def _check_quotas(self, session_id: int, owner: Owner, sizes: list[int]) -> None:
        # The session quota binds the session that created the owner, while
        # it lives (for a session-scoped owner, the caller itself).
        creator = self.sessions.get(owner.session_id)
        if not (owner.quota or (self.session_quota and creator is not None)):
            return
        carved = sum(self.space.carved_bytes(size) for size in sizes)
        if owner.quota and owner.bytes + carved > owner.quota:
            raise QuotaExceeded(
                f"alloc of {format_size(carved)} into owner {owner.name!r} refused: its quota "
                f"is {format_size(owner.quota)} and it holds {format_size(owner.bytes)}; free "
                f"or recycle some of it, or raise the quota (shmarena quota {owner.name} SIZE)",
                owner=owner.name,
                quota_bytes=owner.quota,
                held_bytes=owner.bytes,
                requested_bytes=carved,
            )
        if self.session_quota and creator is not None:
            held = self.session_held(creator)
            if held + carved > self.session_quota:
                raise self._over_session_quota(creator, held, carved)

    def _over_session_quota(self, session: Session, held: int, asked: int) -> QuotaExceeded:
        return QuotaExceeded(
            f"alloc of {format_size(asked)} refused: session {session.id} (pid {session.pid}) "
            f"holds {format_size(held)} (its cache included) of its quota of "
            f"{format_size(self.session_quota)} per session (--quota-per-session; the "
            "detached owners it created count too); free or recycle some, or have the "
            "daemon's user raise it (shmarena quota --per-session SIZE)",
            quota_bytes=self.session_quota,
            held_bytes=held,
            requested_bytes=asked,
            session=session.id,
        )

    def set_quota(self, target: str, quota: int) -> None:
        """Set an owner's quota ("" : the per-session one); 0 removes it.
        Blocks held already stay, even over the new quota."""
        if quota < 0:
            raise InvalidRequest(f"a quota is 0 (none) or a number of bytes, got {quota}")
        if target == "":
            self.session_quota = quota
            return
        owner = self.owners.get(target)
        if owner is None:
            raise UnknownOwner(
                f"no owner named {target!r} in arena {self.name!r} to set a quota on; "
                "`shmarena owners` lists the owners that exist",
                owner=target,
            )
        owner.quota = quota
        self.changes.owners.add(target)

    def _check_fills(self, session_id: int, fills: list[int], mark: int) -> list[tuple[int, ...]]:
        if len(fills) % 3 or len(fills) > 3 * MAX_FILLS:
            raise InvalidRequest(
                f"fill: fills must be (class_bytes, count, need) triples, at most {MAX_FILLS}, "
                f"got {len(fills)} integers",
                op="fill",
            )
        if mark >> GEN_SHIFT != session_id:
            raise InvalidRequest(
                f"fill: mark {mark} is not in the generation space of session {session_id}",
                op="fill",
            )
        triples = [tuple(fills[i : i + 3]) for i in range(0, len(fills), 3)]
        unit = self.space.min_block_bytes
        for class_bytes, count, need in triples:
            if (
                class_bytes <= 0
                or class_bytes % unit
                or class_bytes > self.space.size_bytes
                or not 0 <= need <= count <= 4096
            ):
                raise InvalidRequest(
                    f"fill: class of {class_bytes} bytes x {count} (need {need}) is not a "
                    f"multiple of the {unit}-byte block, or out of range",
                    op="fill",
                )
        return triples

    def owner_id(self, session_id: int, name: str) -> int:
        """The number ASSIGN events of this session use for owner `name`, which
        exists. The number is good until the owner is recycled; it is never
        given to another owner of the session."""
        session = self.sessions[session_id]
        owner_id = session.owner_id_of.get(name)
        if owner_id is not None:
            return owner_id
        owner_id = session.next_owner_id
        session.next_owner_id += 1
        session.owner_ids[owner_id], session.owner_id_of[name] = name, owner_id
        self.owners[name].ids[session_id] = owner_id
        self.changes.owner_ids.append((session_id, owner_id, name))
        return owner_id

    def _forget_owner_id(self, session_id: int, owner_id: int) -> None:
        session = self.sessions.get(session_id)
        if session is None or owner_id == 0:
            return  # the session's own owner keeps id 0 while the session lives
        name = session.owner_ids.pop(owner_id, None)
        if name is not None:
            del session.owner_id_of[name]
            self.changes.owner_ids.append((session_id, owner_id, None))

    def _owner_of_id(self, session: Session, owner_id: int) -> str:
        name = session.owner_ids.get(owner_id)
        if name is not None:
            return name
        if 0 < owner_id < session.next_owner_id:
            raise InvalidRequest(
                f"assign: owner id {owner_id} named an owner that was recycled since; "
                "open the owner again (client.owner) for a new id",
                owner_id=owner_id,
            )
        raise InvalidRequest(f"assign: unknown owner id {owner_id}", owner_id=owner_id)

    def take_notices(self, session_id: int) -> list[int]:
        session = self.sessions[session_id]
        notices, session.notices = session.notices, []
        if notices:
            self.changes.sessions.add(session_id)
        return notices

    def apply_events(
        self, session_id: int, events: list[tuple[int, ...]], now: float
    ) -> list[ShmArenaError]:
        """Apply a client's batched bookkeeping, in order. Each event stands on
        its own: one that does not fit is skipped and its refusal returned,
        the others are applied (they describe what already happened in the
        client)."""
        session = self.sessions[session_id]
        problems: list[ShmArenaError] = []
        for event in events:
            kind = event[0]
            try:
                if kind == ASSIGN:
                    self._event_assign(session, event, now)
                elif kind == UNASSIGN:
                    self._event_unassign(session, event)
                elif kind == FREE_EVENT:
                    self.free([Handle(*event[1:])], now, session_id)
                elif kind == DRAIN:
                    block = self.blocks.get(event[1])
                    if block is None or not block.cached or block.cache_session != session.id:
                        raise StaleHandle(f"drain: no block of this cache at {event[1]:#x}")
                    self._drain(session, block)
                elif kind == PIN:
                    self.pin(session, event[1], event[2])
                elif kind == UNPIN:
                    self.unpin(session, event[1], event[2])
            except (StaleHandle, InvalidRequest, AccessDenied) as error:
                problems.append(error)
        return problems

    def pin(self, session: Session, offset: int, generation: int) -> None:
        """The session's process has views of the block: keep it out of reuse
        once its owner lets go. A block of the session's own cache is taken
        out of it (the client keeps it aside). A block no longer live under
        `generation` is left alone: there is nothing to keep."""
        block = self.blocks.get(offset)
        if block is None or block.generation != generation:
            return
        if block.cached:
            if block.cache_session != session.id:
                return
            self._cache_out(session, block)
        elif block.owner is None and not block.retainers and not block.pins:
            return
        if block.pins is None:
            block.pins = {}
        block.pins[session.id] = block.pins.get(session.id, 0) + 1
        session.pinned.add(offset)
        self.changes.blocks.add(offset)

    def unpin(self, session: Session, offset: int, generation: int) -> None:
        """The last view the session's process had of the block is gone: a
        block nobody else holds goes where a released block goes (a notice
        tells its cache). An UNPIN that matches no PIN is ignored."""
        block = self.blocks.get(offset)
        if block is None or block.generation != generation or not block.pins:
            return
        count = block.pins.get(session.id, 0)
        if not count:
            return
        self.changes.blocks.add(offset)
        if count > 1:
            block.pins[session.id] = count - 1
            return
        del block.pins[session.id]
        session.pinned.discard(offset)
        self._maybe_release(block)

    def _may_assign(self, block: Block, generation: int) -> bool:
        return (
            bool(block.cache_session)
            and generation >> GEN_SHIFT == block.cache_session
            and generation > block.generation
        )

    def _event_assign(self, session: Session, event: tuple[int, ...], now: float) -> None:
        _, offset, size, generation, owner_id = event
        block = self.blocks.get(offset)
        if block is None or block.cache_session != session.id:
            raise StaleHandle(f"assign: no block of this session's cache at {offset:#x}")
        if block.cached:
            if self._may_assign(block, generation):
                if not 0 < size <= block.carved:
                    raise InvalidRequest(f"assign: size {size} does not fit block {offset:#x}")
                self._assign(session, block, size, generation, owner_id, now)
            # else: already handed out and given back through another process
            return
        if block.generation == generation and block.owner is not None:
            # Assigned already by a handle that arrived first: move it to its owner.
            wanted = session.owner_ids.get(owner_id)
            if wanted is not None:
                if wanted != block.owner:
                    self._unown(block, self.owners[block.owner])
                    self._own(block, self.open_owner(wanted, session.id, False, now))
            return
        if block.generation >= generation:
            return  # handed out and let go before this report arrived
        raise StaleHandle(f"assign: block {offset:#x} is not in this session's cache")

    def _assign(
        self, session: Session, block: Block, size: int, generation: int, owner_id: int, now: float
    ) -> None:
        owner = self.open_owner(self._owner_of_id(session, owner_id), session.id, False, now)
        self._cache_out(session, block)
        block.size = size
        block.generation = generation
        self._own(block, owner)

    def _event_unassign(self, session: Session, event: tuple[int, ...]) -> None:
        _, offset, generation = event
        block = self.blocks.get(offset)
        if (
            block is not None
            and block.cache_session == session.id
            and block.generation > generation
        ):
            return  # a handle of a newer hand-out came first and applied this (see lookup)
        if block is None or block.cache_session != session.id or block.generation != generation:
            raise StaleHandle(f"unassign: block {offset:#x} generation {generation} is not live")
        if block.cached:
            return  # it came back through another process first (recycle, free by handle)
        if block.owner is None:
            raise StaleHandle(f"unassign: block {offset:#x} was freed already")
        self._disown(block, self.owners[block.owner], notify=False)

    def _drain(self, session: Session, block: Block) -> None:
        self._cache_out(session, block)
        del self.blocks[block.offset]
        self.space.free(block.offset)

    def _cache_in(self, session: Session, block: Block) -> None:
        self.changes.blocks.add(block.offset)
        block.cached = True
        session.cached.add(block.offset)
        session.cached_bytes += block.carved

    def _cache_out(self, session: Session, block: Block) -> None:
        self.changes.blocks.add(block.offset)
        block.cached = False
        session.cached.discard(block.offset)
        session.cached_bytes -= block.carved

    @property
    def cached_bytes(self) -> int:
        """Carved bytes sitting in client caches."""
        return sum(s.cached_bytes for s in self.sessions.values())

    def _out_of_memory(self, size: int, batch_total: int | None) -> OutOfMemory:
        space = self.space
        largest = space.largest_free_bytes()
        free = space.free_bytes
        index = space.fragmentation_index(size)
        batch = f" (in a batch of {format_size(batch_total)})" if batch_total else ""
        figures = (
            f"asked {format_size(size)}{batch}, largest free block {format_size(largest)}, "
            f"free {format_size(free)} in total"
        )
        if free >= space.carved_bytes(size):
            state = "fragmented"
            figures += f" (fragmentation index {index if index is not None else 0:.2f})"
        else:
            state = "full"
        if self.cached_bytes:
            figures += f"; {format_size(self.cached_bytes)} more sit unused in client caches"
        top = sorted(self.owners.values(), key=lambda o: o.bytes, reverse=True)[:3]
        holders = ", ".join(f"{o.name} {format_size(o.bytes)}" for o in top if o.bytes)
        if holders:
            figures += f"; largest owners: {holders}"
        growth = self.growth
        if growth is not None:
            figures += (
                f"; the arena has grown to {format_size(space.size_bytes)} of its --max-size "
                f"{format_size(growth.max_bytes)}"
            )
            if growth.failures:
                figures += f" (adding a segment failed: {growth.last_failure})"
        return OutOfMemory(
            f"arena {self.name!r} is {state}: {figures}; free buffers, recycle an owner "
            "(`shmarena owners` shows who holds what) or start the daemon with a larger "
            + ("--max-size" if growth is not None else "--size"),
            requested_bytes=size,
            largest_free_bytes=largest,
            free_bytes=free,
            fragmentation_index=index,
            state=state,
            top_owners=[[o.name, o.bytes] for o in top if o.bytes],
        )

    def never_fits(self, size: int) -> OutOfMemory | None:
        """The refusal of a buffer this arena could not hold even empty (and
        grown to its --max-size, if it may grow), or None if it might fit:
        waiting for frees would not help such a request."""
        space, growth = self.space, self.growth
        if growth is not None and isinstance(space, Segmented):
            needs, can, flag = space.spaces[0].room_for(size), growth.max_bytes, "--max-size"
            what = f"it may grow to {format_size(can)} in all (--max-size)"
        else:
            needs, can, flag = space.room_for(size), space.size_bytes, "--size"
            what = f"its whole size is {format_size(can)}"
        if needs <= can:
            return None
        carved = f" (a block of {format_size(needs)})" if needs != size else ""
        largest, free = space.largest_free_bytes(), space.free_bytes
        return OutOfMemory(
            f"arena {self.name!r} can never hold this buffer: asked {format_size(size)}{carved}, "
            f"largest free block {format_size(largest)}, free {format_size(free)} in total, "
            f"and {what}; waiting for frees would not help: ask for less, split the buffer, "
            f"or start the daemon with a larger {flag}",
            requested_bytes=size,
            largest_free_bytes=largest,
            free_bytes=free,
            possible_bytes=can,
            state="too_large",
        )

    # -- growth --------------------------------------------------------------

    def _grow(self, need_bytes: int, size: int) -> bool:
        """Add a segment that can hold `need_bytes` (a request of `size` at
        least), if the cap allows and the server can make it."""
        growth, space = self.growth, self.space
        assert growth is not None and isinstance(space, Segmented)
        if len(space.spaces) >= MAX_SEGMENTS:
            return False
        need = max(space.carved_bytes(need_bytes), space.spaces[0].room_for(size))
        planned = plan_growth(space.size_bytes, need, growth.max_bytes, growth.granule)
        if planned is None:
            return False
        index = space.next_index
        if not growth.make(index, planned):
            growth.failures += 1
            return False
        growth.failures, growth.last_failure = 0, ""  # only a current failure is news
        space.add(index, planned)
        return True

    def _busy(self, addresses: list[int]) -> None:
        for addr in addresses:
            self.empty_since.pop(addr >> SEGMENT_SHIFT, None)

    def trim(self, now: float) -> list[int]:
        """The added segments that have been empty for the idle period, now
        removed from the allocator (the server then releases their memory)."""
        growth, space = self.growth, self.space
        if growth is None or not isinstance(space, Segmented) or growth.idle_s <= 0:
            return []
        released = []
        for index, part in list(space.spaces.items()):
            if index == 0 or part.live:
                self.empty_since.pop(index, None)
                continue
            since = self.empty_since.setdefault(index, now)
            if now - since >= growth.idle_s:
                space.remove(index)
                del self.empty_since[index]
                released.append(index)
        return released

    # -- reading -------------------------------------------------------------

    def retained_only(self) -> list[Block]:
        """Blocks freed by their owners that readers still retain (pinned or not)."""
        return [
            b
            for b in self.blocks.values()
            if b.owner is None and not b.cached and not (b.pins and not b.retainers)
        ]

    def pinned(self) -> list[Block]:
        """Blocks freed by their owners and kept only because a process still
        has views of them (pinned, retained by nobody)."""
        return [
            b
            for b in self.blocks.values()
            if b.owner is None and not b.cached and b.pins and not b.retainers
        ]

    def check(self) -> list[str]:
        """Every invariant between ledger and allocator; empty when healthy."""
        problems = list(self.space.check())
        live = dict(self.space.allocations())
        if set(live) != set(self.blocks):
            problems.append(
                f"ledger has {len(self.blocks)} blocks, the allocator {len(live)} allocations"
            )
        owned = 0
        for owner in self.owners.values():
            if owner.bytes != sum(b.carved for b in owner.blocks.values()):
                problems.append(f"owner {owner.name!r} byte count is off")
            for offset, block in owner.blocks.items():
                owned += block.carved
                if block.owner != owner.name or self.blocks.get(offset) is not block:
                    problems.append(f"block {offset:#x} of owner {owner.name!r} is misfiled")
        detached = sum(owner.scope == DETACHED for owner in self.owners.values())
        if detached != self.detached_owners:
            problems.append(f"{self.detached_owners} detached owners counted, {detached} exist")
        if owned != self.owned_bytes:
            problems.append(f"owned bytes {self.owned_bytes} != sum over owners {owned}")
        cached = 0
        for block in self.blocks.values():
            if live.get(block.offset) != block.carved:
                problems.append(f"block {block.offset:#x} carved size disagrees with the allocator")
            if block.cached:
                cached += block.carved
                session = self.sessions.get(block.cache_session)
                if session is None or block.offset not in session.cached:
                    problems.append(f"cached block {block.offset:#x} is in no living cache")
                if block.owner is not None or block.retainers:
                    problems.append(f"cached block {block.offset:#x} is also held")
            elif block.owner is None and not block.retainers and not block.pins:
                problems.append(f"block {block.offset:#x} has neither owner nor retainer")
            for sid in block.retainers or ():
                if sid != QUEUED and sid not in self.sessions:
                    problems.append(f"block {block.offset:#x} retained by ended session {sid}")
            for sid, count in (block.pins or {}).items():
                pinner = self.sessions.get(sid)
                if pinner is None or block.offset not in pinner.pinned or count < 1:
                    problems.append(f"block {block.offset:#x} pinned by ended session {sid}")
            if block.cached and block.pins:
                problems.append(f"cached block {block.offset:#x} is also pinned")
        if cached != self.cached_bytes:
            problems.append(
                f"cached bytes per session {self.cached_bytes} != sum over blocks {cached}"
            )
        for session in self.sessions.values():
            problems += self._check_owner_ids(session)
            for offset in session.cached:
                held = self.blocks.get(offset)
                if held is None or not held.cached or held.cache_session != session.id:
                    problems.append(f"session {session.id} caches {offset:#x} it does not hold")
            for offset in session.pinned:
                held = self.blocks.get(offset)
                if held is None or not (held.pins or {}).get(session.id):
                    problems.append(f"session {session.id} pins {offset:#x} it does not pin")
        return problems

    def _check_owner_ids(self, session: Session) -> list[str]:
        problems = []
        if {n: i for i, n in session.owner_ids.items()} != session.owner_id_of:
            problems.append(f"session {session.id}: owner ids by number and by name disagree")
        for owner_id, name in session.owner_ids.items():
            owner = self.owners.get(name)
            if owner_id >= session.next_owner_id:
                problems.append(f"session {session.id}: owner id {owner_id} not given yet")
            if owner_id and (owner is None or owner.ids.get(session.id) != owner_id):
                problems.append(f"session {session.id}: owner id {owner_id} names no owner")
        return problems


def _place(handle: Handle) -> str:
    """ "offset 0x2000", or "offset 0x2000 of segment 3" beyond segment 0."""
    where = f"offset {handle.offset:#x}"
    return where if handle.segment == 0 else f"{where} of segment {handle.segment}"


def implicit_owner(session_id: int) -> str:
    return f"{IMPLICIT_PREFIX}{session_id}"


def check_owner_name(name: str) -> None:
    if not name or len(name) > MAX_OWNER_NAME or not name.isprintable():
        raise InvalidRequest(
            f"owner name must be 1-{MAX_OWNER_NAME} printable characters, got {name!r:.60}",
            owner=name[:MAX_OWNER_NAME],
        )


def check_size(size: int) -> None:
    if size <= 0 or size > MAX_SIZE_BYTES:
        raise InvalidRequest(
            f"buffer size must be a positive number of bytes, got {size}",
            requested_bytes=size,
        )
