"""The allocation table of a persistent arena, without a daemon: what a file-backed
daemon journals (`table.snapshot` once, then a `table.delta` per group of changes),
folded back with `table.State.apply` and rebuilt with `table.build`, must be the
live ledger again: the same blocks, owners, sessions (with their owner ids and
notices), links, counters, and an allocator whose free space is laid out the same.

The live side is the real pure service (`Service.handle`) driven by several fake
clients with random requests, in the real wire format: hellos (new and resumed),
allocs, frees, owners, recycles, retains and releases, cache fills and the
one-way posts of hand-outs, returns, frees and drains, syncs, byes, process deaths
and lease expiries. Each record goes through msgpack the way the journal writes
and reads it.
"""

from __future__ import annotations

import random
import time
from typing import Any

import msgpack
import pytest

from shmarena.daemon import table
from shmarena.daemon.ledger import Ledger, Session
from shmarena.daemon.service import ALLOCATORS, ArenaInfo, Service
from shmarena.protocol import (
    ASSIGN,
    DRAIN,
    ERR,
    FREE_EVENT,
    FREE_ID_BIT,
    GEN_SHIFT,
    LATE_ERR,
    OK,
    PIN,
    PROTOCOL_VERSION,
    SEQUENCED_OPS,
    UNASSIGN,
    UNPIN,
    Op,
    decode,
    encode,
)
from shmarena.shm.buddy import Buddy
from shmarena.shm.extents import Extents
from shmarena.shm.space import Space

EPOCH = 4242
MIN = 4096
ARENA = 256 * MIN  # small, so allocations fail and the free space fragments
LEASE_S = 10.0
SEEDS = 100  # per allocator
OWNER_NAMES = ("a", "b", "d1", "d2")  # d*: detached
CLASSES = (MIN, 2 * MIN, 3 * MIN, 5 * MIN)


def roundtrip(record: dict[str, Any]) -> dict[str, Any]:
    """A record as the journal writes it and reads it back."""
    packed = msgpack.packb(record, use_bin_type=True)
    return msgpack.unpackb(packed, raw=False, strict_map_key=False)  # type: ignore[no-any-return]


# -- fake clients -------------------------------------------------------------------


