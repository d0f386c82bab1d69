"""Handlers of owners and sessions' listings: OWNER, RECYCLE, QUOTA,
OWNERS, CLIENTS. Pure."""

from __future__ import annotations

from typing import Any

from shmarena.daemon.handlers.base import Call, Result
from shmarena.daemon.handlers.paging import bad_cursor, page, paged
from shmarena.daemon.ledger import DETACHED
from shmarena.errors import InvalidRequest


def _sites(blocks: Any) -> list[dict[str, Any]]:
    """An owner's labelled blocks by allocation site, most bytes first (at
    most 5): where a leak was allocated."""
    found: dict[str, list[int]] = {}
    for block in blocks:
        if block.site:
            entry = found.setdefault(block.site, [0, 0])
            entry[0] += 1
            entry[1] += block.carved
    rows: list[dict[str, Any]] = [
        {"site": k, "blocks": v[0], "bytes": v[1]} for k, v in found.items()
    ]
    rows.sort(key=lambda r: (-r["bytes"], r["site"]))
    return rows[:5]


def _owner_key(owner: Any) -> tuple[bool, int, str]:
    """Where an owner comes in OWNERS: detached first, most bytes, name."""
    return (owner.scope != DETACHED, -owner.bytes, owner.name)


def _parse_owner_cursor(cursor: str) -> tuple[bool, int, str]:
    scope, _, rest = cursor.partition(" ")
    held, _, name = rest.partition(" ")
    if scope not in ("0", "1") or not (held.isascii() and held.isdigit()) or not name:
        raise bad_cursor("owners", cursor)
    return (scope == "1", -int(held), name)


def owner_row(c: Call, owner: Any) -> dict[str, Any]:
    """One owner as OWNERS lists it."""
    return {
        "name": owner.name,
        "scope": owner.scope,
        "session": owner.session_id,
        "pid": owner.pid,
        "uid": owner.uid,
        "alive": owner.session_id in c.svc.ledger.sessions,
        "blocks": len(owner.blocks),
        "bytes": owner.bytes,
        "quota": owner.quota,
        "age_s": round(c.now - owner.created_at, 3),
        "sites": _sites(owner.blocks.values()),
    }


def owners(c: Call) -> Result:
    """OWNERS: a page of owners, in the listing order or by bytes held."""
    cursor, _, order = c.args
    ledger = c.svc.ledger
    if order == "bytes":  # the biggest holders, one page in one pass: what `top` shows
        if cursor:
            raise InvalidRequest(
                "owners: order 'bytes' answers one page, the owners holding most bytes, "
                f"and takes no cursor (got {cursor!r:.40}); page through the listing "
                "order ('') for every owner",
                op="owners",
            )
        biggest = (((-o.bytes, o.name), o) for o in ledger.owners.values())
        chosen, _ = page(c, biggest, None)
        return paged(c, [owner_row(c, o) for o in chosen], None)
    if order:
        raise InvalidRequest(
            f"owners: order must be '' (the listing order) or 'bytes', got {order!r:.40}",
            op="owners",
        )
    keyed = ((_owner_key(o), o) for o in ledger.owners.values())
    chosen, more = page(c, keyed, _parse_owner_cursor(cursor) if cursor else None)
    rows = [owner_row(c, o) for o in chosen]
    next_cursor = None if more is None else f"{int(more[0])} {-more[1]} {more[2]}"
    return paged(c, rows, next_cursor)


def _client_row(c: Call, session: Any) -> dict[str, Any]:
    ledger = c.svc.ledger
    held = [ledger.owners[n] for n in session.owners if n in ledger.owners]
    pinned = [ledger.blocks[o] for o in session.pinned if o in ledger.blocks]
    pinned = [b for b in pinned if b.owner is None]  # let go by their owners
    return {
        "session": session.id,
        "pid": session.pid,
        "uid": session.uid,
        "label": session.label,
        "since": session.since,
        "age_s": round(c.now - session.since, 3),
        "watch": "pidfd" if session.watched else "lease",
        "owners": len(held),
        "blocks": sum(len(o.blocks) for o in held),
        "bytes": sum(o.bytes for o in held),
        "retained": len(session.retained),
        "owner_ids": len(session.owner_ids),
        "cached_blocks": len(session.cached),
        "cached_bytes": session.cached_bytes,
        "pinned_blocks": len(pinned),
        "pinned_bytes": sum(b.carved for b in pinned),
        "waiting_requests": c.svc.kept_requests(session.id),
    }


def clients(c: Call) -> Result:
    """CLIENTS: a page of sessions, by session id."""
    cursor = c.args[0]
    if cursor and not (cursor.isascii() and cursor.isdigit()):
        raise bad_cursor("clients", cursor)
    keyed = ((s.id, s) for s in c.svc.ledger.sessions.values())
    sessions, more = page(c, keyed, int(cursor) if cursor else None)
    rows = [_client_row(c, session) for session in sessions]
    return paged(c, rows, None if more is None else str(more))


def owner(c: Call) -> Result:
    """OWNER: open (or find) an owner; its row and its id for this session."""
    name, detached, quota = c.args
    svc = c.svc
    if quota < -1:
        raise InvalidRequest(
            f"owner {name!r}: quota must be -1 (unchanged), 0 (none) or bytes, got {quota}"
        )
    existing = svc.ledger.owners.get(name)
    if quota >= 0 and quota != (existing.quota if existing is not None else 0):
        svc.require_admin(c.session, "owner", f"set the quota of owner {name!r}")
    opened = svc.ledger.open_owner(name, c.session, detached, c.now)
    if quota >= 0:
        svc.ledger.set_quota(name, quota)
    row = owner_row(c, opened)
    row["id"] = svc.ledger.owner_id(c.session, name)
    return (row,)


def recycle(c: Call) -> Result:
    """RECYCLE: free everything an owner holds; (blocks, bytes) and notices."""
    svc = c.svc
    found = svc.ledger.owners.get(c.args[0])
    if found is not None:
        svc.require_owner_access(c.session, found, "recycle")
    freed = svc.ledger.recycle(c.args[0])
    svc.counters.recycles += 1
    return ([freed.blocks, freed.bytes], svc.ledger.take_notices(c.session))


def quota(c: Call) -> Result:
    """QUOTA: set the per-session quota ("") or an owner's (administrators)."""
    target, limit = c.args
    what = "the per-session quota" if target == "" else f"the quota of owner {target!r}"
    c.svc.require_admin(c.session, "quota", f"set {what}")
    c.svc.ledger.set_quota(target, limit)
    return ([target, limit],)
