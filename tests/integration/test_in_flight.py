"""Several requests of one client in flight on its one socket: a waiting
`Queue.get`, a subscription's `get` and an asyncio lookup cost no session and
no thread of their own, and every waiter is answered when its item comes."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import shmarena
import shmarena.aio
from tests.conftest import Daemon, wait_for


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def wait_many(client: shmarena.Client, count: int, tag: str) -> dict[str, int]:
    """`count` threads in Queue.get, `count` subscriptions each with a thread
    in get, `count` asyncio lookups in flight; the process's threads (less
    the ones this test made) and the daemon's sessions while they wait."""
    queue = shmarena.Queue(client=client)
    subs = [client.subscribe(f"{tag}/{i}/") for i in range(count)]
    got: list[Any] = []
    lock = threading.Lock()

    def take(get: Any) -> None:
        item = get(timeout=60)
        with lock:
            got.append(item)

    made = [threading.Thread(target=take, args=(queue.get,)) for _ in range(count)]
    made += [threading.Thread(target=take, args=(sub.get,)) for sub in subs]
    loop = asyncio.new_event_loop()
    aclient = loop.run_until_complete(
        shmarena.aio.connect(client.name, runtime_dir=client.runtime_dir)
    )
    lookups = [loop.create_task(aclient.lookup(f"{tag}/aio/{i}", timeout=60)) for i in range(count)]
    loop_thread = threading.Thread(target=loop.run_until_complete, args=(asyncio.gather(*lookups),))
    for thread in [*made, loop_thread]:
        thread.start()
    # 3 * count requests kept by the daemon: every waiter is waiting now
    wait_for(lambda: client.stats()["waiting_requests"] == 3 * count, what="the waiters")
    figures = {
        "python_threads": threading.active_count() - len(made) - 1,
        "os_threads": os_threads() - len(made) - 1,
        "sessions": client.stats()["sessions"],
    }
    for i in range(count):
        queue.put(i)
        client.publish(f"{tag}/{i}/x", client.alloc(4096))
        client.publish(f"{tag}/aio/{i}", client.alloc(4096))
    for thread in [*made, loop_thread]:
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert sorted(x for x in got if isinstance(x, int)) == list(range(count))
    events = [x for x in got if not isinstance(x, int)]
    assert sorted(e.name for e in events) == sorted(f"{tag}/{i}/x" for i in range(count))
    found = [task.result() for task in lookups]
    assert [buf.size for buf in found] == [4096] * count
    for buf in found:
        buf.release()
    loop.run_until_complete(aclient.close())
    loop.close()
    for sub in subs:
        sub.close()
    queue.close()
    return figures


def test_waiting_calls_cost_no_session_and_no_thread(daemon: Daemon) -> None:
    client = daemon.client()
    wait_many(client, 1, "warm")  # the client's own threads (its flusher) start once
    one = wait_many(client, 1, "one")
    eight = wait_many(client, 8, "eight")
    print(f"\nFIGURE: 1 waiter of each kind {one}, 8 of each kind {eight}")
    assert one == eight


def test_clients_share_one_context_and_leave_no_descriptor(daemon: Daemon) -> None:
    """Every Client of the process uses the one ZeroMQ Context: clients add
    no thread, and a closed one leaves no descriptor behind."""
    first = daemon.client()
    first.ping()
    threads, fds = os_threads(), len(os.listdir("/proc/self/fd"))
    clients = [daemon.client() for _ in range(8)]
    for client in clients:
        client.ping()
    assert os_threads() == threads  # no I/O thread per client
    for client in clients:
        client.close()
    # ZeroMQ's reaper thread closes a socket's own descriptors just after
    wait_for(lambda: len(os.listdir("/proc/self/fd")) == fds, what="the descriptors to close")
    first.close()


def test_a_wait_in_flight_survives_a_reconnect_without_taking_twice(daemon: Daemon) -> None:
    """A thread waits in Queue.get while another reconnects the client: the
    get goes on over the new socket as the same request (the daemon keeps it
    and answers it there), so no message is taken twice or lost."""
    client = daemon.client()
    queue = shmarena.Queue(client=client)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(queue.get(timeout=60)))
    waiter.start()
    wait_for(lambda: client.stats()["waiting_requests"] == 1, what="the get to wait")
    session = client.session
    client.reconnect()
    assert client.session == session  # the same session, from a new socket
    queue.put("first")
    queue.put("second")
    waiter.join(timeout=60)
    assert got == ["first"]
    assert queue.get(timeout=10) == "second"
    assert client.stats()["waiting_requests"] == 0
    queue.close()


def test_an_asyncio_lookup_in_flight_survives_a_reconnect(daemon: Daemon) -> None:
    """The same for a waiting asyncio lookup: it is answered once, over the
    new socket, and holds the only reference it took."""
    writer = daemon.client()

    async def main() -> None:
        aclient = await shmarena.aio.connect(daemon.name, runtime_dir=daemon.run_dir)
        waiting = asyncio.ensure_future(aclient.lookup("re/one", timeout=60))
        client = aclient.sync_client
        while client.stats()["waiting_requests"] != 1:
            await asyncio.sleep(0.01)
        await aclient.reconnect()
        buf = writer.alloc(4096)
        writer.publish("re/one", buf)
        found = await asyncio.wait_for(waiting, 60)
        assert found.handle == buf.handle
        await aclient.release(found)
        await aclient.sync()
        writer.free(buf)
        writer.sync()
        assert writer.stats()["retained_only_blocks"] == 0
        assert writer.stats()["waiting_requests"] == 0
        await aclient.close()

    asyncio.run(main())
