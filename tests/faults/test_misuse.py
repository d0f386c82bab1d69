"""Misuse of the public client API against a real daemon.

Each wrong call (a double free, a handle that names no live block, an owner
that does not exist, ...) must raise a subclass of ShmArenaError whose message
names what was asked (the offset, the owner, the epoch), and must leave the
daemon's state as it was: the same used, requested, cached and free bytes, the
same owners, `check()` clean, and every block the caller legitimately holds
still freeable afterwards.

Frees of blocks that are not in the caller's own cache leave without waiting,
so their refusal may come from the next call that talks to the daemon: every
misuse here runs as "the call, then `sync()`" and the error of either counts.
"""

from __future__ import annotations

import pickle
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import shmarena
from shmarena import Handle
from shmarena.protocol import GEN_SHIFT
from tests.conftest import Daemon, unique_name

SMALL = 16000  # served from the client's cache when it has one (class 16 KiB)
LARGE = 4 << 20  # above any cache's limit: always allocated by the daemon
STATE_KEYS = (
    "used_bytes",
    "requested_bytes",
    "cached_bytes",
    "free_bytes",
    "retained_only_bytes",
    "pinned_bytes",
    "live_blocks",
    "owners",
)
OWNER_KEYS = ("name", "scope", "session", "blocks", "bytes")


def snapshot(observer: shmarena.Client) -> dict[str, Any]:
    """What the daemon holds, through a client that takes no part in the misuse."""
    stats = observer.stats()
    rows = sorted(
        ({key: row[key] for key in OWNER_KEYS} for row in observer.list_owners()),
        key=lambda row: str(row["name"]),
    )
    return {**{key: stats[key] for key in STATE_KEYS}, "owner_rows": rows}


def refusal(client: shmarena.Client, action: Callable[[], object]) -> shmarena.ShmArenaError:
    """The error of `action`, raised at once or by the `sync()` after it; then
    one more `sync()` must pass (a misuse is refused once, not twice)."""
    with pytest.raises(shmarena.ShmArenaError) as info:
        action()
        client.sync()
    client.sync()
    return info.value


def assert_refused(
    error: BaseException, cls: type[Exception], *named: str | tuple[str, ...]
) -> None:
    assert isinstance(error, shmarena.ShmArenaError)
    assert type(error) is cls, f"expected {cls.__name__}, got {type(error).__name__}: {error}"
    for text in named:  # a tuple: any one of its texts will do
        options = text if isinstance(text, tuple) else (text,)
        assert any(t in str(error) for t in options), f"{text!r} is not named in: {error}"


def assert_all_freeable(
    actor: shmarena.Client, observer: shmarena.Client, buffers: list[shmarena.Buffer]
) -> None:
    """The blocks the actor holds legitimately survived the misuse: their bytes
    are intact, each can be freed once, and afterwards no owner holds a byte."""
    for buf in buffers:
        assert bytes(buf.view[:8]) == pattern(buf), f"{buf!r} was overwritten"
        try:
            buf.free()
            actor.sync()
        except shmarena.ShmArenaError as error:
            pytest.fail(f"the legitimate free of {buf!r} was refused after the misuse: {error}")
    stats = observer.stats()
    assert (stats["used_bytes"], stats["requested_bytes"]) == (0, 0), stats
    assert observer.check() == []


def pattern(buf: shmarena.Buffer) -> bytes:
    return buf.offset.to_bytes(8, "little")


