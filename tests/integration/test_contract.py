"""The client contract, checked against the sync `shmarena.Client` and the
asyncio `shmarena.aio.AsyncClient` with one test body each.

The `side` fixture gives a client of either kind and a way to call it: on the
sync side `side(x)` is just `x` (the call already ran); on the async side
`side(x)` runs the awaitable `x` to its end on the test's event loop. So a
line like `buf = side(c.alloc(100))` reads the same for both."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

import shmarena
import shmarena.aio
from tests.conftest import Daemon

# One daemon for the whole module (tests/conftest.py: shared_daemon).
pytestmark = pytest.mark.shared_daemon

MiB = 1 << 20


class Side:
    """One kind of client (sync or async) over a daemon, and how to run its calls."""

    def __init__(self, kind: str, daemon: Daemon) -> None:
        self.kind = kind
        self.daemon = daemon
        self.loop = asyncio.new_event_loop() if kind == "async" else None
        self.opened: list[Any] = []
        self.client = self.connect()

    def __call__(self, value: Any) -> Any:
        if self.loop is None:
            return value
        return self.loop.run_until_complete(asyncio.wait_for(_awaited(value), timeout=60))

    def connect(self, **kwargs: Any) -> Any:
        if self.loop is None:
            client = self.daemon.client(**kwargs)
        else:
            opening = shmarena.aio.connect(
                self.daemon.name, runtime_dir=self.daemon.run_dir, **kwargs
            )
            client = self(opening)
            self.opened.append(client)
        return client

    @contextlib.contextmanager
    def scope(self, manager: Any) -> Iterator[Any]:
        """`with manager as value` for the sync side, `async with` for the async one."""
        if self.loop is None:
            with manager as value:
                yield value
            return
        value = self(manager.__aenter__())
        try:
            yield value
        except BaseException as error:
            if not self(manager.__aexit__(type(error), error, error.__traceback__)):
                raise
        else:
            self(manager.__aexit__(None, None, None))

    def close(self) -> None:
        if self.loop is None:
            return
        try:
            for client in self.opened:
                self(client.close())
        finally:
            self.loop.close()


async def _awaited(value: Any) -> Any:
    return await value


@pytest.fixture(params=["sync", "async"])
def side(request: pytest.FixtureRequest, daemon: Daemon) -> Iterator[Side]:
    made = Side(request.param, daemon)
    yield made
    made.close()


def test_alloc_gives_exact_size_and_shared_bytes(side: Side) -> None:
    c = side.client
    for size in (2, 4097, 64 * 1024, 2 * MiB + 3):  # cached and sent to the daemon
        buf = side(c.alloc(size))
        assert buf.size == size and len(buf.view) == size
        buf.view[:1] = b"x"
        buf.view[-1:] = b"y"
        again = side(c.attach(buf.handle))
        assert bytes(again.view[:1]) == b"x" and bytes(again.view[-1:]) == b"y"
        side(c.free(buf))


def test_alloc_many_all_exact_and_distinct(side: Side) -> None:
    c = side.client
    sizes = [100, 5000, 3 * MiB, 100, 1]
    bufs = side(c.alloc_many(sizes))
    assert [b.size for b in bufs] == sizes
    assert len({(b.segment, b.offset) for b in bufs}) == len(sizes)
    side(c.sync())
    assert side(c.stats())["live_blocks"] == len(sizes)
    side(c.free(bufs))
    assert side(c.alloc_many([])) == []


def test_free_then_double_free_is_stale(side: Side) -> None:
    c = side.client
    buf = side(c.alloc(1000))
    assert side(c.free(buf)).blocks == 1
    with pytest.raises(shmarena.StaleHandle, match="double free"):
        side(c.free(buf))


def test_double_free_by_handle_is_raised_by_sync(side: Side) -> None:
    c = side.client
    # Above the cache's large-block budget (4 MiB here): a block the daemon hands out itself.
    handle = side(c.alloc(8 * MiB)).handle
    side(c.free(handle))
    side(c.free(handle))  # sent without waiting: the refusal comes later
    with pytest.raises(shmarena.StaleHandle):
        side(c.sync())
    side(c.sync())  # reported once


def test_out_of_memory_is_a_memory_error_with_figures(side: Side) -> None:
    with pytest.raises(shmarena.OutOfMemory) as caught:
        side(side.client.alloc(1 << 30))
    error = caught.value
    assert isinstance(error, MemoryError)
    assert error.requested_bytes == 1 << 30
    assert 0 < error.largest_free_bytes <= error.free_bytes <= 64 * MiB
    assert "largest free" in str(error)


def test_bad_size_is_invalid_request(side: Side) -> None:
    for bad in (0, -5, 2.5):
        with pytest.raises(shmarena.InvalidRequest, match="positive int"):
            side(side.client.alloc(bad))


def test_owner_scope_recycles_on_exit(side: Side) -> None:
    c = side.client
    with side.scope(c.owner("batch-1")) as batch:
        assert batch.name == "batch-1" and not batch.detached
        side(batch.alloc(1000))
        side(batch.alloc(2 * MiB))
        side(batch.alloc_many([10, 20]))
        side(c.sync())
        row = {r["name"]: r for r in side(c.list_owners())}["batch-1"]
        assert row["blocks"] == 4 and row["scope"] == "session"
    assert "batch-1" not in {r["name"] for r in side(c.list_owners())}
    side(c.sync())
    assert side(c.stats())["live_blocks"] == 0


def test_detached_owner_recycle_returns_counts(side: Side) -> None:
    c = side.client
    batch = side(c.owner("keep-1", detached=True))
    assert batch.detached
    side(batch.alloc(3 * 4096))
    side(batch.alloc_many([4096, 4096]))
    recycled = side(batch.recycle())
    assert recycled == shmarena.Recycled(3, 5 * 4096)
    assert "keep-1" not in {r["name"] for r in side(c.list_owners())}


def test_detached_owner_survives_its_client(side: Side) -> None:
    other = side.connect()
    batch = side(other.owner("outlive", detached=True))
    side(batch.alloc(8192))
    side(other.close())
    rows = {r["name"]: r for r in side(side.client.list_owners())}
    assert rows["outlive"]["scope"] == "detached" and rows["outlive"]["blocks"] == 1
    assert side(side.client.recycle("outlive")).blocks == 1


def test_recycle_of_missing_owner_is_unknown_owner(side: Side) -> None:
    with pytest.raises(shmarena.UnknownOwner, match="no-such-owner"):
        side(side.client.recycle("no-such-owner"))


def test_attach_in_another_process_sees_the_bytes(side: Side) -> None:
    buf = side(side.client.alloc(2 * MiB))
    buf.view[:6] = b"hello!"
    assert side.daemon.read_in_child(buf.handle, 6) == b"hello!"
    side(side.client.free(buf))


def test_retain_keeps_a_freed_block_until_release(side: Side) -> None:
    writer, reader = side.client, side.connect()
    buf = side(writer.alloc(2 * MiB))
    view = side(reader.attach(buf.handle, retain=True))
    assert view.retained
    side(writer.free(buf))
    side(writer.sync())
    stats = side(writer.stats())
    assert stats["retained_only_blocks"] == 1 and stats["live_blocks"] == 0
    side(reader.release(view))
    assert side(writer.stats())["retained_only_blocks"] == 0


def test_retain_then_release_by_handle(side: Side) -> None:
    writer, reader = side.client, side.connect()
    buf = side(writer.alloc(5000))
    plain = side(reader.attach(buf.handle))
    assert not plain.retained
    side(reader.retain(plain))
    assert plain.retained
    side(writer.free(buf))
    side(writer.sync())
    assert side(writer.stats())["retained_only_blocks"] == 1
    side(reader.release(plain.handle))
    assert side(writer.stats())["retained_only_blocks"] == 0


DESIGN_STATS_KEYS = {
    "name",
    "pid",
    "epoch",
    "size_bytes",
    "used_bytes",
    "free_bytes",
    "largest_free_bytes",
    "min_block_bytes",
    "live_blocks",
    "owners",
    "sessions",
    "free_blocks_by_order",
}


def test_stats_carries_the_design_keys(side: Side) -> None:
    stats = side(side.client.stats())
    assert DESIGN_STATS_KEYS <= stats.keys()
    assert stats["name"] == side.daemon.name and stats["size_bytes"] == 64 * MiB
    assert stats["used_bytes"] == 0 and stats["sessions"] >= 1


def test_stats_used_bytes_follows_alloc_and_free(side: Side) -> None:
    c = side.client
    buf = side(c.alloc(3 * MiB))
    assert side(c.stats())["used_bytes"] == 3 * MiB
    side(c.free(buf))
    side(c.sync())
    assert side(c.stats())["used_bytes"] == 0


def test_list_owners_and_clients_shapes(side: Side) -> None:
    c = side.client
    side(c.owner("shape-1"))
    owners = side(c.list_owners())
    assert {"name", "scope", "pid", "blocks", "bytes", "age_s"} <= owners[0].keys()
    assert "shape-1" in {r["name"] for r in owners}
    clients = side(c.list_clients())
    assert {"session", "pid", "since", "blocks", "bytes"} <= clients[0].keys()
    assert c.session in {r["session"] for r in clients}


def test_check_is_clean_after_work(side: Side) -> None:
    c = side.client
    bufs = [side(c.alloc(size)) for size in (10, 70_000, 2 * MiB)]
    side(c.free(bufs))
    assert side(c.check()) == []


def test_sync_and_ping(side: Side) -> None:
    assert side(side.client.sync()) is None
    assert isinstance(side(side.client.ping()), float)


def test_close_recycles_session_owners_and_refuses_later_calls(side: Side) -> None:
    other = side.connect()
    batch = side(other.owner("gone-at-close"))
    side(batch.alloc(2 * MiB))
    side(other.close())
    side(other.close())  # twice is fine
    assert "gone-at-close" not in {r["name"] for r in side(side.client.list_owners())}
    assert side(side.client.stats())["used_bytes"] == 0
    with pytest.raises(shmarena.DaemonUnavailable, match="closed"):
        side(other.ping())


def test_properties_match_the_session(side: Side) -> None:
    c = side.client
    assert c.name == side.daemon.name
    assert c.session in {r["session"] for r in side(c.list_clients())}
    assert c.epoch == side(c.stats())["epoch"]
    assert c.numa_nodes == [] and c.cache_max_bytes > 0


def test_publish_then_lookup_gives_the_sealed_bytes_retained(side: Side) -> None:
    c = side.client
    buf = side(c.alloc(8192))
    buf.view[:4] = b"seal"
    assert side(c.publish("contract/one", buf)) == buf.handle
    found = side(c.lookup("contract/one"))
    assert found.retained and found.view.readonly and bytes(found.view[:4]) == b"seal"
    rows = side(c.names("contract/"))
    assert [(r["name"], r["bytes"], r["sealed"]) for r in rows] == [("contract/one", 8192, True)]
    with pytest.raises(shmarena.NameExists, match="contract/one"):
        side(c.publish("contract/one", side(c.alloc(4096))))
    side(c.release(found))
    side(c.unpublish("contract/one"))
    assert side(c.names("contract/")) == []


def test_lookup_of_a_missing_name_waits_its_timeout_then_names_it(side: Side) -> None:
    with pytest.raises(shmarena.UnknownName, match="contract/none"):
        side(side.client.lookup("contract/none", timeout=0.2))
    with pytest.raises(shmarena.UnknownName, match="contract/none"):
        side(side.client.lookup("contract/none"))  # no wait at all


def test_a_name_vanishes_with_its_block(side: Side) -> None:
    c = side.client
    buf = side(c.alloc(4096))
    side(c.publish("contract/gone", buf, sealed=False))
    side(c.free(buf))
    assert side(c.names("contract/")) == []
