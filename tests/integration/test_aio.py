"""shmarena.aio beyond the shared contract: the ways to connect, cancellation
at each point of a call's life, a storm of cancelled allocations, and the
worker thread's end. A real daemon throughout; the event loop is asyncio.run
per test."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Coroutine
from typing import Any

import pytest

import shmarena
import shmarena.aio
from tests.conftest import REPO, Daemon, wait_for

# One daemon for the whole module (tests/conftest.py: shared_daemon).
pytestmark = pytest.mark.shared_daemon

MiB = 1 << 20


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a test's coroutine, bounded: a hang fails instead of stalling the run."""
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


def aio_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("shmarena-aio")]


def connect(daemon: Daemon, **kwargs: Any) -> shmarena.aio.Opening[shmarena.aio.AsyncClient]:
    return shmarena.aio.connect(daemon.name, runtime_dir=daemon.run_dir, **kwargs)


def worker_done(client: shmarena.aio.AsyncClient) -> None:
    """Block until the worker has finished every call queued so far (it runs
    them in order), without letting the event loop run meanwhile."""
    client._executor.submit(lambda: None).result(timeout=30)


async def settled(client: shmarena.aio.AsyncClient) -> dict[str, Any]:
    """The daemon's figures once it has applied everything the client did."""
    await client.sync()
    return await client.stats()


# -- connecting and closing ---------------------------------------------------


def test_connect_is_awaitable_and_an_async_context_manager(daemon: Daemon) -> None:
    async def main() -> list[int]:
        sessions = []
        client = await connect(daemon)
        sessions.append(client.session)
        await client.close()
        async with connect(daemon) as client:
            sessions.append(client.session)
            assert await client.ping() > 0
        assert client.closed
        async with await connect(daemon) as client:
            sessions.append(client.session)
        assert client.closed
        return sessions

    sessions = run(main())
    assert len(set(sessions)) == 3
    assert aio_threads() == []
    watcher = daemon.client()
    assert {r["session"] for r in watcher.list_clients()} == {watcher.session}


def test_connect_passes_the_sync_keywords(daemon: Daemon) -> None:
    async def main() -> None:
        async with connect(daemon, cache=False, label="aio-test", timeout_s=3.0) as client:
            assert client.cache_max_bytes == 0
            assert client.sync_client.timeout_s == 3.0
            buf = await client.alloc(100)  # no cache: straight to the daemon
            assert (await client.stats())["used_bytes"] == 4096
            await client.free(buf)

    run(main())


def test_connect_to_a_missing_daemon_raises_and_leaves_no_thread(run_dir: str) -> None:
    async def main() -> None:
        with pytest.raises(shmarena.DaemonUnavailable, match="nobody-here"):
            await shmarena.aio.connect("nobody-here", runtime_dir=run_dir, timeout_s=0.3)

    run(main())
    wait_for(lambda: aio_threads() == [], timeout_s=10, what="the connect thread to end")


def test_close_ends_the_worker_thread_and_the_session(daemon: Daemon) -> None:
    watcher = daemon.client()

    async def main() -> None:
        client = await connect(daemon)
        await client.owner("closing")
        await client.alloc(2 * MiB)
        assert len(aio_threads()) == 1
        await client.close()
        assert aio_threads() == []  # joined by close itself
        with pytest.raises(shmarena.DaemonUnavailable, match="closed; connect again"):
            await client.alloc(2 * MiB)
        with pytest.raises(shmarena.DaemonUnavailable, match="closed"):
            await client.stats()
        await client.close()  # twice is fine

    run(main())
    assert {r["session"] for r in watcher.list_clients()} == {watcher.session}
    assert watcher.stats()["used_bytes"] == 0


def test_calls_made_before_close_still_run(daemon: Daemon) -> None:
    async def main() -> list[Any]:
        client = await connect(daemon)
        calls = [asyncio.ensure_future(client.ping()) for _ in range(20)]
        await asyncio.sleep(0)  # one loop turn: every ping is queued on the worker
        await client.close()
        return await asyncio.gather(*calls)

    assert all(isinstance(t, float) for t in run(main()))
    assert aio_threads() == []


def test_a_cancelled_close_still_closes(daemon: Daemon) -> None:
    watcher = daemon.client()

    async def main() -> None:
        client = await connect(daemon)
        closing = asyncio.ensure_future(client.close())
        await asyncio.sleep(0)  # one loop turn: the close is on the worker
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert client.closed

    run(main())
    wait_for(lambda: aio_threads() == [], timeout_s=10, what="the worker to end")
    wait_for(
        lambda: {r["session"] for r in watcher.list_clients()} == {watcher.session},
        timeout_s=10,
        what="the closed session to leave",
    )