def alloc(client: shmarena.Client, size: int) -> shmarena.Buffer:
    buf = client.alloc(size)
    buf.view[:8] = pattern(buf)
    return buf


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[Daemon]:
    """One daemon for the module (a start costs about a second on a busy
    machine): each test leaves its arena empty, see `daemon` below."""
    run_dir = tempfile.mkdtemp(prefix="shma-", dir="/tmp")
    shared = Daemon(unique_name(), run_dir, "64M")
    try:
        yield shared.start()
    finally:
        shared.stop()
        try:
            shared.assert_clean()
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def daemon(shared_daemon: Daemon) -> Iterator[Daemon]:
    """The module's daemon; after the test its clients are closed (their
    sessions end) and the arena must be as empty as before."""
    assert shared_daemon.proc is not None
    yield shared_daemon
    for client in shared_daemon.clients:
        client.close()
    shared_daemon.clients.clear()
    assert shared_daemon.proc.poll() is None, "the daemon died"
    with shmarena.connect(shared_daemon.name, runtime_dir=shared_daemon.run_dir) as probe:
        stats = probe.stats()
        left = {k: stats[k] for k in ("used_bytes", "cached_bytes", "live_blocks", "owners")}
        assert left == dict.fromkeys(left, 0), f"the test left this in the arena: {left}"
        assert probe.check() == []


@pytest.fixture
def observer(daemon: Daemon) -> shmarena.Client:
    return daemon.client(cache=False)


CACHES = [pytest.param(True, id="cache"), pytest.param(False, id="nocache")]
SIZES = [pytest.param(SMALL, id="small"), pytest.param(LARGE, id="large")]


# -- double free ------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("cache", CACHES)
def test_buffer_freed_twice(
    daemon: Daemon, observer: shmarena.Client, cache: bool, size: int
) -> None:
    actor = daemon.client(cache=cache)
    keep = alloc(actor, size)
    buf = alloc(actor, size)
    offset = buf.offset
    buf.free()
    actor.sync()
    before = snapshot(observer)
    error = refusal(actor, buf.free)
    assert_refused(error, shmarena.StaleHandle, f"{offset:#x}", "double free")
    error = refusal(actor, lambda: actor.free(buf))
    assert_refused(error, shmarena.StaleHandle, f"{offset:#x}", "double free")
    assert snapshot(observer) == before
    assert observer.check() == []
    assert_all_freeable(actor, observer, [keep])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("cache", CACHES)
def test_handle_freed_twice_even_after_its_offset_was_reused(
    daemon: Daemon, observer: shmarena.Client, cache: bool, size: int
) -> None:
    actor = daemon.client(cache=cache)
    buf = alloc(actor, size)
    handle = buf.handle
    actor.free(handle)
    actor.sync()
    # The same size again: the block at that offset is likely handed out anew,
    # under a newer generation; the old handle must not free it.
    again = alloc(actor, size)
    actor.sync()
    before = snapshot(observer)
    error = refusal(actor, lambda: actor.free(handle))
    assert_refused(error, shmarena.StaleHandle, f"{handle.offset:#x}", "double free")
    error = refusal(actor, buf.free)  # the Buffer of that handle, too
    assert_refused(error, shmarena.StaleHandle, f"{handle.offset:#x}", "double free")
    assert snapshot(observer) == before
    assert observer.check() == []
    assert_all_freeable(actor, observer, [again])


FREE_IN_CHILD = r"""
import pickle, sys
import shmarena
handle = pickle.loads(bytes.fromhex(sys.stdin.readline()))
with shmarena.connect() as client:
    client.free(handle)
    client.sync()
print("freed", flush=True)
"""


