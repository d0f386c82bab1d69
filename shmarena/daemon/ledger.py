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

Beside it, each with one job and none importing it at run time: the records
(daemon/records.py), why a block went (gone.py), when the arena grows
(growth.py), the words of refusals for want of room (refusals.py) and the
consistency check (audit.py).

Time comes in as ``now`` (seconds since the epoch); nothing here reads a clock.
Errors are raised as `shmarena.errors` exceptions; the service turns them into
replies.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

from shmarena.daemon import growth as grower
from shmarena.daemon import refusals
from shmarena.daemon.audit import audit
from shmarena.daemon.gone import (
    FREED,
    RECYCLED,
    SESSION_ENDED,
    Gone,
    gone_error,
    place,
    remember,
)
from shmarena.daemon.growth import Growth
from shmarena.daemon.records import (
    DETACHED,
    IMPLICIT_PREFIX,
    MAX_SITE,
    QUEUED,
    SESSION,
    Block,
    Changes,
    Freed,
    Owner,
    Session,
    check_owner_name,
    check_size,
    implicit_owner,
)
from shmarena.errors import (
    AccessDenied,
    InvalidRequest,
    OutOfMemory,
    QuotaExceeded,
    ShmArenaError,
    StaleHandle,
    UnknownOwner,
    lifetime_error,
    lifetime_message,
)
from shmarena.limits import (
    MAX_DETACHED_OWNERS,
    MAX_FILLS,
    MAX_OWNERS_PER_SESSION,
    MAX_REMEMBERED_FREES,
)
from shmarena.protocol import ASSIGN, DRAIN, FREE_EVENT, GEN_SHIFT, PIN, UNASSIGN, UNPIN, Handle
from shmarena.shm import gens as words
from shmarena.shm.segments import OFFSET_MASK, SEGMENT_SHIFT, Segmented
from shmarena.shm.space import Space

# The records and rules other modules have always imported from here
# (daemon/records.py, gone.py and growth.py hold them now).
__all__ = [
    "DETACHED",
    "FREED",
    "IMPLICIT_PREFIX",
    "QUEUED",
    "RECYCLED",
    "SESSION",
    "SESSION_ENDED",
    "Block",
    "Changes",
    "Freed",
    "Gone",
    "Growth",
    "Ledger",
    "Owner",
    "Session",
    "check_owner_name",
    "check_size",
    "implicit_owner",
]