class FakeClient:
    """One client process: a routing id, the request numbering of its session,
    and a rough model of its cache (good enough to send mostly valid events;
    the ones that are not get refused, which is worth exercising too)."""

    def __init__(self, world: World, number: int) -> None:
        self.world = world
        self.number = number
        self.incarnation = 0
        self.session = 0
        self._new_process()

    def _new_process(self) -> None:
        self.incarnation += 1
        self.ident = f"c{self.number}.{self.incarnation}".encode()
        # Even pids are watched by pidfd, odd ones live on a lease.
        self.pid = 1000 + 10 * self.number + self.incarnation
        self.session = 0
        self._new_session_state()

    def _new_session_state(self) -> None:
        self.rid = 0
        self.free_rid = FREE_ID_BIT
        self.token = 0
        self.gen = 0
        self.cache_free: list[int] = []  # offsets of free blocks in the cache
        self.cache_class: dict[int, int] = {}  # offset -> class bytes
        self.out: dict[int, tuple[int, int]] = {}  # offset -> (generation, size)
        self.owner_ids: list[int] = [0]
        self.retained: list[list[int]] = []
        self.last_frame: bytes | None = None

    def frame(self, op: Op, *args: Any) -> tuple[int, bytes]:
        if op in SEQUENCED_OPS:
            self.rid += 1
            rid = self.rid
        else:
            self.free_rid += 1
            rid = self.free_rid
        return rid, encode([int(op), rid, *args])

    def send_frame(self, payload: bytes) -> list[Any] | None:
        world = self.world
        world.now += world.rng.random() * 0.01
        reply = world.service.handle(self.ident, payload, world.now)
        if not reply:
            return None
        message = decode(reply)
        if message[0] != OK and len(message) > 2:
            world.refusals[message[2]] = world.refusals.get(message[2], 0) + 1
            if message[2] == "session_lost":
                self.session = 0  # the next request says hello again
        return message  # type: ignore[no-any-return]

    def request(self, op: Op, *args: Any) -> list[Any] | None:
        if not self.session:
            self.hello()
        _, payload = self.frame(op, *args)
        if op in SEQUENCED_OPS:
            self.last_frame = payload
        return self.send_frame(payload)

    def hello(self, resume: list[int] | None = None) -> None:
        if not resume:
            self._new_session_state()
        _, payload = self.frame(Op.HELLO, PROTOCOL_VERSION, self.pid, 5, "fake", resume or [])
        message = self.send_frame(payload)
        assert message is not None and message[0] == OK, message
        info = message[2]
        if resume and info["resumed"]:
            assert info["session"] == self.session
            self.world.resumes += 1
        elif resume:  # it ended meanwhile (a lease ran out): a new session
            self._new_session_state()
        self.session, self.token = info["session"], info["token"]

    def next_gen(self) -> int:
        self.gen += 1
        return (self.session << GEN_SHIFT) + self.gen

    def handle_of(self, offset: int) -> list[int]:
        gen, size = self.out[offset]
        return [EPOCH, 0, offset, size, gen]

    def take_notices(self, notices: list[int]) -> None:
        for offset in notices[::2]:
            if offset in self.out:
                del self.out[offset]
                self.cache_free.append(offset)

    # -- what one step may do ----------------------------------------------------

    def op_alloc(self) -> None:
        rng = self.world.rng
        name = rng.choice((None, *OWNER_NAMES))
        detached = name is not None and name.startswith("d")
        if rng.random() < 0.5:
            size = rng.randint(1, 12 * MIN) if rng.random() < 0.9 else rng.randint(1, ARENA // 2)
            reply = self.request(Op.ALLOC, size, name, detached)
            wires = [reply[2]] if reply and reply[0] == OK else []
        else:
            sizes = [rng.randint(1, 6 * MIN) for _ in range(rng.randint(1, 4))]
            reply = self.request(Op.ALLOC_MANY, sizes, name, detached)
            wires = reply[2] if reply and reply[0] == OK else []
        self.world.handles.extend(wires)

    def op_free(self) -> None:
        handles = self.world.pick_handles()
        if handles:
            self.request(Op.FREE, handles)

    def op_owner(self) -> None:
        name = self.world.rng.choice(OWNER_NAMES)
        reply = self.request(Op.OWNER, name, name.startswith("d"))
        if reply and reply[0] == OK:
            self.owner_ids.append(reply[2]["id"])

    def op_recycle(self) -> None:
        rng = self.world.rng
        names = [*OWNER_NAMES, f"session-{rng.randint(1, self.world.service.ledger._next_session)}"]
        reply = self.request(Op.RECYCLE, rng.choice(names))
        if reply and reply[0] == OK:
            self.take_notices(reply[3])

    def op_retain(self) -> None:
        handles = self.world.pick_handles(keep=True)
        if handles:
            reply = self.request(Op.RETAIN, handles[:1])
            if reply and reply[0] == OK:
                self.retained.append(handles[0])

    def op_release(self) -> None:
        if self.retained:
            handle = self.retained.pop(self.world.rng.randrange(len(self.retained)))
            self.request(Op.RELEASE, [handle])

    def op_fill(self) -> None:
        rng = self.world.rng
        if not self.session:
            self.hello()
        fills: list[int] = []
        for cls in rng.sample(CLASSES, rng.randint(1, 2)):
            count = rng.randint(1, 4)
            fills += [cls, count, rng.randint(0, count)]
        sizes = [rng.randint(1, 10 * MIN)] if rng.random() < 0.2 else []
        name = rng.choice((None, "a"))
        reply = self.request(Op.FILL, fills, self.next_gen(), sizes, name, False)
        if reply and reply[0] == OK:
            taken, direct, notices = reply[2], reply[3], reply[4]
            for i, offsets in enumerate(taken):
                for offset in offsets:
                    self.cache_free.append(offset)
                    self.cache_class[offset] = fills[3 * i]
            self.world.handles.extend(direct)
            self.take_notices(notices)

    def op_post(self) -> None:
        rng = self.world.rng
        if not self.session:
            self.hello()
        events: list[int] = []
        for _ in range(rng.randint(1, 5)):
            kind = rng.random()
            if kind < 0.45 and self.cache_free:
                offset = self.cache_free.pop(rng.randrange(len(self.cache_free)))
                size = rng.randint(1, self.cache_class[offset])
                gen = self.next_gen()
                self.out[offset] = (gen, size)
                owner_id = rng.choice(self.owner_ids)
                events += [ASSIGN, offset, size, gen, owner_id]
                if rng.random() < 0.5:  # its handle leaves the process
                    self.world.handles.append(self.handle_of(offset))
            elif kind < 0.65 and self.out:
                offset = rng.choice(list(self.out))
                gen, _ = self.out.pop(offset)
                self.cache_free.append(offset)
                events += [UNASSIGN, offset, gen]
            elif kind < 0.85:
                handles = self.world.pick_handles()
                if handles:
                    events += [FREE_EVENT, *handles[0]]
            elif kind < 0.92 and self.world.handles:
                # this process views a block (PIN), or stops (UNPIN)
                _, segment, offset, _, gen = rng.choice(self.world.handles)
                events += [rng.choice((PIN, PIN, UNPIN)), segment << 40 | offset, gen]
            elif self.cache_free:
                offset = self.cache_free.pop(rng.randrange(len(self.cache_free)))
                events += [DRAIN, offset]
        # An early hand-out: the handle of a cached block reaches others before
        # the report does (see Ledger.lookup).
        if self.cache_free and rng.random() < 0.2:
            offset = self.cache_free.pop(rng.randrange(len(self.cache_free)))
            self.out[offset] = (self.next_gen(), rng.randint(1, self.cache_class[offset]))
            self.world.handles.append(self.handle_of(offset))
        reply = self.request(Op.POST, events)
        assert reply is None or reply[0] == LATE_ERR, reply

    def op_sync(self) -> None:
        reply = self.request(Op.SYNC)
        if reply and reply[0] == OK:
            self.take_notices(reply[2])

    def op_repeat(self) -> None:
        """A repeat of the last numbered request (answered, not run), or a
        request with a gap in the numbering (refused with Resend)."""
        if not self.session or self.last_frame is None:
            return
        if self.world.rng.random() < 0.5:
            self.send_frame(self.last_frame)
        else:
            payload = encode([int(Op.ALLOC), self.rid + 2, MIN])
            reply = self.send_frame(payload)
            assert reply is not None and reply[0] == ERR, reply
            assert reply[2] in ("resend", "session_lost"), reply

    def op_bye(self) -> None:
        if self.session:
            self.request(Op.BYE)
            self.session = 0

    def op_die(self) -> None:
        """The process dies; its pidfd (or lease) tells the daemon."""
        if self.session:
            self.world.service.reclaim(self.session, "exited", self.world.now)
        self._new_process()

    def op_resume(self) -> None:
        """The same process reconnects from a new socket and resumes."""
        if not self.session:
            return
        self.ident += b"'"
        self.hello(resume=[self.session, self.token])

    def op_look(self) -> None:
        op = self.world.rng.choice((Op.STATS, Op.OWNERS, Op.CLIENTS, Op.CHECK, Op.PING))
        reply = self.request(op)
        assert reply is not None, op
        if reply[0] == OK and op is Op.CHECK:
            assert reply[2] == [], reply


class World:
    def __init__(self, seed: int, allocator: str) -> None:
        self.rng = random.Random(seed)
        self.now = 1000.0
        info = ArenaInfo(
            "unit", EPOCH, ARENA, MIN, "", 1, 0.0, lease_s=LEASE_S, allocator=allocator
        )
        self.service = Service(info, watch=lambda sid, pid, ticks: pid % 2 == 0)
        self.handles: list[list[int]] = []  # handed out to somebody (maybe freed since)
        self.refusals: dict[str, int] = {}  # error code -> times
        self.resumes = self.expired = 0
        self.clients = [FakeClient(self, n) for n in range(4)]
        self.steps = [
            (FakeClient.op_alloc, 14),
            (FakeClient.op_free, 8),
            (FakeClient.op_owner, 3),
            (FakeClient.op_recycle, 3),
            (FakeClient.op_retain, 3),
            (FakeClient.op_release, 3),
            (FakeClient.op_fill, 8),
            (FakeClient.op_post, 14),
            (FakeClient.op_sync, 3),
            (FakeClient.op_repeat, 2),
            (FakeClient.op_bye, 1),
            (FakeClient.op_die, 1),
            (FakeClient.op_resume, 1),
            (FakeClient.op_look, 2),
        ]
        self.weights = [w for _, w in self.steps]

    def pick_handles(self, keep: bool = False) -> list[list[int]]:
        """One or two known handles; mostly forgotten after use (a free), some
        kept so that stale handles get tried too."""
        if not self.handles:
            return []
        picked = []
        for _ in range(self.rng.choice((1, 1, 1, 2))):
            index = self.rng.randrange(len(self.handles))
            if keep or self.rng.random() < 0.15:
                picked.append(self.handles[index])
            else:
                picked.append(self.handles.pop(index))
            if not self.handles:
                break
        return picked

    def step(self) -> None:
        rng = self.rng
        if rng.random() < 0.02:  # silence: the lease timer ends unwatched sessions
            self.now += LEASE_S + 1
            self.expired += len(self.service.expire(self.now))
            return
        client = rng.choice(self.clients)
        (action,) = rng.choices([a for a, _ in self.steps], self.weights)
        action(client)


# -- comparing a live ledger with a rebuilt one ---------------------------------------


def session_picture(s: Session) -> dict[str, Any]:
    return {
        "id": s.id,
        "pid": s.pid,
        "start_ticks": s.start_ticks,
        "label": s.label,
        "since": s.since,
        "watched": s.watched,
        "owners": sorted(s.owners),
        "retained": sorted(s.retained),
        "cached": sorted(s.cached),
        "pinned": sorted(s.pinned),
        "notices": list(s.notices),
        "owner_ids": sorted(s.owner_ids.items()),
        "next_owner_id": s.next_owner_id,
        "cached_bytes": s.cached_bytes,
    }


def free_layout(space: Space) -> Any:
    """The allocator's free space exactly as it keeps it."""
    if isinstance(space, Extents):
        return sorted(space.free_start.items())
    assert isinstance(space, Buddy)
    return [sorted(members) for members in space.free_sets]


def ledger_picture(ledger: Ledger) -> dict[str, Any]:
    space = ledger.space
    blocks = {}
    for offset, block in ledger.blocks.items():
        image = table.block_image(block)
        image[5] = sorted((block.retainers or {}).items())  # None and {} mean the same
        blocks[offset] = image
    return {
        "epoch": ledger.epoch,
        "generation": ledger.generation,
        "next_session": ledger._next_session,
        "blocks": blocks,
        "owners": {
            name: [*table.owner_image(o), sorted(o.blocks), o.bytes]
            for name, o in ledger.owners.items()
        },
        "sessions": {sid: session_picture(s) for sid, s in ledger.sessions.items()},
        "owned_bytes": ledger.owned_bytes,
        "requested_bytes": ledger.requested_bytes,
        "cached_bytes": ledger.cached_bytes,
        "space": {
            "live": sorted(space.live.items()),
            "used_units": space.used_units,
            "free_blocks_by_order": space.free_blocks_by_order(),
            "largest_free_bytes": space.largest_free_bytes(),
            "free_layout": free_layout(space),
        },
    }


def assert_rebuilds(world: World, state: table.State, where: str) -> None:
    service = world.service
    live = service.ledger
    space = ALLOCATORS[service.info.allocator](ARENA, MIN)
    rebuilt, links = table.build(state, "unit", space, world.now + 1)
    assert rebuilt.check() == [], where
    expected, got = ledger_picture(live), ledger_picture(rebuilt)
    for key in expected:  # one key at a time: a readable difference
        assert got[key] == expected[key], f"{where}: {key} differs"
    assert links == service.links(), where
    # The service a restarted daemon makes of it is sound and knows every peer.
    info = service.info
    again = Service(info, watch=lambda sid, pid, ticks: False)
    again.adopt(rebuilt, links, world.now + 1)
    assert again.check() == [], where
    assert again.peers == service.peers and again.tokens == service.tokens, where
    assert again.seen == service.seen, where
    assert set(again.recovering) == set(live.sessions), where


def run_seed(seed: int, allocator: str) -> int:
    """Random batches, journaled and folded; the rebuilt table is compared with
    the live one after every record. Returns the number of records."""
    world = World(seed, allocator)
    service = world.service
    for _ in range(world.rng.randint(0, 15)):  # the state the first snapshot finds
        world.step()
    service.ledger.take_changes()  # what the start snapshot already holds
    state = table.State()
    records = 0

    def write(record: dict[str, Any]) -> None:
        nonlocal records
        state.apply(roundtrip(record))
        records += 1
        assert_rebuilds(world, state, f"seed {seed} ({allocator}), record {records}")

    write(table.snapshot(service.ledger, service.links(), {"clean": False, "mode": "batch"}))
    for _ in range(30):
        for _ in range(world.rng.randint(1, 8)):
            world.step()
        changes = service.ledger.take_changes()
        if changes:
            write(table.delta(service.ledger, service.link, changes))
        if world.rng.random() < 0.05:  # compaction: a fresh snapshot
            write(table.snapshot(service.ledger, service.links(), {"clean": False}))
    assert service.check() == []
    return records


@pytest.mark.parametrize("allocator", ["extents", "buddy"])
def test_rebuilt_table_equals_the_live_ledger(allocator: str) -> None:
    began = time.monotonic()
    records = sum(run_seed(seed, allocator) for seed in range(SEEDS))
    print(
        f"FIGURE: {allocator}: {SEEDS} seeds, {records} records folded and rebuilt "
        f"in {time.monotonic() - began:.1f} s"
    )


def test_the_random_workload_reaches_the_interesting_states() -> None:
    """The workload is only worth as much as what it reaches: cached blocks,
    retained-only blocks, pinned blocks, notices, detached owners of ended sessions, resumed
    sessions and lease expiries must all occur across the seeds."""
    seen: dict[str, int] = dict.fromkeys(
        ("cached", "retained_only", "pinned", "notices", "orphan_detached", "resumed", "expired")
        + ("oom",),
        0,
    )
    for seed in range(40):
        world = World(seed, "extents")
        for _ in range(150):
            world.step()
            ledger = world.service.ledger
            seen["cached"] += any(b.cached for b in ledger.blocks.values())
            seen["retained_only"] += bool(ledger.retained_only())
            seen["pinned"] += bool(ledger.pinned())
            seen["notices"] += any(s.notices for s in ledger.sessions.values())
            seen["orphan_detached"] += any(
                o.session_id not in ledger.sessions for o in ledger.owners.values()
            )
        seen["resumed"] += world.resumes
        seen["expired"] += world.expired
        seen["oom"] += world.refusals.get("out_of_memory", 0)
    assert all(seen.values()), seen


# -- Space.restore ----------------------------------------------------------------------


def space_picture(space: Space) -> Any:
    return (
        sorted(space.live.items()),
        space.used_units,
        space.free_blocks_by_order(),
        space.largest_free_bytes(),
        free_layout(space),
    )


BAD_TABLES = {
    "misaligned offset": [(0, MIN), (MIN + 512, MIN)],
    "misaligned size": [(0, MIN + 100)],
    "zero size": [(0, 0)],
    "negative offset": [(-MIN, MIN)],
    "past the end": [(ARENA - MIN, 2 * MIN)],
    "overlap": [(0, 3 * MIN), (2 * MIN, MIN)],
    "overlap, listed backwards": [(8 * MIN, 4 * MIN), (4 * MIN, 5 * MIN)],
    "one inside another": [(0, 16 * MIN), (4 * MIN, MIN)],
}
SAME_OFFSET_TWICE = [(4 * MIN, MIN), (4 * MIN, 2 * MIN)]


@pytest.mark.parametrize("allocator", ["extents", "buddy"])
@pytest.mark.parametrize(
    "case",
    [*BAD_TABLES, "same offset twice"],
)
def test_restore_refuses_a_bad_table_and_changes_nothing(allocator: str, case: str) -> None:
    space = ALLOCATORS[allocator](ARENA, MIN)
    rng = random.Random(7)
    offsets = [space.alloc(rng.randint(1, 9 * MIN)) for _ in range(20)]
    for offset in offsets[::3]:
        assert offset is not None
        space.free(offset)
    before = space_picture(space)
    with pytest.raises(ValueError):
        space.restore(BAD_TABLES.get(case, SAME_OFFSET_TWICE))
    assert space_picture(space) == before
    assert space.check() == []


@pytest.mark.parametrize("allocator", ["extents", "buddy"])
def test_restore_makes_exactly_the_given_allocations(allocator: str) -> None:
    """A table taken from a churned allocator, restored into a fresh one, gives
    the same allocations and the same (fully joined) free space."""
    for seed in range(50):
        rng = random.Random(seed)
        live = ALLOCATORS[allocator](ARENA, MIN)
        held: list[int] = []
        for _ in range(200):
            if held and rng.random() < 0.45:
                live.free(held.pop(rng.randrange(len(held))))
            else:
                offset = live.alloc(rng.randint(1, 12 * MIN))
                if offset is not None:
                    held.append(offset)
        fresh = ALLOCATORS[allocator](ARENA, MIN)
        fresh.restore(list(live.allocations()))
        assert fresh.check() == []
        assert space_picture(fresh) == space_picture(live), f"seed {seed}"
        # and it goes on working: free everything, the arena is one free block
        for offset in held:
            fresh.free(offset)
        assert fresh.largest_free_bytes() == ARENA and fresh.check() == []
