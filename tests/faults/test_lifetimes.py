"""Lifetimes across two client processes, as a hypothesis state machine.

Two real clients on one real daemon (a small arena): this test process drives
one, a second process (multiprocessing spawn) drives the other over a pipe.
The steps interleave alloc (cached sizes and daemon sizes, into the session or
a named owner), views of a buffer (its whole view, a slice of it, an ndarray),
free, recycle of an owner, attach of a handle from the other process (live or
stale, plain or retained), writes through views (live or stale) and drops of
views. After every step:

(a) no two live allocations (of either process) share a byte;
(b) every live allocation still holds exactly its own fill byte: a write
    through a stale view (of a block freed or recycled since, or an attach of
    a handle that was stale already) may raise the documented error or land in
    a block nobody else has (pinned, retained), never in a live allocation.

"Live" means allocated and not freed or recycled yet. The one write the rules
never make is through a *plain* attach whose block was freed after the attach:
that is the documented race (`attach(retain=True)` closes it), not a bug.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import shmarena
from tests.conftest import Daemon

ARENA = "32M"
CACHED_SIZES = [4096, 12288, 16000, 65536]  # below the cache's limit (512 KiB here)
DAEMON_SIZES = [1 << 20, (2 << 20) + 4096, 4 << 20]  # above it: the daemon carves them
# None: the session's own. Session-scoped owners are per process: each side
# adds its number to the name (side 1's "batch-a-1").
OWNERS = (None, "batch-a", "batch-b")
POISON = 0xFF  # what stale writes write; no allocation's fill byte
REPLY_S = 60.0
# The errors a use of a stale Buffer, view or handle may raise (the documented ones).
REFUSALS = (shmarena.StaleHandle, ValueError)


def fill_of(key: int) -> int:
    return 1 + key % 250  # never POISON, never 0 (fresh memory)


# -- one side: a client and what it holds; runs in either process ------------


class Side:
    """One process's client, its Buffers (by key) and views (by key). Every
    method takes and returns plain values, so the test process calls its own
    Side directly and the other one's through a pipe."""

    def __init__(self) -> None:
        self.client: shmarena.Client | None = None
        self.bufs: dict[int, shmarena.Buffer] = {}
        # view key -> (kind, object, attached Buffer or None)
        self.views: dict[int, tuple[str, Any, shmarena.Buffer | None]] = {}
        self.owners: dict[str, shmarena.Owner] = {}

    def reset(self, name: str, run_dir: str) -> None:
        self.close()
        self.client = shmarena.connect(name, runtime_dir=run_dir)

    def close(self) -> None:
        for kind, _, attached in self.views.values():
            if kind == "retained" and attached is not None and attached.retained:
                with contextlib.suppress(shmarena.ShmArenaError):  # its session is going anyway
                    attached.release()
        self.views.clear()
        self.bufs.clear()
        self.owners.clear()
        if self.client is not None:
            self.client.close()
            self.client = None

    def _client(self) -> shmarena.Client:
        assert self.client is not None
        return self.client

    def alloc(self, key: int, size: int, owner: str | None) -> tuple[int, int, int] | None:
        client = self._client()
        try:
            if owner is None:
                buf = client.alloc(size)
            else:
                if owner not in self.owners:
                    self.owners[owner] = client.owner(owner)
                buf = self.owners[owner].alloc(size)
        except shmarena.OutOfMemory:
            return None
        buf.view[:] = bytes([fill_of(key)]) * size
        self.bufs[key] = buf
        return (buf.segment, buf.offset, buf.size)

    def handle(self, key: int) -> tuple[int, ...]:
        return tuple(self.bufs[key].handle)

    def free(self, key: int, through_client: bool) -> None:
        buf = self.bufs[key]
        if through_client:
            self._client().free(buf)
        else:
            buf.free()

    def recycle(self, owner: str) -> bool:
        try:
            self._client().recycle(owner)
        except shmarena.UnknownOwner:
            return False
        return True

    def view(self, vkey: int, key: int, kind: str) -> None:
        buf = self.bufs[key]
        if kind == "view":
            obj: Any = buf.view
        elif kind == "slice":
            obj = buf.view[buf.size // 4 : buf.size // 2 + 1]
        else:
            obj = buf.ndarray(dtype="uint8")
        self.views[vkey] = (kind, obj, None)

    def attach(self, vkey: int, handle: tuple[int, ...], retain: bool) -> str:
        """ "ok", or the refusal's text (StaleHandle only)."""
        try:
            buf = self._client().attach(shmarena.Handle(*handle), retain=retain)
        except shmarena.StaleHandle as error:
            return f"refused: {error}"
        self.views[vkey] = ("retained" if retain else "attached", buf.view, buf)
        return "ok"

    def write(self, vkey: int, byte: int) -> str:
        kind, obj, _ = self.views[vkey]
        try:
            if kind == "ndarray":
                obj[...] = byte
            else:
                obj[:] = bytes([byte]) * len(obj)
        except REFUSALS as error:
            return f"refused: {type(error).__name__}: {error}"
        return "wrote"

    def use_freed_buffer(self, key: int, what: str) -> str:
        """Use a Buffer after its free: its own view, a new ndarray, its handle."""
        buf = self.bufs[key]
        try:
            if what == "view":
                buf.view[:] = bytes([POISON]) * buf.size
            elif what == "ndarray":
                buf.ndarray(dtype="uint8")[...] = POISON
            else:
                buf.handle  # noqa: B018 - reading it is the misuse
        except REFUSALS as error:
            return f"refused: {type(error).__name__}: {error}"
        return "used"

    def drop(self, vkey: int) -> None:
        kind, _, attached = self.views.pop(vkey)
        if kind == "retained" and attached is not None:
            attached.release()

    def check(self, expected: dict[int, int]) -> list[str]:
        """Every live Buffer of this side holds exactly its fill byte. First
        `sync()`: a refusal of a one-way free or hand-out is raised by the step
        that caused it."""
        self._client().sync()
        problems = []
        for key, byte in expected.items():
            buf = self.bufs[key]
            data = np.frombuffer(buf.view, dtype=np.uint8)
            bad = np.flatnonzero(data != byte)
            if bad.size:
                first = int(bad[0])
                problems.append(
                    f"allocation {key} ({buf!r}) should hold {byte:#x} everywhere; "
                    f"{bad.size} bytes differ, the first at +{first}: {int(data[first]):#x}"
                )
            del data
        return problems


def _serve(conn: Connection) -> None:
    """The second process: run the test's calls on a Side of its own."""
    side = Side()
    try:
        while True:
            message = conn.recv()
            if message is None:
                break
            method, args = message
            try:
                conn.send(("ok", getattr(side, method)(*args)))
            except BaseException:
                conn.send(("error", traceback.format_exc()))
    finally:
        side.close()
        conn.close()


class Remote:
    """The other process's Side, called through its pipe."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def __getattr__(self, method: str) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            self.conn.send((method, args))
            if not self.conn.poll(REPLY_S):
                raise AssertionError(f"the other process did not answer {method}{args}")
            status, value = self.conn.recv()
            if status != "ok":
                raise AssertionError(f"in the other process, {method}{args} raised:\n{value}")
            return value

        return call


# -- the model ---------------------------------------------------------------


class Lifetimes(RuleBasedStateMachine):
    sides: tuple[Side, Remote]  # set by the test: 0 is this process, 1 the other
    where: tuple[str, str]  # the daemon's name and runtime dir

    def __init__(self) -> None:
        super().__init__()
        for side in self.sides:
            side.reset(*self.where)
        self.next_key = 0
        # key -> side, owner, (segment, offset, size), live
        self.allocs: dict[int, dict[str, Any]] = {}
        # view key -> side, alloc key, kind, and for an attach whether the
        # handle was stale already when attached
        self.views: dict[int, dict[str, Any]] = {}
        self.handles: dict[int, tuple[int, ...]] = {}  # alloc key -> its handle

    def teardown(self) -> None:
        for side in self.sides:
            side.close()

    def _key(self) -> int:
        self.next_key += 1
        return self.next_key

    def _live(self, side: int | None = None) -> list[int]:
        return sorted(
            k for k, a in self.allocs.items() if a["live"] and (side is None or a["side"] == side)
        )

    def _freed(self) -> list[int]:
        return sorted(k for k, a in self.allocs.items() if not a["live"])

    # -- rules ----------------------------------------------------------------

    @rule(
        side=st.integers(0, 1),
        size=st.sampled_from(CACHED_SIZES + DAEMON_SIZES),
        owner=st.sampled_from(OWNERS),
    )
    def alloc(self, side: int, size: int, owner: str | None) -> None:
        key = self._key()
        owner = owner and f"{owner}-{side}"
        place = self.sides[side].alloc(key, size, owner)
        if place is not None:  # else the arena was full: nothing changed
            self.allocs[key] = {"side": side, "owner": owner, "place": place, "live": True}

    @precondition(lambda self: self._freed())
    @rule(data=st.data())
    def alloc_again(self, data: st.DataObject) -> None:
        """An alloc of a freed allocation's size on its side: the likeliest to
        be given that very block, so stale views meet a live allocation."""
        key = data.draw(st.sampled_from(self._freed()), label="freed alloc")
        alloc = self.allocs[key]
        self.alloc(alloc["side"], alloc["place"][2], None)

    @precondition(lambda self: self._live())
    @rule(data=st.data())
    def share_handle(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self._live()), label="alloc")
        self.handles[key] = self.sides[self.allocs[key]["side"]].handle(key)

    @precondition(lambda self: self._live())
    @rule(data=st.data(), through_client=st.booleans())
    def free(self, data: st.DataObject, through_client: bool) -> None:
        key = data.draw(st.sampled_from(self._live()), label="alloc")
        alloc = self.allocs[key]
        self.sides[alloc["side"]].free(key, through_client)
        alloc["live"] = False

    @rule(side=st.integers(0, 1), owner=st.sampled_from(OWNERS[1:]))
    def recycle(self, side: int, owner: str) -> None:
        owner = f"{owner}-{side}"
        if self.sides[side].recycle(owner):
            for alloc in self.allocs.values():
                if alloc["side"] == side and alloc["owner"] == owner:
                    alloc["live"] = False

    @precondition(lambda self: self._live())
    @rule(data=st.data(), kind=st.sampled_from(["view", "slice", "ndarray"]))
    def take_view(self, data: st.DataObject, kind: str) -> None:
        key = data.draw(st.sampled_from(self._live()), label="alloc")
        side = self.allocs[key]["side"]
        vkey = self._key()
        self.sides[side].view(vkey, key, kind)
        self.views[vkey] = {"side": side, "alloc": key, "kind": kind, "stale": False}

    @precondition(lambda self: self.handles)
    @rule(data=st.data(), retain=st.booleans())
    def attach_from_other(self, data: st.DataObject, retain: bool) -> None:
        key = data.draw(st.sampled_from(sorted(self.handles)), label="handle of alloc")
        alloc = self.allocs[key]
        side = 1 - alloc["side"]
        vkey = self._key()
        outcome = self.sides[side].attach(vkey, self.handles[key], retain)
        if alloc["live"]:
            assert outcome == "ok", f"attach of a live handle of allocation {key}: {outcome}"
        if outcome == "ok":
            kind = "retained" if retain else "attached"
            self.views[vkey] = {
                "side": side,
                "alloc": key,
                "kind": kind,
                "stale": not alloc["live"],
            }

    @precondition(lambda self: self.views)
    @rule(data=st.data())
    def write_through_view(self, data: st.DataObject) -> None:
        vkey = data.draw(st.sampled_from(sorted(self.views)), label="view")
        view = self.views[vkey]
        alloc = self.allocs[view["alloc"]]
        if alloc["live"]:
            outcome = self.sides[view["side"]].write(vkey, fill_of(view["alloc"]))
            assert outcome == "wrote", f"a write through a view of a live block: {outcome}"
        elif view["kind"] == "attached" and not view["stale"]:
            # Freed after a plain attach: the documented race, not written through.
            return
        else:
            self.sides[view["side"]].write(vkey, POISON)

    @precondition(lambda self: self._freed())
    @rule(data=st.data(), what=st.sampled_from(["view", "ndarray", "handle"]))
    def use_freed_buffer(self, data: st.DataObject, what: str) -> None:
        key = data.draw(st.sampled_from(self._freed()), label="freed alloc")
        self.sides[self.allocs[key]["side"]].use_freed_buffer(key, what)

    @precondition(lambda self: self.views)
    @rule(data=st.data())
    def drop_view(self, data: st.DataObject) -> None:
        vkey = data.draw(st.sampled_from(sorted(self.views)), label="view")
        view = self.views.pop(vkey)
        self.sides[view["side"]].drop(vkey)

    # -- invariants -------------------------------------------------------------

    @invariant()
    def no_two_live_allocations_share_a_byte(self) -> None:
        spans = sorted(
            (a["place"][0], a["place"][1], a["place"][1] + a["place"][2], key)
            for key, a in self.allocs.items()
            if a["live"]
        )
        for (seg, _, end, key), (next_seg, start, _, other) in zip(spans, spans[1:], strict=False):
            assert seg != next_seg or end <= start, (
                f"live allocations {key} and {other} overlap in segment {seg}: "
                f"{self.allocs[key]} and {self.allocs[other]}"
            )

    @invariant()
    def every_live_allocation_holds_its_own_bytes(self) -> None:
        problems: list[str] = []
        for index, side in enumerate(self.sides):
            expected = {k: fill_of(k) for k in self._live(index)}
            problems += side.check(expected)
        assert not problems, "a stale view wrote into a live allocation:\n" + "\n".join(problems)


# -- the tests -----------------------------------------------------------------


@pytest.fixture
def two_sides(make_daemon: Callable[..., Daemon]) -> Iterator[tuple[Daemon, Remote]]:
    """A daemon with a small arena, and a second process with a Side on it."""
    daemon = make_daemon(ARENA)
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_serve, args=(theirs,), daemon=True)
    process.start()
    theirs.close()
    try:
        yield daemon, Remote(ours)
    finally:
        with contextlib.suppress(OSError):  # it died already: the test says why
            ours.send(None)
        process.join(30)
        if process.is_alive():
            process.kill()
            process.join()
        ours.close()
    with shmarena.connect(daemon.name, runtime_dir=daemon.run_dir, cache=False) as probe:
        stats = probe.stats()
        assert (stats["used_bytes"], stats["live_blocks"]) == (0, 0), stats
        assert probe.check() == []


def run(two_sides: tuple[Daemon, Remote], examples: int, steps: int) -> None:
    daemon, remote = two_sides
    local = Side()

    class Machine(Lifetimes):
        sides = (local, remote)
        where = (daemon.name, daemon.run_dir)

    try:
        run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=examples,
                stateful_step_count=steps,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
            ),
        )
    finally:
        local.close()


def test_no_stale_view_or_handle_reaches_a_live_allocation(
    two_sides: tuple[Daemon, Remote],
) -> None:
    run(two_sides, examples=150, steps=40)


@pytest.mark.slow
def test_many_lifetime_sequences(two_sides: tuple[Daemon, Remote]) -> None:
    run(two_sides, examples=300, steps=60)
