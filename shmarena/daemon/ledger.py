"""Who holds what: sessions, owners, blocks and their generations. Pure.

The ledger is the only writer of the buddy allocator, so the two can never
disagree: every live allocation in the buddy is exactly one `Block` here.

- A *session* is one connected client process. Blocks it allocates without
  naming an owner go to its implicit owner ``session-<id>``, made on first use.
- An *owner* is a named group of blocks. Session scope: recycled when its
  session ends, however it ends. Detached: survives its creator and is only
  recycled explicitly.
- A *block* is one allocation. Its generation (a counter bumped on every
  allocation) makes stale handles and double frees detectable.
- A *retain* is a reader's reference on a block. Freeing or recycling a
  retained block takes it away from its owner at once, but the memory goes
  back to the buddy only when the last retaining session releases it or ends.

Time comes in as ``now`` (seconds since the epoch); nothing here reads a clock.
Errors are raised as `shmarena.errors` exceptions; the service turns them into
replies.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from shmarena.config import format_size
from shmarena.errors import InvalidRequest, OutOfMemory, StaleHandle, UnknownOwner
from shmarena.protocol import MAX_OWNER_NAME, MAX_SIZE_BYTES, Handle
from shmarena.shm.buddy import Buddy

SESSION = "session"
DETACHED = "detached"
IMPLICIT_PREFIX = "session-"


@dataclass(eq=False)
class Block:
    offset: int
    size: int  # bytes the user asked for
    carved: int  # bytes the allocator holds for it (size rounded up to min block)
    generation: int
    owner: str | None  # None once freed/recycled while still retained
    retainers: dict[int, int] = field(default_factory=dict)  # session id -> count


@dataclass(eq=False)
class Owner:
    name: str
    scope: str
    session_id: int
    pid: int
    created_at: float
    blocks: dict[int, Block] = field(default_factory=dict)  # offset -> block
    bytes: int = 0


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


@dataclass(frozen=True)
class Freed:
    blocks: int
    bytes: int


class Ledger:
    def __init__(self, name: str, epoch: int, buddy: Buddy) -> None:
        self.name = name
        self.epoch = epoch
        self.buddy = buddy
        self.sessions: dict[int, Session] = {}
        self.owners: dict[str, Owner] = {}
        self.blocks: dict[int, Block] = {}  # offset -> block, live or retained-only
        self.generation = 0
        self.requested_bytes = 0  # bytes asked for by the blocks owners hold
        self.owned_bytes = 0  # carved bytes of blocks owners hold
        self._next_session = 1

    # -- sessions ------------------------------------------------------------

    def open_session(
        self, pid: int, start_ticks: int, label: str, now: float, watched: bool
    ) -> Session:
        session = Session(self._next_session, pid, start_ticks, label, now, now, watched)
        self._next_session += 1
        self.sessions[session.id] = session
        return session

    def end_session(self, session_id: int) -> Freed:
        """Recycle every session-scoped owner of the session and drop its
        retains. Detached owners it created stay."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return Freed(0, 0)
        blocks = freed = 0
        for name in sorted(session.owners):
            owner = self.owners.get(name)
            if owner is not None and owner.scope == SESSION:
                result = self.recycle(name)
                blocks += result.blocks
                freed += result.bytes
        for offset in list(session.retained):
            block = self.blocks.get(offset)
            if block is not None:
                block.retainers.pop(session_id, None)
                self._maybe_release(block)
        session.retained.clear()
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
        owner = Owner(name, scope, session.id, session.pid, now)
        self.owners[name] = owner
        session.owners.add(name)
        return owner

    def recycle(self, name: str) -> Freed:
        """Free every block the owner holds and forget the owner."""
        owner = self.owners.pop(name, None)
        if owner is None:
            raise UnknownOwner(
                f"no owner named {name!r} in arena {self.name!r}; "
                "`shmarena owners` lists the owners that exist",
                owner=name,
            )
        creator = self.sessions.get(owner.session_id)
        if creator is not None:
            creator.owners.discard(name)
        count, freed = len(owner.blocks), owner.bytes
        for block in list(owner.blocks.values()):
            self._disown(block, owner)
        return Freed(count, freed)

    # -- blocks --------------------------------------------------------------

    def alloc(
        self, session_id: int, size: int, owner_name: str | None, detached: bool, now: float
    ) -> Block:
        return self.alloc_many(session_id, [size], owner_name, detached, now)[0]

    def alloc_many(
        self,
        session_id: int,
        sizes: list[int],
        owner_name: str | None,
        detached: bool,
        now: float,
    ) -> list[Block]:
        """Allocate every size or none: on OutOfMemory, what was taken is given back."""
        for size in sizes:
            check_size(size)
        name = owner_name if owner_name is not None else implicit_owner(session_id)
        existed = name in self.owners
        owner = self.open_owner(name, session_id, detached and owner_name is not None, now)
        buddy = self.buddy
        offsets: list[int] = []
        for size in sizes:
            offset = buddy.alloc(size)
            if offset is None:
                for taken in offsets:
                    buddy.free(taken)
                if not existed:  # a refused request leaves no trace
                    del self.owners[name]
                    self.sessions[session_id].owners.discard(name)
                raise self._out_of_memory(size, sum(sizes) if len(sizes) > 1 else None)
            offsets.append(offset)
        result = []
        for offset, size in zip(offsets, sizes, strict=True):
            self.generation += 1
            carved = buddy.allocation_bytes(offset) or 0
            block = Block(offset, size, carved, self.generation, owner.name)
            self.blocks[offset] = block
            owner.blocks[offset] = block
            owner.bytes += carved
            self.owned_bytes += carved
            self.requested_bytes += size
            result.append(block)
        return result

    def free(self, handles: Iterable[Handle]) -> Freed:
        """Free blocks by handle, all or none: every handle is checked first."""
        blocks = [self.lookup(h, for_free=True) for h in handles]
        if len({id(b) for b in blocks}) != len(blocks):
            raise StaleHandle("the same handle appears twice in one free; nothing was freed")
        freed = 0
        for block in blocks:
            owner = self.owners[block.owner] if block.owner is not None else None
            freed += block.carved
            if owner is not None:
                self._disown(block, owner)
        return Freed(len(blocks), freed)

    def retain(self, session_id: int, handles: Iterable[Handle]) -> int:
        session = self.sessions[session_id]
        blocks = [self.lookup(h, for_free=True) for h in handles]
        for block in blocks:
            block.retainers[session_id] = block.retainers.get(session_id, 0) + 1
            session.retained.add(block.offset)
        return len(blocks)

    def release(self, session_id: int, handles: Iterable[Handle]) -> int:
        session = self.sessions[session_id]
        blocks = [self.lookup(h, for_free=False) for h in handles]
        for block in blocks:
            if session_id not in block.retainers:
                raise InvalidRequest(
                    f"session {session_id} releases block {block.offset:#x} "
                    "that it does not retain; nothing was released",
                    offset=block.offset,
                )
        for block in blocks:
            count = block.retainers[session_id] - 1
            if count:
                block.retainers[session_id] = count
            else:
                del block.retainers[session_id]
                session.retained.discard(block.offset)
                self._maybe_release(block)
        return len(blocks)

    def lookup(self, handle: Handle, for_free: bool) -> Block:
        """The block a handle names, or StaleHandle saying why it is not live.

        `for_free`: the block must still belong to an owner (not only be kept
        alive by readers after its owner let go).
        """
        if handle.epoch != self.epoch:
            raise StaleHandle(
                f"handle is from arena epoch {handle.epoch}, this daemon serves epoch "
                f"{self.epoch}: the daemon was restarted and the block no longer exists",
                handle=list(handle),
            )
        block = self.blocks.get(handle.offset) if handle.segment == 0 else None
        if block is None or block.generation != handle.generation or block.size != handle.size:
            raise StaleHandle(
                f"no live block at offset {handle.offset:#x} with generation "
                f"{handle.generation}: it was freed or recycled (double free or use after "
                "free)",
                handle=list(handle),
            )
        if for_free and block.owner is None:
            raise StaleHandle(
                f"block at offset {handle.offset:#x} was already freed by its owner; "
                f"it stays mapped only while {len(block.retainers)} reader(s) retain it",
                handle=list(handle),
            )
        return block

    def _disown(self, block: Block, owner: Owner) -> None:
        del owner.blocks[block.offset]
        owner.bytes -= block.carved
        self.owned_bytes -= block.carved
        self.requested_bytes -= block.size
        block.owner = None
        self._maybe_release(block)

    def _maybe_release(self, block: Block) -> None:
        if block.owner is None and not block.retainers:
            del self.blocks[block.offset]
            self.buddy.free(block.offset)

    def _out_of_memory(self, size: int, batch_total: int | None) -> OutOfMemory:
        buddy = self.buddy
        largest = buddy.largest_free_bytes()
        free = buddy.free_bytes
        index = buddy.fragmentation_index(size)
        batch = f" (in a batch of {format_size(batch_total)})" if batch_total else ""
        figures = (
            f"asked {format_size(size)}{batch}, largest free block {format_size(largest)}, "
            f"free {format_size(free)} in total"
        )
        if free >= buddy.carved_bytes(size):
            state = "fragmented"
            figures += f" (fragmentation index {index if index is not None else 0:.2f})"
        else:
            state = "full"
        top = sorted(self.owners.values(), key=lambda o: o.bytes, reverse=True)[:3]
        holders = ", ".join(f"{o.name} {format_size(o.bytes)}" for o in top if o.bytes)
        if holders:
            figures += f"; largest owners: {holders}"
        return OutOfMemory(
            f"arena {self.name!r} is {state}: {figures}; free buffers, recycle an owner "
            "(`shmarena owners` shows who holds what) or start the daemon with a larger --size",
            requested_bytes=size,
            largest_free_bytes=largest,
            free_bytes=free,
            fragmentation_index=index,
            state=state,
            top_owners=[[o.name, o.bytes] for o in top if o.bytes],
        )

    # -- reading -------------------------------------------------------------

    def retained_only(self) -> list[Block]:
        return [b for b in self.blocks.values() if b.owner is None]

    def check(self) -> list[str]:
        """Every invariant between ledger and buddy; empty when healthy."""
        problems = list(self.buddy.check())
        live = dict(self.buddy.allocations())
        if set(live) != set(self.blocks):
            problems.append(
                f"ledger has {len(self.blocks)} blocks, buddy has {len(live)} allocations"
            )
        owned = 0
        for owner in self.owners.values():
            if owner.bytes != sum(b.carved for b in owner.blocks.values()):
                problems.append(f"owner {owner.name!r} byte count is off")
            for offset, block in owner.blocks.items():
                owned += block.carved
                if block.owner != owner.name or self.blocks.get(offset) is not block:
                    problems.append(f"block {offset:#x} of owner {owner.name!r} is misfiled")
        if owned != self.owned_bytes:
            problems.append(f"owned bytes {self.owned_bytes} != sum over owners {owned}")
        for block in self.blocks.values():
            if live.get(block.offset) != block.carved:
                problems.append(f"block {block.offset:#x} carved size disagrees with buddy")
            if block.owner is None and not block.retainers:
                problems.append(f"block {block.offset:#x} has neither owner nor retainer")
            for sid in block.retainers:
                if sid not in self.sessions:
                    problems.append(f"block {block.offset:#x} retained by ended session {sid}")
        return problems


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
