"""The allocation table of a persistent arena as records, and back. Pure.

A file-backed daemon writes its state to a journal (`shmarena.shm.journal`)
as msgpack records of three kinds:

- ``snap``: everything (every block, owner and session) at one moment; a
  journal file starts with one;
- ``delta``: after each group of changes, the current *image* of every block,
  owner and session that changed (or its key alone when it is gone), and
  owner ids given (``[session, id, name]``) or gone with their owner
  (``[session, id, None]``). Replaying images in order is idempotent: the
  last one wins;
- ``open``: a daemon that keeps nothing on the way (durability ``none``)
  started; only a later ``snap`` with ``clean`` makes the table valid again.

`State` folds records into plain dicts of images; `build` turns a state into a
ledger (with its allocator) plus what the service keeps per session; `inspect`
checks a state the way a daemon would before trusting it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shmarena.daemon.ledger import DETACHED, Block, Changes, Ledger, Owner, Session
from shmarena.shm.space import Space

SNAP, DELTA, OPEN = "snap", "delta", "open"

# The per-session state the service keeps and a resumed session needs.
# token: secret for `hello resume`; peer: the client socket's routing id;
# seen: highest request id applied; reply: (request id, frame) of the last
# mutating request, so a repeat of it after a restart is answered, not re-run;
# kept: (request id, deadline) of the requests kept waiting (they changed
# nothing yet), so a repeat of one after a restart waits again.


@dataclass
class Link:
    """What the service keeps per session besides the ledger (see above): saved
    with the session so that a restarted daemon can resume it."""

    token: int = 0
    peer: bytes = b""
    seen: int = 0
    reply: tuple[int, bytes] | None = None
    kept: list[tuple[int, float]] = field(default_factory=list)


# -- images ---------------------------------------------------------------------


def block_image(b: Block) -> list[Any]:
    retainers = [x for pair in b.retainers.items() for x in pair] if b.retainers else None
    image = [b.address, b.size, b.carved, b.generation, b.owner, retainers]
    image += [b.cache_session, b.cached]
    if b.pins:  # a ninth field, only when pinned: older tables have eight
        image.append([x for pair in b.pins.items() for x in pair])
    return image


def owner_image(o: Owner) -> list[Any]:
    return [o.name, o.scope, o.session_id, o.pid, o.created_at, o.uid]


def session_image(s: Session, link: Link) -> list[Any]:
    reply = list(link.reply) if link.reply else None
    return [
        s.id, s.pid, s.start_ticks, s.label, s.since, s.watched,
        link.token, link.peer, link.seen, reply, list(s.notices),
        [list(entry) for entry in link.kept], s.uid, s.gid,
    ]  # fmt: skip


def snapshot(ledger: Ledger, links: dict[int, Link], extra: dict[str, Any]) -> dict[str, Any]:
    """A ``snap`` record of the whole ledger."""
    return {
        "k": SNAP,
        "epoch": ledger.epoch,
        "gen": ledger.generation,
        "next": ledger._next_session,
        "b": [block_image(b) for b in ledger.blocks.values()],
        "o": [owner_image(o) for o in ledger.owners.values()],
        "s": [session_image(s, links.get(s.id) or Link()) for s in ledger.sessions.values()],
        "i": [entry for s in ledger.sessions.values() for entry in owner_id_entries(s)],
        **extra,
    }


def owner_id_entries(s: Session) -> list[list[Any]]:
    """A session's live owner ids, and the last id given if it is gone: ids
    are never given twice, so the next one must survive a restart."""
    entries: list[list[Any]] = [[s.id, i, name] for i, name in s.owner_ids.items()]
    if s.next_owner_id - 1 not in s.owner_ids:
        entries.append([s.id, s.next_owner_id - 1, None])
    return entries


def delta(ledger: Ledger, link: Callable[[int], Link], changes: Changes) -> dict[str, Any]:
    """A ``delta`` record: the images of what `changes` names, as it is now."""
    blocks, owners, sessions = ledger.blocks, ledger.owners, ledger.sessions
    return {
        "k": DELTA,
        "gen": ledger.generation,
        "next": ledger._next_session,
        "b": [block_image(blocks[k]) if k in blocks else [k] for k in sorted(changes.blocks)],
        "o": [owner_image(owners[k]) if k in owners else [k] for k in sorted(changes.owners)],
        "s": [
            session_image(sessions[k], link(k)) if k in sessions else [k]
            for k in sorted(changes.sessions)
        ],
        "i": [list(entry) for entry in changes.owner_ids if entry[0] in sessions],
    }


# -- folding records --------------------------------------------------------------


@dataclass
class State:
    """The table as images, after folding records in order."""

    epoch: int = 0
    generation: int = 0
    next_session: int = 1
    blocks: dict[int, list[Any]] = field(default_factory=dict)
    owners: dict[str, list[Any]] = field(default_factory=dict)
    sessions: dict[int, list[Any]] = field(default_factory=dict)
    owner_ids: dict[int, dict[int, str]] = field(default_factory=dict)
    next_owner_ids: dict[int, int] = field(default_factory=dict)  # session -> next id
    valid: bool = False  # a snapshot was read and no `open` of a lossy run since
    clean: bool = False  # the last snapshot was written by a clean stop
    mode: str = ""  # durability of the run that wrote the last records
    records: int = 0
    snapshots: int = 0
    commit: int = 0  # "n" of the last record (0: format 1, which had none)

    def apply(self, record: dict[str, Any]) -> None:
        """Fold one record in. ValueError for one that is not a table record."""
        if not isinstance(record, dict):
            raise ValueError(f"not a table record: {type(record).__name__}")
        kind = record.get("k")
        self.records += 1
        self.commit = int(record.get("n", self.commit))
        if kind == SNAP:
            self.epoch = int(record["epoch"])
            self.blocks, self.owners, self.sessions, self.owner_ids = {}, {}, {}, {}
            self.next_owner_ids = {}
            self.valid = True
            self.snapshots += 1
            self.clean = bool(record.get("clean", False))
            self.mode = str(record.get("mode", ""))
        elif kind == DELTA:
            if not self.valid:
                raise ValueError("a delta record before any snapshot")
            self.clean = False
        elif kind == OPEN:
            self.mode = str(record.get("mode", ""))
            self.clean = False
            if self.mode == "none":
                self.valid = False
            return
        else:
            raise ValueError(f"unknown table record kind {kind!r}")
        self._fold_images(record)

    def _fold_images(self, record: dict[str, Any]) -> None:
        """The images of a snapshot or delta: a one-item image is a removal."""
        self.generation = int(record["gen"])
        self.next_session = int(record["next"])
        for image in record["b"]:
            if len(image) == 1:
                self.blocks.pop(image[0], None)
            else:
                self.blocks[image[0]] = image
        for image in record["o"]:
            if len(image) == 1:
                self.owners.pop(image[0], None)
            else:
                self.owners[image[0]] = image
        for image in record["s"]:
            if len(image) == 1:
                self.sessions.pop(image[0], None)
                self.owner_ids.pop(image[0], None)
                self.next_owner_ids.pop(image[0], None)
            else:
                self.sessions[image[0]] = image
        for session_id, index, name in record["i"]:
            if session_id in self.sessions:
                ids = self.owner_ids.setdefault(session_id, {})
                if name is None:
                    ids.pop(index, None)
                else:
                    ids[index] = name
                nexts = self.next_owner_ids
                nexts[session_id] = max(nexts.get(session_id, 1), index + 1)


# -- building a ledger -------------------------------------------------------------


def build(state: State, name: str, space: Space, now: float) -> tuple[Ledger, dict[int, Link]]:
    """The ledger a state describes, with `space` restored to its blocks, and
    the service's per-session links. ValueError when the images do not fit
    together (the caller refuses the file); run `Ledger.check` after."""
    ledger = Ledger(name, state.epoch, space)
    space.restore((image[0], image[2]) for image in state.blocks.values())
    ledger.generation = state.generation
    ledger._next_session = state.next_session
    links = _build_sessions(state, ledger, now)
    _build_owners(state, ledger)
    for image in state.blocks.values():
        _build_block(image, ledger)
    ledger.take_changes()
    return ledger, links


def _build_sessions(state: State, ledger: Ledger, now: float) -> dict[int, Link]:
    links: dict[int, Link] = {}
    for image in state.sessions.values():
        # Table format 1 had no kept requests: 11 items.
        sid, pid, ticks, label, since, watched, token, peer, seen, reply, notices = image[:11]
        kept = [(int(rid), float(deadline)) for rid, deadline in image[11]] if image[11:] else []
        session = Session(sid, pid, ticks, label, since, now, bool(watched))
        # Tables written before 0.9 do not say who: such a session is no
        # administrator (the service decides it again from the uid, adopt).
        session.uid, session.gid = image[12:14] if len(image) >= 14 else (-1, -1)
        session.notices = list(notices)
        ids = state.owner_ids.get(sid, {})
        if 0 not in ids:
            raise ValueError(f"session {sid} has no owner ids")
        session.owner_ids = dict(ids)
        session.next_owner_id = state.next_owner_ids.get(sid, max(ids) + 1)
        ledger.sessions[sid] = session
        links[sid] = Link(
            token, bytes(peer), seen, (reply[0], bytes(reply[1])) if reply else None, kept
        )
    return links


def _build_owners(state: State, ledger: Ledger) -> None:
    for image in state.owners.values():
        oname, scope, sid, pid, created = image[:5]
        uid = image[5] if len(image) > 5 else -1
        ledger.owners[oname] = Owner(oname, scope, sid, pid, created, uid=uid)
        ledger.detached_owners += scope == DETACHED
        if sid in ledger.sessions:
            ledger.sessions[sid].owners.add(oname)
    for session in ledger.sessions.values():
        for owner_id, oname in list(session.owner_ids.items()):
            owner = ledger.owners.get(oname)
            if owner is not None and owner_id:
                owner.ids[session.id] = owner_id
            elif owner_id:  # went with its owner in a change the table did not keep
                del session.owner_ids[owner_id]
        session.owner_id_of = {n: i for i, n in session.owner_ids.items()}


def _build_block(image: list[Any], ledger: Ledger) -> None:
    address, size, carved, gen, oname, flat, cache_session, cached = image[:8]
    retainers = dict(zip(flat[::2], flat[1::2], strict=True)) if flat else None
    block = Block(address, size, carved, gen, oname, retainers, cache_session, bool(cached))
    pins = image[8] if len(image) > 8 else None
    if pins:
        block.pins = dict(zip(pins[::2], pins[1::2], strict=True))
        for sid in block.pins:
            if sid in ledger.sessions:
                ledger.sessions[sid].pinned.add(address)
    ledger.blocks[address] = block
    if oname is not None:
        owner = ledger.owners.get(oname)
        if owner is None:
            raise ValueError(f"block {address:#x} names owner {oname!r}, which is not there")
        owner.blocks[address] = block
        owner.bytes += carved
        ledger.owned_bytes += carved
        ledger.requested_bytes += size
    for sid in retainers or ():
        if sid in ledger.sessions:
            ledger.sessions[sid].retained.add(address)
    if cached:
        holder = ledger.sessions.get(cache_session)
        if holder is None:
            raise ValueError(f"cached block {address:#x} belongs to no session")
        holder.cached.add(address)
        holder.cached_bytes += carved


def inspect(
    state: State, name: str, new_space: Callable[[], Space], now: float
) -> tuple[Ledger | None, list[str]]:
    """Build and check: the ledger (None if it could not be built) and every
    problem found."""
    try:
        ledger, _ = build(state, name, new_space(), now)
    except (ValueError, TypeError, KeyError) as error:
        return None, [f"the table does not describe a valid arena: {error}"]
    return ledger, ledger.check()