def free_in_other_process(daemon: Daemon, handle: Handle) -> None:
    child = daemon.python(
        FREE_IN_CHILD, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = child.communicate(pickle.dumps(handle).hex() + "\n", timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0 and out.strip() == "freed", err


@pytest.mark.parametrize("synced", [True, False], ids=["synced", "unsynced"])
@pytest.mark.parametrize("cache", CACHES)
def test_buffer_freed_by_another_process_then_again(
    daemon: Daemon, observer: shmarena.Client, cache: bool, synced: bool
) -> None:
    actor = daemon.client(cache=cache)
    keep = alloc(actor, SMALL)
    buf = alloc(actor, SMALL)
    handle = buf.handle
    actor.sync()  # the hand-out is known to the daemon before the handle leaves
    free_in_other_process(daemon, handle)
    if synced:
        actor.sync()  # the actor hears that its block came back (a notice)
    before = snapshot(observer)
    error = refusal(actor, buf.free)
    assert_refused(error, shmarena.StaleHandle, f"{handle.offset:#x}")
    assert snapshot(observer) == before
    assert observer.check() == []
    assert_all_freeable(actor, observer, [keep])


# -- handles that name no live block -----------------------------------------


def test_free_of_a_never_allocated_offset(daemon: Daemon, observer: shmarena.Client) -> None:
    actor = daemon.client()
    keep = alloc(actor, SMALL)
    actor.sync()
    size_bytes = actor.stats()["size_bytes"]
    offset = size_bytes - (1 << 20)  # far from anything this small test allocates
    before = snapshot(observer)
    daemon_made = Handle(actor.epoch, 0, offset, 4096, 1)
    cache_made = Handle(actor.epoch, 0, offset, 4096, (actor.session << GEN_SHIFT) + 999)
    for handle in (daemon_made, cache_made):
        error = refusal(actor, lambda h=handle: actor.free(h))  # type: ignore[misc]
        assert_refused(error, shmarena.StaleHandle, f"{offset:#x}")
        assert snapshot(observer) == before
    assert observer.check() == []
    assert_all_freeable(actor, observer, [keep])


# Each mutation turns the handle of a live 16000-byte block into one that names
# no live block: (id, the mutation, the texts its refusal must name); both
# callables get the handle and the arena's size in bytes.
MUTATIONS: list[tuple[str, Callable[[Handle, int], Handle], Callable[[Handle, int], list[str]]]] = [
    (
        "mid_block",
        lambda h, n: h._replace(offset=h.offset + 4096),
        lambda h, n: [f"{h.offset + 4096:#x}"],
    ),
    (
        "misaligned",
        lambda h, n: h._replace(offset=h.offset + 1),
        lambda h, n: [f"{h.offset + 1:#x}"],
    ),
    ("past_the_arena", lambda h, n: h._replace(offset=n), lambda h, n: [f"{n:#x}"]),
    ("negative_offset", lambda h, n: h._replace(offset=-4096), lambda h, n: [f"{-4096:#x}"]),
    (
        "offset_near_2^64",
        lambda h, n: h._replace(offset=2**64 - 4096),
        lambda h, n: [f"{2**64 - 4096:#x}"],
    ),
    ("size_plus_1", lambda h, n: h._replace(size=h.size + 1), lambda h, n: [f"{h.offset:#x}"]),
    ("size_minus_1", lambda h, n: h._replace(size=h.size - 1), lambda h, n: [f"{h.offset:#x}"]),
    (
        "generation_plus_1",
        lambda h, n: h._replace(generation=h.generation + 1),
        lambda h, n: [f"{h.offset:#x}", str(h.generation + 1)],
    ),
    (
        "segment_1",
        lambda h, n: h._replace(segment=1),
        lambda h, n: [(f"{h.offset:#x}", "segment 1")],
    ),
    (
        "epoch_plus_1",
        lambda h, n: h._replace(epoch=h.epoch + 1),
        lambda h, n: [str(h.epoch + 1), str(h.epoch)],
    ),
]

# How a test that hits a known bug fails: an assertion, or pytest.fail / pytest.raises.
BUG_FAILS = (AssertionError, pytest.fail.Exception)


def mutation_params() -> list[Any]:
    """Each mutation against a block from the client's cache (whose handle the
    cache judges itself) and against one the daemon handed out."""
    return [
        pytest.param(mutate, named, cache, id=f"{name}-{'cache' if cache else 'nocache'}")
        for name, mutate, named in MUTATIONS
        for cache in (True, False)
    ]


@pytest.mark.parametrize(("mutate", "named", "cache"), mutation_params())
def test_free_of_a_handle_that_names_no_live_block(
    daemon: Daemon,
    observer: shmarena.Client,
    mutate: Callable[[Handle, int], Handle],
    named: Callable[[Handle, int], list[str]],
    cache: bool,
) -> None:
    actor = daemon.client(cache=cache)
    buf = alloc(actor, SMALL)
    handle = buf.handle
    actor.sync()
    size_bytes = int(actor.info["size_bytes"])
    wrong = mutate(handle, size_bytes)
    before = snapshot(observer)
    error = refusal(actor, lambda: actor.free(wrong))
    assert_refused(error, shmarena.StaleHandle, *named(handle, size_bytes))
    assert snapshot(observer) == before
    assert observer.check() == []
    assert_all_freeable(actor, observer, [buf])


def test_free_of_an_unencodable_handle_loses_no_other_free(
    daemon: Daemon, observer: shmarena.Client
) -> None:
    owner = daemon.client(cache=False)
    foreign = alloc(owner, SMALL)
    actor = daemon.client(cache=False)
    actor.free(foreign.handle)  # legitimate, queued
    bad = foreign.handle._replace(offset=2**64)
    error = refusal(actor, lambda: actor.free(bad))
    assert_refused(error, shmarena.InvalidRequest, f"{2**64:#x}")
    assert observer.stats()["used_bytes"] == 0, "the legitimate free queued with it was lost"


@pytest.mark.parametrize("cache", CACHES)
def test_handle_from_a_previous_daemon_of_the_same_name(
    make_daemon: Callable[..., Daemon], cache: bool
) -> None:
    first = make_daemon()
    old_client = first.client(cache=cache)
    old = [alloc(old_client, SMALL).handle, alloc(old_client, LARGE).handle]
    old_client.sync()
    first.stop()
    second = make_daemon(name=first.name)
    actor = second.client(cache=cache)
    observer = second.client(cache=False)
    # The same calls on a fresh daemon hand out the very same offsets, sizes
    # and generations (sessions are numbered alike): only the epoch tells the
    # old handles from the live ones, which is what this test is about.
    live = [alloc(actor, SMALL), alloc(actor, LARGE)]
    actor.sync()
    assert actor.epoch != old[0].epoch
    assert [b.handle[1:] for b in live] == [h[1:] for h in old], "no longer the same blocks"
    before = snapshot(observer)
    for handle in old:
        error = refusal(actor, lambda h=handle: actor.attach(h))  # type: ignore[misc]
        assert_refused(error, shmarena.StaleHandle, str(handle.epoch), str(actor.epoch))
        error = refusal(actor, lambda h=handle: actor.attach(h, retain=True))  # type: ignore[misc]
        assert_refused(error, shmarena.StaleHandle, str(handle.epoch), str(actor.epoch))
        assert snapshot(observer) == before
    for handle in old:
        error = refusal(actor, lambda h=handle: actor.free(h))  # type: ignore[misc]
        assert_refused(error, shmarena.StaleHandle, str(handle.epoch), str(actor.epoch))
        assert snapshot(observer) == before, f"freeing {handle} changed the new daemon"
    assert observer.check() == []
    assert_all_freeable(actor, observer, live)


# -- owners ------------------------------------------------------------------


def test_recycle_of_an_unknown_owner(daemon: Daemon, observer: shmarena.Client) -> None:
    actor = daemon.client()
    keep = alloc(actor, SMALL)
    actor.owner("was-here").alloc(SMALL).free()
    actor.recycle("was-here")
    actor.sync()
    before = snapshot(observer)
    for name in ("never-made", "was-here", "session-999999"):
        error = refusal(actor, lambda n=name: actor.recycle(n))  # type: ignore[misc]
        assert_refused(error, shmarena.UnknownOwner, repr(name))
        assert isinstance(error, shmarena.InvalidRequest)
        assert error.details.get("owner") == name
        assert snapshot(observer) == before
    result = daemon.cli("recycle", "NOPE")
    assert result.returncode == 1, result
    assert "'NOPE'" in result.stderr and "no owner" in result.stderr, result.stderr
    assert snapshot(observer) == before
    assert observer.check() == []
    assert_all_freeable(actor, observer, [keep])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("cache", CACHES)
def test_free_after_recycle(
    daemon: Daemon, observer: shmarena.Client, cache: bool, size: int
) -> None:
    actor = daemon.client(cache=cache)
    keep = alloc(actor, size)
    victims = []
    for name, detached in (("batch", False), ("shared", True)):
        owner = actor.owner(name, detached=detached)
        quiet = owner.alloc(size)  # its handle never leaves the process
        known = owner.alloc(size)
        victims.append((quiet, known, known.handle))
    actor.sync()
    actor.recycle("batch")
    actor.recycle("shared")
    before = snapshot(observer)
    for quiet, known, handle in victims:
        for action in (quiet.free, known.free, lambda h=handle: actor.free(h)):
            error = refusal(actor, action)  # type: ignore[arg-type]
            assert_refused(error, shmarena.StaleHandle, "recycled", "double free")
            assert f"{quiet.offset:#x}" in str(error) or f"{known.offset:#x}" in str(error)
            assert snapshot(observer) == before
    assert observer.check() == []
    assert_all_freeable(actor, observer, [keep])


# -- attach --------------------------------------------------------------------


def test_attach_of_a_handle_outside_the_arena(daemon: Daemon, observer: shmarena.Client) -> None:
    actor = daemon.client()
    keep = alloc(actor, SMALL)
    actor.sync()
    n = int(actor.info["size_bytes"])
    epoch = actor.epoch
    outside = [
        Handle(epoch, 0, n, 4096, 1),
        Handle(epoch, 0, n - 4096, 8192, 1),  # straddles the end
        Handle(epoch, 0, -4096, 4096, 1),
        Handle(epoch, 0, 2**64 - 4096, 4096, 1),
        Handle(epoch, 0, 0, 0, 1),
        Handle(epoch, 0, 0, -1, 1),
        Handle(epoch, 1, 0, 4096, 1),  # a segment this arena does not have
    ]
    before = snapshot(observer)
    for handle in outside:
        for retain in (False, True):
            error = refusal(actor, lambda h=handle, r=retain: actor.attach(h, retain=r))  # type: ignore[misc]
            assert_refused(error, shmarena.InvalidRequest, str(tuple(handle)), str(n))
            assert snapshot(observer) == before
    for junk in ("nope", (1, 2, 3), [epoch, 0, 0, 4096]):
        error = refusal(actor, lambda j=junk: actor.attach(j))  # type: ignore[misc]
        assert_refused(error, shmarena.InvalidRequest, "not a shmarena handle")
    # Inside the arena but no block there: the generation table says so, to a
    # plain attach (no round trip) and to a retaining one alike.
    nowhere = Handle(epoch, 0, n - (1 << 20), 4096, 1)
    for retain in (False, True):
        error = refusal(actor, lambda r=retain: actor.attach(nowhere, retain=r))  # type: ignore[misc]
        assert_refused(error, shmarena.StaleHandle, f"{nowhere.offset:#x}", "never handed out")
    assert snapshot(observer) == before
    assert observer.check() == []
    assert_all_freeable(actor, observer, [keep])


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        pytest.param(lambda c: c.recycle(123), "name", id="recycle-int"),
        pytest.param(lambda c: c.owner(None), "name", id="owner-none"),
        pytest.param(lambda c: c.owner("x", detached="yes"), "detached", id="owner-detached-str"),
    ],
)
def test_argument_of_the_wrong_type_is_refused_at_once(
    daemon: Daemon,
    observer: shmarena.Client,
    call: Callable[[shmarena.Client], object],
    argument: str,
) -> None:
    # Short timeout: a refusal the client cannot match to its request (it once
    # came with request id nil) would otherwise cost 5 s before failing.
    actor = daemon.client(timeout_s=1.0)
    keep = alloc(actor, SMALL)
    actor.sync()
    before = snapshot(observer)
    error = refusal(actor, lambda: call(actor))
    assert_refused(error, shmarena.InvalidRequest, repr(argument))
    assert snapshot(observer) == before
    assert_all_freeable(actor, observer, [keep])