def test_a_cache_hit_needs_no_worker(daemon: Daemon) -> None:
    """alloc of a cached size completes while the worker is held up."""

    async def main() -> None:
        async with connect(daemon) as client:
            await client.free(await client.alloc(1000))  # the class is filled now
            gate = threading.Event()
            client._executor.submit(gate.wait, 30)
            try:
                buf = await asyncio.wait_for(client.alloc(1000), timeout=30)
                assert buf.size == 1000
                freed = await asyncio.wait_for(client.free(buf), timeout=30)
                assert freed.blocks == 1
            finally:
                gate.set()

    run(main())


def test_an_owner_is_an_async_context_manager_from_the_call(daemon: Daemon) -> None:
    async def main() -> None:
        async with connect(daemon) as client:
            async with client.owner("ctx") as batch:
                await batch.alloc(100)
                await batch.alloc(2 * MiB)
                assert "ctx" in {r["name"] for r in await client.list_owners()}
            assert "ctx" not in {r["name"] for r in await client.list_owners()}
            assert (await settled(client))["live_blocks"] == 0

    run(main())


# -- cancellation at each point of a call's life --------------------------------


def test_cancel_before_the_call_starts_sends_nothing(daemon: Daemon) -> None:
    async def main() -> None:
        async with connect(daemon) as client:
            before = (await settled(client))["counters"]["allocs"]
            task = asyncio.ensure_future(client.alloc(2 * MiB))
            task.cancel()  # before its first step
            with pytest.raises(asyncio.CancelledError):
                await task
            after = await settled(client)
            assert after["counters"]["allocs"] == before
            assert after["used_bytes"] == 0

    run(main())


def test_cancel_while_queued_drops_the_call(daemon: Daemon) -> None:
    async def main() -> None:
        async with connect(daemon) as client:
            before = (await settled(client))["counters"]["allocs"]
            gate = threading.Event()
            client._executor.submit(gate.wait, 30)  # hold the worker
            task = asyncio.ensure_future(client.alloc(2 * MiB))
            await asyncio.sleep(0)  # one loop turn: the alloc waits behind the gate
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            gate.set()
            after = await settled(client)
            assert after["counters"]["allocs"] == before  # it never ran
            assert after["used_bytes"] == 0

    run(main())


def test_cancel_while_the_worker_is_in_the_call_frees_the_block(daemon: Daemon) -> None:
    """The alloc is done by the worker, which then waits; the task is
    cancelled meanwhile; the worker frees the block when it has it."""
    watcher = daemon.client()

    async def main() -> None:
        async with connect(daemon) as client:
            before = (await settled(client))["counters"]
            inside, gate = threading.Event(), threading.Event()
            bufs = []

            def alloc_then_wait() -> shmarena.Buffer:
                buf = client.sync_client.alloc(8 * MiB)  # above the large cache: an ALLOC
                bufs.append(buf)
                inside.set()
                gate.wait(30)
                return buf

            task = asyncio.ensure_future(
                client._call(alloc_then_wait, undo=lambda b: client.sync_client.free(b))
            )
            await asyncio.sleep(0)  # one loop turn: the call is on the worker
            wait_for(inside.is_set, timeout_s=30, what="the worker to be in the call")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert watcher.stats()["used_bytes"] == 8 * MiB  # still held, by the worker
            gate.set()
            after = await settled(client)
            assert after["used_bytes"] == 0 and after["live_blocks"] == 0
            assert after["counters"]["allocs"] == before["allocs"] + 1
            with pytest.raises(shmarena.StaleHandle, match="double free"):
                bufs[0].free()

    run(main())


CANCELLED_CALLS = {
    "alloc": lambda c, o: c.alloc(2 * MiB),
    "alloc_many": lambda c, o: c.alloc_many([100, 3 * MiB, 5000]),
    "owner.alloc": lambda c, o: o.alloc(2 * MiB),
    "detached_owner.alloc": lambda c, o: o.detached.alloc(100),
    "owner.alloc_many": lambda c, o: o.alloc_many([2 * MiB, 100]),
}


class _Owners:
    def __init__(self, session: shmarena.aio.AsyncOwner, detached: shmarena.aio.AsyncOwner):
        self.session, self.detached = session, detached

    def alloc(self, size: int) -> Any:
        return self.session.alloc(size)

    def alloc_many(self, sizes: list[int]) -> Any:
        return self.session.alloc_many(sizes)


