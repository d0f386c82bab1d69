"""The words of the ledger's longer refusals. Pure.

An arena that is full, fragmented or too small, an owner or a session over
its quota, a session or arena at its bound on owners, an owner or block of
another user or session: each refusal says what was asked, what was found
and what to do (STYLE.md, "Errors are part of the API"), with the figures
also as details. The ledger decides that a request is refused; this module
only words it, from the ledger's records and figures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shmarena.config import format_size
from shmarena.daemon.records import Block, Owner, Session
from shmarena.errors import (
    AccessDenied,
    InvalidRequest,
    LimitReached,
    OutOfMemory,
    QuotaExceeded,
)
from shmarena.shm.segments import Segmented

if TYPE_CHECKING:
    from shmarena.daemon.ledger import Ledger


def _holders(ledger: Ledger) -> list[Owner]:
    """The three owners holding the most bytes (those holding any)."""
    top = sorted(ledger.owners.values(), key=lambda o: o.bytes, reverse=True)[:3]
    return [o for o in top if o.bytes]


def out_of_memory(ledger: Ledger, size: int, batch_total: int | None) -> OutOfMemory:
    """The refusal of `size` bytes (of `batch_total` in all) that did not fit now."""
    space = ledger.space
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
    if ledger.cached_bytes:
        figures += f"; {format_size(ledger.cached_bytes)} more sit unused in client caches"
    top = _holders(ledger)
    holders = ", ".join(f"{o.name} {format_size(o.bytes)}" for o in top)
    if holders:
        figures += f"; largest owners: {holders}"
    growth = ledger.growth
    if growth is not None:
        figures += (
            f"; the arena has grown to {format_size(space.size_bytes)} of its --max-size "
            f"{format_size(growth.max_bytes)}"
        )
        if growth.failures:
            figures += f" (adding a segment failed: {growth.last_failure})"
    return OutOfMemory(
        f"arena {ledger.name!r} is {state}: {figures}; free buffers, recycle an owner "
        "(`shmarena owners` shows who holds what) or start the daemon with a larger "
        + ("--max-size" if growth is not None else "--size"),
        requested_bytes=size,
        largest_free_bytes=largest,
        free_bytes=free,
        fragmentation_index=index,
        state=state,
        top_owners=[[o.name, o.bytes] for o in top],
    )


def never_fits(ledger: Ledger, size: int) -> OutOfMemory | None:
    """The refusal of a buffer the arena could not hold even empty (and
    grown to its --max-size, if it may grow), or None if it might fit."""
    space, growth = ledger.space, ledger.growth
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
        f"arena {ledger.name!r} can never hold this buffer: asked {format_size(size)}{carved}, "
        f"largest free block {format_size(largest)}, free {format_size(free)} in total, "
        f"and {what}; waiting for frees would not help: ask for less, split the buffer, "
        f"or start the daemon with a larger {flag}",
        requested_bytes=size,
        largest_free_bytes=largest,
        free_bytes=free,
        possible_bytes=can,
        state="too_large",
    )


def over_owner_quota(owner: Owner, carved: int) -> QuotaExceeded:
    """The refusal of `carved` more bytes into an owner at its quota."""
    return QuotaExceeded(
        f"alloc of {format_size(carved)} into owner {owner.name!r} refused: its quota "
        f"is {format_size(owner.quota)} and it holds {format_size(owner.bytes)}; free "
        f"or recycle some of it, or raise the quota (shmarena quota {owner.name} SIZE)",
        owner=owner.name,
        quota_bytes=owner.quota,
        held_bytes=owner.bytes,
        requested_bytes=carved,
    )


def over_session_quota(session: Session, quota: int, held: int, asked: int) -> QuotaExceeded:
    """The refusal of `asked` more bytes to a session holding `held` of its `quota`."""
    return QuotaExceeded(
        f"alloc of {format_size(asked)} refused: session {session.id} (pid {session.pid}) "
        f"holds {format_size(held)} (its cache included) of its quota of "
        f"{format_size(quota)} per session (--quota-per-session; the "
        "detached owners it created count too); free or recycle some, or have the "
        "daemon's user raise it (shmarena quota --per-session SIZE)",
        quota_bytes=quota,
        held_bytes=held,
        requested_bytes=asked,
        session=session.id,
    )


def too_many_owners(name: str, session: Session, bound: int) -> LimitReached:
    """The refusal of a new owner to a session that created `bound` already."""
    return LimitReached(
        f"owner {name!r} was not created: session {session.id} (pid {session.pid}) "
        f"has {len(session.owners)} owners, the most one session may create "
        "(owners_per_session, its detached ones included while it lives); recycle "
        "the owners it no longer needs (leaving `with client.owner(...)` does)",
        limit="owners_per_session",
        value=bound,
        owner=name,
    )


def too_many_detached(name: str, arena: str, held: int, bound: int) -> LimitReached:
    """The refusal of a new detached owner to an arena that keeps `bound` already."""
    return LimitReached(
        f"detached owner {name!r} was not created: arena {arena!r} has "
        f"{held} detached owners, the most it keeps "
        "(detached_owners); recycle the ones nobody uses (`shmarena owners` "
        "lists them with their age)",
        limit="detached_owners",
        value=bound,
        owner=name,
    )


def owner_of_another_user(owner: Owner, session: Session) -> AccessDenied:
    """The refusal of an owner created by another uid to a session not an administrator."""
    return AccessDenied(
        f"owner {owner.name!r} was created by uid {owner.uid}; uid {session.uid} (session "
        f"{session.id}, pid {session.pid}) may use only its own user's owners. Use an "
        "owner of your own, or ask the daemon's user (or root) to act on it",
        owner=owner.name,
        owner_uid=owner.uid,
        uid=session.uid,
    )


def owner_of_another_session(owner: Owner) -> InvalidRequest:
    """The refusal of a session-scoped owner to any session but its own."""
    return InvalidRequest(
        f"owner {owner.name!r} belongs to session {owner.session_id} (pid {owner.pid}); "
        "a session-scoped owner is used only by the process that created it; "
        "use another name, or a detached owner to share one between processes",
        owner=owner.name,
        session=owner.session_id,
        pid=owner.pid,
    )


def free_of_another_user(block: Block, owner: Owner, session: Session) -> AccessDenied:
    """The refusal of a free of another uid's block to a session not an administrator."""
    return AccessDenied(
        f"free of block {block.address:#x}: it is held by owner {owner.name!r} of "
        f"uid {owner.uid}; uid {session.uid} (session {session.id}, pid "
        f"{session.pid}) may free only its own user's blocks; nothing was freed. "
        "Ask the daemon's user (or root) to free or recycle it",
        owner=owner.name,
        owner_uid=owner.uid,
        uid=session.uid,
    )