class Ledger:
    """The books of one arena: who holds which block, and the allocator's
    only writer (see the module's docstring for sessions, owners, retains,
    holds, caches and pins)."""

    def __init__(self, name: str, epoch: int, space: Space, growth: Growth | None = None) -> None:
        self.name = name
        self.epoch = epoch
        self.space = space  # the allocator of addresses: Extents, Buddy, or Segmented
        self.growth = growth if isinstance(space, Segmented) else None
        self.empty_since: dict[int, float] = {}  # added segment -> when it was seen empty
        self.sessions: dict[int, Session] = {}
        self.owners: dict[str, Owner] = {}
        self.blocks: dict[int, Block] = {}  # address -> block, live or retained-only
        self.generation = 0
        self.requested_bytes = 0  # bytes asked for by the blocks owners hold
        self.owned_bytes = 0  # carved bytes of blocks owners hold
        self.peak_bytes = 0  # the most owned_bytes was since start or a reset (usage.py)
        self._next_session = 1
        self.changes = Changes()
        self.noticed: set[int] = set()  # sessions given notices since the last look (pushes)
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

    def _mark(self, address: int, generation: int, reason: int) -> None:
        """Keep the generation table right (`gens`), if the daemon keeps one."""
        if self.gens is not None:
            self.gens(address, generation, reason)

    def limits(self) -> dict[str, int]:
        return {
            "owners_per_session": self.max_owners_per_session,
            "detached_owners": self.max_detached_owners,
            "remembered_frees": self.max_remembered_frees,
        }

    def take_changes(self) -> Changes:
        changes, self.changes = self.changes, Changes()
        return changes

    def drop_changes(self) -> None:
        """Forget what changed (no table keeps it): a new Changes only when
        something did, since the server calls this on every wake-up."""
        if self.changes:
            self.changes = Changes()

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
        for address in list(session.retained):
            block = self.blocks.get(address)
            if block is not None and block.retainers:
                block.retainers.pop(session_id, None)
                self.changes.blocks.add(address)
                self._maybe_release(block)
        session.retained.clear()
        for address in list(session.pinned):  # its process is gone or closed: so are its views
            block = self.blocks.get(address)
            if block is not None and block.pins:
                block.pins.pop(session_id, None)
                self.changes.blocks.add(address)
                self._maybe_release(block)
        session.pinned.clear()
        for address in list(session.cached):
            # a hand-out it never reported dies with it
            self._mark(address, words.any_of_session(session_id), words.ENDED)
            self._drain(session, self.blocks[address])
        for name in session.owner_id_of:  # detached owners it had ids for
            owner = self.owners.get(name)
            if owner is not None:
                owner.ids.pop(session_id, None)
        return Freed(blocks, freed)

    # -- owners --------------------------------------------------------------

    def open_owner(self, name: str, session_id: int, detached: bool, now: float) -> Owner:
        """The owner called `name`, created in `session_id` if it does not exist.

        Opening an existing owner is allowed from its own session, and for a
        detached owner from any session; the scope must match.
        """
        owner = self.owners.get(name)
        if owner is not None and not detached and owner.session_id == session_id:  # noqa: SIM102
            if owner.scope == SESSION and owner.uid == self.sessions[session_id].uid:
                return owner  # the common case: the session's own owner (checked when made)
        check_owner_name(name)
        session = self.sessions[session_id]
        scope = DETACHED if detached else SESSION
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
            raise refusals.owner_of_another_user(owner, session)
        if owner.scope == SESSION and owner.session_id != session_id:
            raise refusals.owner_of_another_session(owner)
        return owner

    def _create_owner(self, name: str, scope: str, session: Session, now: float) -> Owner:
        if len(session.owners) >= self.max_owners_per_session:
            raise refusals.too_many_owners(name, session, self.max_owners_per_session)
        if scope == DETACHED:
            if self.detached_owners >= self.max_detached_owners:
                raise refusals.too_many_detached(
                    name, self.name, self.detached_owners, self.max_detached_owners
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
            # A session that ends takes every hand-out of its cache with it,
            # reported or not (a report may have died with it).
            ended = reason == words.ENDED and block.cache_session == owner.session_id
            self._mark(
                block.address,
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
            self._check_quotas(owner, sizes)
        except QuotaExceeded:
            if not existed:  # a refused request leaves no trace
                self._undo_new_owner(name, session_id)
            raise
        addresses: list[int] = []
        for i, size in enumerate(sizes):
            address = space.alloc(size)
            if (
                address is None
                and self.growth is not None
                and self._grow(sum(map(space.carved_bytes, sizes[i:])), size)
            ):
                address = space.alloc(size)
            if address is None:
                for taken in addresses:
                    space.free(taken)
                if not existed:  # a refused request leaves no trace
                    self._undo_new_owner(name, session_id)
                raise self.never_fits(size) or self._out_of_memory(
                    size, sum(sizes) if len(sizes) > 1 else None
                )
            addresses.append(address)
        if self.empty_since:  # a segment in use again is not idle
            grower.mark_busy(self.empty_since, addresses)
        result = []
        for address, size in zip(addresses, sizes, strict=True):
            self.generation += 1
            carved = space.allocation_bytes(address) or 0
            block = Block(address, size, carved, self.generation, None, site=site[:MAX_SITE])
            self.blocks[address] = block
            self._own(block, owner)
            self._mark(address, block.generation, words.LIVE)
            result.append(block)
        return result

    def free(
        self, handles: Iterable[Handle], now: float = 0.0, session_id: int | None = None
    ) -> Freed:
        """Free blocks by handle, all or none: every handle is checked first.
        With `session_id`, a session that is not an administrator may free
        only blocks whose owner its own user created."""
        handles = list(handles)
        if len(handles) == 1:
            return self.free_one(handles[0], now, session_id)
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
                self._mark(block.address, block.generation, words.FREED)
                self._disown(block, owner)
        return Freed(len(blocks), freed)

    def free_one(self, handle: Handle, now: float = 0.0, session_id: int | None = None) -> Freed:
        """`free` of one handle (a client's FREE event, most FREE requests):
        the same checks in the same order, without the lists."""
        block, early = self._find(handle, for_free=True, asked="free")
        if session_id is not None:
            self._check_may_free(self.sessions[session_id], (block,))
        if early:
            self._settle(block, handle, now)
        if block.owner is not None:
            self._mark(block.address, block.generation, words.FREED)
            self._disown(block, self.owners[block.owner])
        return Freed(1, block.carved)

    def _check_may_free(self, session: Session, blocks: Iterable[Block]) -> None:
        if session.admin:
            return
        for block in blocks:
            owner = self.owners.get(block.owner) if block.owner is not None else None
            if owner is not None and owner.uid != session.uid:
                raise refusals.free_of_another_user(block, owner, session)

    def retain(self, session_id: int, handles: Iterable[Handle], now: float = 0.0) -> int:
        session = self.sessions[session_id]
        handles = list(handles)
        found = [self._find(h, for_free=True, asked="retain") for h in handles]
        blocks = self._settle_all(found, handles, now)
        for block in blocks:
            if block.retainers is None:
                block.retainers = {}
            block.retainers[session_id] = block.retainers.get(session_id, 0) + 1
            session.retained.add(block.address)
            self.changes.blocks.add(block.address)
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
            self.changes.blocks.add(block.address)
        return blocks

    def pass_holds(self, session_id: int, blocks: Iterable[Block]) -> None:
        """A message's references become `session_id`'s retains (it took it)."""
        session = self.sessions[session_id]
        for block in blocks:
            assert block.retainers and block.retainers.get(QUEUED, 0) > 0
            self._drop_ref(block, QUEUED, release=False)
            block.retainers[session_id] = block.retainers.get(session_id, 0) + 1
            session.retained.add(block.address)

    def drop_holds(self, blocks: Iterable[Block]) -> None:
        """A queued message is gone untaken (its queue was removed)."""
        for block in blocks:
            self._drop_ref(block, QUEUED)

    def _drop_ref(self, block: Block, key: int, release: bool = True) -> bool:
        """Drop one of `key`'s references on `block`; True if it was the last."""
        assert block.retainers is not None
        self.changes.blocks.add(block.address)
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
            listed[block.address] = listed.get(block.address, 0) + 1
        for block in blocks:
            held = (block.retainers or {}).get(session_id, 0)
            if held < listed[block.address]:
                twice = f" {listed[block.address]} times" if listed[block.address] > 1 else ""
                raise InvalidRequest(
                    lifetime_message(
                        "release_unretained",
                        f"release of block {block.address:#x}{twice} by session {session_id}",
                        f"the session retains it {held} time(s)"
                        + (" (the same handle is listed twice)" if twice else "")
                        + "; nothing was released",
                    ),
                    rule="release_unretained",
                    offset=block.address,
                    listed=listed[block.address],
                    retained=held,
                )
        for block in blocks:
            if self._drop_ref(block, session_id):
                session.retained.discard(block.address)
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
            if early and block.address not in settled:
                settled.add(block.address)
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
        if (
            block is not None
            and block.generation == handle.generation
            and not block.cached
            and block.size != handle.size  # (a cached block's size is its class's)
        ):
            raise lifetime_error(
                "handle_altered",
                f"{asked} of {handle.size} bytes at {place(handle)}",
                f"the live block there has {block.size} bytes: not a handle the daemon "
                "gave out; nothing was done",
                handle=list(handle),
            )
        if block is None or block.generation != handle.generation:
            raise gone_error(self.gone, handle, asked, for_free, block)
        if block.cached or (for_free and block.owner is None):
            raise gone_error(self.gone, handle, asked, for_free, block)
        return block, False

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
        self.changes.blocks.add(block.address)
        owner.blocks[block.address] = block
        owner.bytes += block.carved
        self.owned_bytes += block.carved
        if self.owned_bytes > self.peak_bytes:  # the one place used bytes grow: exact
            self.peak_bytes = self.owned_bytes
        self.requested_bytes += block.size
        block.owner = owner.name

    def _unown(self, block: Block, owner: Owner) -> None:
        self.changes.blocks.add(block.address)
        del owner.blocks[block.address]
        owner.bytes -= block.carved
        self.owned_bytes -= block.carved
        self.requested_bytes -= block.size
        block.owner = None
        if self.unowned is not None:
            self.unowned(block)

    def _disown(
        self, block: Block, owner: Owner, notify: bool = True, why: tuple[str, str] = (FREED, "")
    ) -> None:
        gone = Gone(block.generation, why[0], why[1], owner.name, owner.pid)
        remember(self.gone, block.address, gone, self.max_remembered_frees)
        self._unown(block, owner)
        self._maybe_release(block, notify)

    def _maybe_release(self, block: Block, notify: bool = True) -> None:
        """A block nobody holds any more goes back where it came from: the
        cache of its (living) session, else the arena."""
        if block.owner is not None or block.retainers or block.pins:
            return
        session = self.sessions.get(block.cache_session) if block.cache_session else None
        if session is None:
            self.changes.blocks.add(block.address)
            del self.blocks[block.address]
            self.space.free(block.address)
            return
        block.size = block.carved
        self._cache_in(session, block)
        if notify:
            session.notices += (block.address, block.generation)
            self.changes.sessions.add(session.id)
            self.noticed.add(session.id)

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
        room = self._cache_room(session, triples, sizes)

        def give_back() -> None:
            for group in taken:
                for address in group:
                    space.free(address)

        for class_bytes, count, need in triples:
            addresses, room = self._carve(class_bytes, count, need, room)
            taken.append(addresses)
            if len(addresses) < need:
                give_back()
                raise self._out_of_memory(class_bytes, class_bytes * need if need > 1 else None)
        try:
            direct = self.alloc_many(session_id, sizes, owner_name, detached, now) if sizes else []
        except BaseException:
            give_back()
            raise
        for (class_bytes, _, _), addresses in zip(triples, taken, strict=True):
            if self.empty_since:
                grower.mark_busy(self.empty_since, addresses)
            for address in addresses:
                block = Block(address, class_bytes, class_bytes, mark, None, None, session_id)
                self.blocks[address] = block
                self._cache_in(session, block)
        return taken, direct

    def _cache_room(
        self, session: Session, triples: list[tuple[int, ...]], sizes: list[int]
    ) -> int | None:
        """Bytes the session may take into its cache beyond what a fill needs
        (None: any); the session quota's refusal if it cannot have even that."""
        if not self.session_quota:
            return None
        required = sum(c * need for c, _, need in triples)
        required += sum(self.space.carved_bytes(size) for size in sizes)
        held = self.session_held(session)
        if held + required > self.session_quota:
            raise self._over_session_quota(session, held, required)
        return self.session_quota - held - required

    def _carve(
        self, class_bytes: int, count: int, need: int, room: int | None
    ) -> tuple[list[int], int | None]:
        """Up to `count` blocks of `class_bytes` (the arena grows for the first
        `need` only), the ones beyond `need` within `room` bytes and only while
        a quarter of the arena stays free; and the room left.

        Why the quarter: blocks carved ahead for a client cache and never used
        are drained at the first OutOfMemory, each a hole among live blocks;
        near a full arena those holes are what a large request cannot use
        (a 1 GiB arena filled with 4 KiB..4 MiB requests: 0.948 of it at the
        first failure with extras to the end, 0.974 with this)."""
        addresses: list[int] = []
        space = self.space
        reserve = space.size_bytes // 4
        for _ in range(count):
            if len(addresses) >= need:
                if space.free_bytes - class_bytes < reserve:
                    break  # the arena is filling up: only what is needed
                if room is not None:
                    if room < class_bytes:
                        break  # more would take the session over its quota
                    room -= class_bytes
            address = space.alloc(class_bytes)
            short = need - len(addresses)
            if (
                address is None
                and short > 0
                and self.growth is not None
                and self._grow(short * class_bytes, class_bytes)
            ):
                address = space.alloc(class_bytes)
            if address is None:
                break
            addresses.append(address)
        return addresses, room

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
        self._check_quotas(owner, sizes)

    def _check_quotas(self, owner: Owner, sizes: list[int]) -> None:
        # The session quota binds the session that created the owner, while
        # it lives (for a session-scoped owner, the caller itself).
        creator = self.sessions.get(owner.session_id)
        if not (owner.quota or (self.session_quota and creator is not None)):
            return
        carved = sum(self.space.carved_bytes(size) for size in sizes)
        if owner.quota and owner.bytes + carved > owner.quota:
            raise refusals.over_owner_quota(owner, carved)
        if self.session_quota and creator is not None:
            held = self.session_held(creator)
            if held + carved > self.session_quota:
                raise self._over_session_quota(creator, held, carved)

    def _over_session_quota(self, session: Session, held: int, asked: int) -> QuotaExceeded:
        return refusals.over_session_quota(session, self.session_quota, held, asked)

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
                    self.free_one(Handle(*event[1:]), now, session_id)
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

    def pin(self, session: Session, address: int, generation: int) -> None:
        """The session's process has views of the block: keep it out of reuse
        once its owner lets go. A block of the session's own cache is taken
        out of it (the client keeps it aside). A block no longer live under
        `generation` is left alone: there is nothing to keep."""
        block = self.blocks.get(address)
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
        session.pinned.add(address)
        self.changes.blocks.add(address)

    def unpin(self, session: Session, address: int, generation: int) -> None:
        """The last view the session's process had of the block is gone: a
        block nobody else holds goes where a released block goes (a notice
        tells its cache). An UNPIN that matches no PIN is ignored."""
        block = self.blocks.get(address)
        if block is None or block.generation != generation or not block.pins:
            return
        count = block.pins.get(session.id, 0)
        if not count:
            return
        self.changes.blocks.add(address)
        if count > 1:
            block.pins[session.id] = count - 1
            return
        del block.pins[session.id]
        session.pinned.discard(address)
        self._maybe_release(block)

    def _may_assign(self, block: Block, generation: int) -> bool:
        return (
            bool(block.cache_session)
            and generation >> GEN_SHIFT == block.cache_session
            and generation > block.generation
        )

    def _event_assign(self, session: Session, event: tuple[int, ...], now: float) -> None:
        _, address, size, generation, owner_id = event
        block = self.blocks.get(address)
        if block is None or block.cache_session != session.id:
            raise StaleHandle(f"assign: no block of this session's cache at {address:#x}")
        if block.cached:  # (_may_assign, inlined: its cache_session is this session's id)
            if generation >> GEN_SHIFT == session.id and generation > block.generation:
                if not 0 < size <= block.carved:
                    raise InvalidRequest(f"assign: size {size} does not fit block {address:#x}")
                self._assign(session, block, size, generation, owner_id, now)
            # else: already handed out and given back through another process
            return
        if block.generation == generation and block.owner is not None:
            # Assigned already by a handle that arrived first: move it to its owner.
            wanted = session.owner_ids.get(owner_id)
            if wanted is not None and wanted != block.owner:
                self._unown(block, self.owners[block.owner])
                self._own(block, self.open_owner(wanted, session.id, False, now))
            return
        if block.generation >= generation:
            return  # handed out and let go before this report arrived
        raise StaleHandle(f"assign: block {address:#x} is not in this session's cache")

    def _assign(
        self, session: Session, block: Block, size: int, generation: int, owner_id: int, now: float
    ) -> None:
        owner = self.open_owner(self._owner_of_id(session, owner_id), session.id, False, now)
        self._cache_out(session, block)
        block.size = size
        block.generation = generation
        self._own(block, owner)

    def _event_unassign(self, session: Session, event: tuple[int, ...]) -> None:
        _, address, generation = event
        block = self.blocks.get(address)
        if (
            block is not None
            and block.cache_session == session.id
            and block.generation > generation
        ):
            return  # a handle of a newer hand-out came first and applied this (see lookup)
        if block is None or block.cache_session != session.id or block.generation != generation:
            raise StaleHandle(f"unassign: block {address:#x} generation {generation} is not live")
        if block.cached:
            return  # it came back through another process first (recycle, free by handle)
        if block.owner is None:
            raise StaleHandle(f"unassign: block {address:#x} was freed already")
        self._disown(block, self.owners[block.owner], notify=False)

    def _drain(self, session: Session, block: Block) -> None:
        self._cache_out(session, block)
        del self.blocks[block.address]
        self.space.free(block.address)

    def _cache_in(self, session: Session, block: Block) -> None:
        self.changes.blocks.add(block.address)
        block.cached = True
        session.cached.add(block.address)
        session.cached_bytes += block.carved

    def _cache_out(self, session: Session, block: Block) -> None:
        self.changes.blocks.add(block.address)
        block.cached = False
        session.cached.discard(block.address)
        session.cached_bytes -= block.carved

    @property
    def cached_bytes(self) -> int:
        """Carved bytes sitting in client caches."""
        return sum(s.cached_bytes for s in self.sessions.values())

    def _out_of_memory(self, size: int, batch_total: int | None) -> OutOfMemory:
        return refusals.out_of_memory(self, size, batch_total)

    def never_fits(self, size: int) -> OutOfMemory | None:
        """The refusal of a buffer this arena could not hold even empty (and
        grown to its --max-size, if it may grow), or None if it might fit:
        waiting for frees would not help such a request."""
        return refusals.never_fits(self, size)

    # -- growth --------------------------------------------------------------

    def _grow(self, need_bytes: int, size: int) -> bool:
        """Add a segment that can hold `need_bytes` (a request of `size` at
        least), if the cap allows and the server can make it."""
        growth, space = self.growth, self.space
        assert growth is not None and isinstance(space, Segmented)
        return grower.grow(growth, space, need_bytes, size)

    def trim(self, now: float) -> list[int]:
        """The added segments that have been empty for the idle period, now
        removed from the allocator (the server then releases their memory)."""
        growth, space = self.growth, self.space
        if growth is None or not isinstance(space, Segmented) or growth.idle_s <= 0:
            return []
        return grower.trim(growth, space, self.empty_since, now)

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
        return audit(self)