@pytest.mark.parametrize("call", sorted(CANCELLED_CALLS))
def test_cancel_after_the_result_is_ready_frees_it(daemon: Daemon, call: str) -> None:
    """The worker finished the call, but the task is cancelled before it
    resumed to take the result: the task gives the block(s) back."""

    async def main() -> None:
        async with connect(daemon) as client:
            owners = _Owners(await client.owner("s"), await client.owner("d", detached=True))
            base = await settled(client)
            task = asyncio.ensure_future(CANCELLED_CALLS[call](client, owners))
            await asyncio.sleep(0)  # one loop turn: the call is on the worker
            worker_done(client)  # the result is ready; the loop has not seen it
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            after = await settled(client)
            assert after["counters"]["allocs"] + after["counters"]["fills"] > (
                base["counters"]["allocs"] + base["counters"]["fills"]
            ), "the call never reached the daemon: this test tests nothing"
            assert after["used_bytes"] == base["used_bytes"]
            assert after["live_blocks"] == base["live_blocks"]
            rows = {r["name"]: r for r in await client.list_owners()}
            assert rows["s"]["blocks"] == rows["d"]["blocks"] == 0
            assert await client.check() == []
            await owners.detached.recycle()

    run(main())


def test_a_cancelled_retaining_attach_releases(daemon: Daemon) -> None:
    writer = daemon.client()
    buf = writer.alloc(2 * MiB)

    async def main() -> None:
        async with connect(daemon) as reader:
            task = asyncio.ensure_future(reader.attach(buf.handle, retain=True))
            await asyncio.sleep(0)
            worker_done(reader)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await reader.sync()
            writer.free(buf)  # while the reader's session lives on
            writer.sync()
            stats = writer.stats()
            assert stats["retained_only_blocks"] == 0 and stats["used_bytes"] == 0

    run(main())


def test_a_cancelled_retain_releases_and_leaves_the_buffer_attached(daemon: Daemon) -> None:
    writer = daemon.client()
    buf = writer.alloc(2 * MiB)

    async def main() -> None:
        async with connect(daemon) as reader:
            plain = await reader.attach(buf.handle)
            task = asyncio.ensure_future(reader.retain(plain))
            await asyncio.sleep(0)
            worker_done(reader)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await reader.sync()
            assert not plain.retained and bytes(plain.view[:1]) == b"\0"
            writer.free(buf)  # while the reader's session lives on
            writer.sync()
            assert writer.stats()["retained_only_blocks"] == 0

    run(main())


def test_a_cancelled_connect_leaves_no_session(daemon: Daemon) -> None:
    watcher = daemon.client()

    async def main() -> None:
        task = asyncio.ensure_future(connect(daemon))
        await asyncio.sleep(0)  # the connect is on its worker
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    wait_for(lambda: aio_threads() == [], timeout_s=10, what="the connect thread to end")
    wait_for(
        lambda: {r["session"] for r in watcher.list_clients()} == {watcher.session},
        timeout_s=10,
        what="the cancelled connect's session to close",
    )


# -- a storm ---------------------------------------------------------------------


