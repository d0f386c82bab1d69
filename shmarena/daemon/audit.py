"""The ledger's consistency check: every invariant between its records and
the allocator, as a list of problems (empty when healthy). Pure.

The tests, the `check` request and a recovering daemon run it; nothing in
the ledger's own work depends on it, so it only reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shmarena.daemon.records import DETACHED, QUEUED, Block, Session

if TYPE_CHECKING:
    from shmarena.daemon.ledger import Ledger


def audit(ledger: Ledger) -> list[str]:
    """Every invariant between ledger and allocator; empty when healthy."""
    problems = list(ledger.space.check())
    live = dict(ledger.space.allocations())
    if set(live) != set(ledger.blocks):
        problems.append(
            f"ledger has {len(ledger.blocks)} blocks, the allocator {len(live)} allocations"
        )
    problems += _owners(ledger)
    cached = 0
    for block in ledger.blocks.values():
        if live.get(block.address) != block.carved:
            problems.append(f"block {block.address:#x} carved size disagrees with the allocator")
        if block.cached:
            cached += block.carved
        problems += _block(ledger, block)
    if cached != ledger.cached_bytes:
        problems.append(
            f"cached bytes per session {ledger.cached_bytes} != sum over blocks {cached}"
        )
    for session in ledger.sessions.values():
        problems += _owner_ids(ledger, session) + _session(ledger, session)
    return problems


def _owners(ledger: Ledger) -> list[str]:
    """Each owner's blocks are filed under it and counted; so are the totals."""
    problems = []
    owned = 0
    for owner in ledger.owners.values():
        if owner.bytes != sum(b.carved for b in owner.blocks.values()):
            problems.append(f"owner {owner.name!r} byte count is off")
        for address, block in owner.blocks.items():
            owned += block.carved
            if block.owner != owner.name or ledger.blocks.get(address) is not block:
                problems.append(f"block {address:#x} of owner {owner.name!r} is misfiled")
    detached = sum(owner.scope == DETACHED for owner in ledger.owners.values())
    if detached != ledger.detached_owners:
        problems.append(f"{ledger.detached_owners} detached owners counted, {detached} exist")
    if owned != ledger.owned_bytes:
        problems.append(f"owned bytes {ledger.owned_bytes} != sum over owners {owned}")
    return problems


def _block(ledger: Ledger, block: Block) -> list[str]:
    """A block is held by something alive, and by one thing when cached."""
    problems = []
    at = f"{block.address:#x}"
    if block.cached:
        session = ledger.sessions.get(block.cache_session)
        if session is None or block.address not in session.cached:
            problems.append(f"cached block {at} is in no living cache")
        if block.owner is not None or block.retainers:
            problems.append(f"cached block {at} is also held")
    elif block.owner is None and not block.retainers and not block.pins:
        problems.append(f"block {at} has neither owner nor retainer")
    problems += [
        f"block {at} retained by ended session {sid}"
        for sid in block.retainers or ()
        if sid != QUEUED and sid not in ledger.sessions
    ]
    for sid, count in (block.pins or {}).items():
        pinner = ledger.sessions.get(sid)
        if pinner is None or block.address not in pinner.pinned or count < 1:
            problems.append(f"block {at} pinned by ended session {sid}")
    if block.cached and block.pins:
        problems.append(f"cached block {at} is also pinned")
    return problems


def _session(ledger: Ledger, session: Session) -> list[str]:
    """What a session says it caches and pins, the blocks say too."""
    problems = []
    for address in session.cached:
        held = ledger.blocks.get(address)
        if held is None or not held.cached or held.cache_session != session.id:
            problems.append(f"session {session.id} caches {address:#x} it does not hold")
    for address in session.pinned:
        held = ledger.blocks.get(address)
        if held is None or not (held.pins or {}).get(session.id):
            problems.append(f"session {session.id} pins {address:#x} it does not pin")
    return problems


def _owner_ids(ledger: Ledger, session: Session) -> list[str]:
    """A session's owner ids agree both ways and with the owners."""
    problems = []
    if {n: i for i, n in session.owner_ids.items()} != session.owner_id_of:
        problems.append(f"session {session.id}: owner ids by number and by name disagree")
    for owner_id, name in session.owner_ids.items():
        owner = ledger.owners.get(name)
        if owner_id >= session.next_owner_id:
            problems.append(f"session {session.id}: owner id {owner_id} not given yet")
        if owner_id and (owner is None or owner.ids.get(session.id) != owner_id):
            problems.append(f"session {session.id}: owner id {owner_id} names no owner")
    return problems