def test_a_thousand_cancelled_allocations_leak_nothing(
    make_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """1000 concurrent allocations (cache hits, 2 MiB ones that need the
    daemon, batches, an owner's, a few too large for the arena), cancelled
    in waves that reach the call the worker is in; after sync() the daemon's
    figures are back where they started."""
    daemon = make_daemon("1G")
    caplog.set_level(logging.DEBUG, logger="shmarena.aio")
    too_large = set(range(8, 1000, 50))

    def start(client: shmarena.aio.AsyncClient, owner: Any, i: int) -> Any:
        kind = i % 10
        if kind <= 3:
            return client.alloc(2 * MiB + i)
        if kind <= 5:
            return client.alloc(1 + (i * 37) % 60_000)
        if kind == 6:
            return client.alloc_many([100 + i, 2 * MiB])
        if kind == 7:
            return owner.alloc(2 * MiB)
        if i in too_large:
            return client.alloc(2 << 30)  # OutOfMemory
        return owner.alloc(1 + i)

    async def main() -> tuple[dict[str, int], dict[str, Any], dict[str, Any]]:
        async with connect(daemon) as client:
            owner = await client.owner("storm")
            base = await settled(client)
            tasks, cancelled = [], set()
            for i in range(1000):
                task = asyncio.ensure_future(start(client, owner, i))
                if i % 7 == 0:
                    task.cancel()  # before it ever ran
                    cancelled.add(task)
                tasks.append(task)
            spared = {tasks[i] for i in too_large if i % 7}  # these must get to OutOfMemory
            # Waves: once the worker finished a call, cancel the next 15
            # unfinished tasks in the order they were made; the first of them
            # is the call the worker is in, or whose result is on its way.
            while True:
                live = [t for t in tasks if not t.done() and t not in cancelled]
                if not live:
                    break
                await asyncio.wait(live, return_when=asyncio.FIRST_COMPLETED, timeout=30)
                wave = [t for t in tasks if not t.done() and t not in cancelled | spared]
                for task in wave[:15]:
                    task.cancel()
                    cancelled.add(task)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            counts = {"kept": 0, "cancelled": 0, "oom": 0}
            for result in results:
                if isinstance(result, asyncio.CancelledError):
                    counts["cancelled"] += 1
                elif isinstance(result, shmarena.OutOfMemory):
                    counts["oom"] += 1
                else:
                    assert isinstance(result, (shmarena.Buffer, list)), result
                    counts["kept"] += 1
                    await client.free(result)
            after = await settled(client)
            assert await client.check() == []
            return counts, base, after

    counts, base, after = run(main())
    undone = sum("undid the result" in r.getMessage() for r in caplog.records)
    print(f"storm: {counts}, undone by cancellation: {undone}")
    assert counts["kept"] and counts["cancelled"] and sum(counts.values()) == 1000
    assert counts["oom"] == len([i for i in too_large if i % 7])
    assert undone > 0, "no cancellation met a call in flight: the storm tested nothing"
    assert after["used_bytes"] == base["used_bytes"]
    assert after["live_blocks"] == base["live_blocks"]
    assert after["retained_only_blocks"] == 0
    assert aio_threads() == []


def test_import_shmarena_loads_asyncio_only_when_aio_is_used() -> None:
    code = (
        "import sys, shmarena\n"
        "assert 'asyncio' not in sys.modules, 'import shmarena imported asyncio'\n"
        "assert shmarena.aio.connect is __import__('shmarena.aio').aio.connect\n"
        "assert 'asyncio' in sys.modules\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# -- named buffers ----------------------------------------------------------------


def test_publish_lookup_names_unpublish(daemon: Daemon) -> None:
    async def main() -> None:
        async with connect(daemon) as client:
            buf = await client.alloc(2 * MiB)
            buf.view[:4] = b"name"
            handle = await client.publish("aio/one", buf, sealed=False)
            assert handle == buf.handle
            found = await client.lookup("aio/one")
            assert found.retained and bytes(found.view[:4]) == b"name"
            assert [r["name"] for r in await client.names("aio/")] == ["aio/one"]
            await client.release(found)
            await client.unpublish("aio/one")
            assert await client.names("aio/") == []
            with pytest.raises(shmarena.InvalidRequest, match="aio/one"):
                await client.lookup("aio/one")
            await client.free(buf)

    run(main())


def test_a_waiting_lookup_does_not_hold_up_the_client(daemon: Daemon) -> None:
    """The same client publishes while its own lookup waits for the name."""

    async def main() -> None:
        async with connect(daemon) as client:
            waiting = asyncio.ensure_future(client.lookup("aio/later", timeout=30))
            await asyncio.sleep(0)  # one loop turn: the lookup waits
            buf = await client.alloc(100)
            await client.publish("aio/later", buf)
            found = await waiting
            assert found.handle == buf.handle
            await client.release(found)
            await client.free(buf)
            with pytest.raises(shmarena.InvalidRequest, match="in all"):
                await client.lookup("aio/never", timeout=0.3)

    run(main())


def test_a_cancelled_lookup_releases_the_block(daemon: Daemon) -> None:
    writer = daemon.client()
    buf = writer.alloc(2 * MiB)
    writer.publish("aio/cancel", buf)

    async def main() -> None:
        async with connect(daemon) as reader:
            task = asyncio.ensure_future(reader.lookup("aio/cancel"))
            await asyncio.sleep(0)
            worker_done(reader)  # found and retained; the task has not resumed
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await reader.sync()
            writer.free(buf)  # while the reader's session lives on
            writer.sync()
            assert writer.stats()["retained_only_blocks"] == 0

    run(main())


def test_subscribe_is_an_async_iterator(daemon: Daemon) -> None:
    async def main() -> list[tuple[str, str]]:
        async with connect(daemon) as client:
            seen = []
            async with client.subscribe("aio/") as sub:
                with pytest.raises(TimeoutError):
                    await sub.get(timeout=0.1)
                buf = await client.alloc(100)
                await client.publish("aio/ev", buf)
                await client.free(buf)  # the name goes with its block
                async for event in sub:
                    seen.append((event.kind, event.name))
                    if len(seen) == 2:
                        break
            return seen

    assert run(main()) == [("publish", "aio/ev"), ("recycle", "aio/ev")]
    wait_for(lambda: aio_threads() == [], timeout_s=10, what="the subscription's thread to end")
