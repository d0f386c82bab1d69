"""shmarena.Queue without a round trip per message (shmarena/queue_stream.py,
daemon/queues.py): one-way batched puts within reserved room, gets that take
messages ahead and acknowledge them one-way. Real daemon, real processes."""

from __future__ import annotations

import contextlib
import queue as stdlib_queue
import signal
import subprocess

import pytest

import shmarena
from shmarena.protocol import Op
from shmarena.queue_stream import stream_of
from tests.conftest import Daemon, wait_for

# Takes `count` messages with get() (so that it takes ahead: a producer put
# them all first) and prints each, then says how many it holds taken ahead
# and blocks until killed.
HOLDER = """
import sys, shmarena
from shmarena.queue_stream import stream_of
q = shmarena.Queue(name=sys.argv[1])
for _ in range(int(sys.argv[2])):
    print(q.get(timeout=30), flush=True)
stream = stream_of(q._data())
stream.flush()  # the acks of what it handed out: sent before it says so
q.qsize()  # ... and applied: a round trip after them on the same socket
print("ahead", len(stream.ahead.get(q.name, ())), flush=True)
sys.stdin.read()
"""


def test_puts_of_one_producer_arrive_in_order_and_qsize_sees_them(daemon: Daemon) -> None:
    client = daemon.client()
    q = shmarena.Queue(client=client)
    for i in range(1500):  # more than one reservation of room, several frames
        q.put(i)
        if i in (0, 99, 1499):
            assert q.qsize() == i + 1  # exact at once, in the putting process
    other = shmarena.Queue(name=q.name, client=daemon.client())
    assert other.qsize() == 1500
    assert [other.get(timeout=10) for _ in range(1500)] == list(range(1500))
    assert other.qsize() == 0 and q.empty()
    assert client.check() == []
    other.close()
    q.close()


def test_a_consumer_killed_with_messages_taken_ahead_loses_none(daemon: Daemon) -> None:
    client = daemon.client()
    q = shmarena.Queue(client=client)
    for i in range(200):
        q.put(i)
    assert q.qsize() == 200
    holder = daemon.python(HOLDER, q.name, "10", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout is not None
    got = [int(holder.stdout.readline()) for _ in range(10)]
    tag, ahead = holder.stdout.readline().split()
    assert tag == "ahead" and int(ahead) > 0  # it did take some ahead
    assert got == list(range(10))
    # What it holds ahead still counts as queued, and nobody else gets it.
    assert q.qsize() == 190
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    assert holder.stdin is not None
    holder.stdin.close()
    holder.stdout.close()
    rest = [q.get(timeout=10) for _ in range(190)]
    assert rest == list(range(10, 200))  # back at the front, in order, once each
    with pytest.raises(stdlib_queue.Empty):
        q.get_nowait()
    wait_for(lambda: client.stats()["sessions"] == 1, what="the holder's session to end")
    assert client.check() == []
    q.close()


def test_a_bounded_queue_still_bounds_one_way_puts(daemon: Daemon) -> None:
    client = daemon.client()
    q = shmarena.Queue(32, client=client)  # room reserved 4 puts at a time
    for i in range(32):
        q.put(i, timeout=5)
    assert q.qsize() == 32 and q.full()
    with pytest.raises(shmarena.QueueFull, match="stayed full"):
        q.put(32, timeout=0.05)
    with pytest.raises(stdlib_queue.Full):
        q.put_nowait(32)
    consumer = shmarena.Queue(name=q.name, client=daemon.client())
    assert [consumer.get(timeout=5) for _ in range(8)] == list(range(8))
    for i in range(32, 40):  # room again: the puts go on
        q.put(i, timeout=5)
    assert q.qsize() == 32
    assert client.stats()["queues"][0]["qsize"] <= 32
    assert [consumer.get(timeout=5) for _ in range(32)] == list(range(8, 40))
    assert client.check() == []
    consumer.close()
    q.close()


def test_a_refused_one_way_put_is_raised_by_the_next_call(daemon: Daemon) -> None:
    client = daemon.client()
    # In band (the threshold is far above them) and small enough to go one-way:
    # 30 KiB each, so the 16 MiB bound on one queue's in-band bytes is passed
    # at about the 545th.
    q = shmarena.Queue(client=client, threshold=1 << 30)
    payload = b"x" * (30 << 10)
    with pytest.raises(shmarena.LimitReached) as refused:
        for _ in range(640):
            q.put(payload)
        q.qsize()
    text = str(refused.value)
    assert "queued_payload_bytes_per_queue" in text and q.name in text
    assert refused.value.details["limit"] == "queued_payload_bytes_per_queue"
    with contextlib.suppress(shmarena.LimitReached):
        q.qsize()  # refusals of frames sent before the first one came back
    left = q.qsize()  # each refusal is raised once; the queue goes on
    assert 500 < left < 560
    q.get(timeout=5)
    q.put(b"small")
    assert q.qsize() == left
    assert client.check() == []
    q.close()


def test_close_puts_back_what_was_taken_ahead(daemon: Daemon) -> None:
    client = daemon.client()
    q = shmarena.Queue(client=client)
    for i in range(100):
        q.put(i)
    taker_client = daemon.client()
    taker = shmarena.Queue(name=q.name, client=taker_client)
    assert [taker.get(timeout=5) for _ in range(5)] == list(range(5))
    assert len(stream_of(taker_client).ahead.get(q.name, ())) > 0
    taker.close()
    assert q.qsize() == 95
    assert [q.get(timeout=5) for _ in range(95)] == list(range(5, 100))
    assert client.check() == []
    q.close()


def test_the_daemon_refuses_malformed_one_way_queue_requests(daemon: Daemon) -> None:
    client = daemon.client()
    q = shmarena.Queue(client=client)
    with pytest.raises(shmarena.InvalidRequest, match="ack of 3"):
        client._request(Op.QACK, q.name, 3)  # nothing taken ahead
    with pytest.raises(shmarena.InvalidRequest, match="payload, handles pairs"):
        client._request(Op.QPUTS, q.name, [b"one"])
    with pytest.raises(shmarena.InvalidRequest, match="MAX_QUEUE_CREDIT"):
        client._request(Op.QRESERVE, q.name, 1 << 20, 0.0)
    assert q.qsize() == 0
    assert client.check() == []
    q.close()


# Gets `count` (i, array) messages and prints whether each array holds only i.
CHECKER = """
import sys, shmarena
q = shmarena.Queue(name=sys.argv[1])
for _ in range(int(sys.argv[2])):
    i, array = q.get(timeout=30)
    print(i, bool((array == i).all()), flush=True)
"""


def _spied(client: shmarena.Client) -> list[Op]:
    """The ops `client` will ask the daemon and wait for, from now on."""
    asked: list[Op] = []
    request = client._request

    def spy(op: Op, *args: object, **kwargs: object) -> list[object]:
        asked.append(op)
        return request(op, *args, **kwargs)  # type: ignore[arg-type]

    client._request = spy  # type: ignore[method-assign]
    return asked


@pytest.mark.parametrize(("cache", "size"), [(True, 64 << 10), (True, 1 << 20), (False, 1 << 20)])
def test_a_put_naming_its_own_blocks_goes_one_way_and_outlives_their_free(
    daemon: Daemon, cache: bool, size: int
) -> None:
    # The put leaves before the free on the same socket, so the queue's
    # reference is taken first: the block is not reused while queued.
    np = pytest.importorskip("numpy")
    client = daemon.client(cache=cache)
    q = shmarena.Queue(client=client)
    asked = _spied(client)
    for i in range(12):
        buf = client.alloc(size)
        array = buf.ndarray(dtype=np.uint8)
        array[:] = i
        q.put((i, array))
        del array
        buf.free()  # at once: the blocks of the next puts may reuse its room
    assert Op.QPUT not in asked  # named in place, sent one-way
    checker = daemon.python(CHECKER, q.name, "12", stdout=subprocess.PIPE)
    out, _ = checker.communicate(timeout=60)
    assert checker.returncode == 0
    assert out.split("\n")[:12] == [f"{i} True" for i in range(12)]
    assert client.check() == []
    q.close()


def test_a_put_naming_blocks_of_another_client_waits_for_the_daemon(daemon: Daemon) -> None:
    # Their free could leave on the other client's socket before the put.
    np = pytest.importorskip("numpy")
    client, other = daemon.client(), daemon.client()
    q = shmarena.Queue(client=client)
    asked = _spied(client)
    buf = other.alloc(1 << 20)
    array = buf.ndarray(dtype=np.uint8)
    array[:] = 3
    q.put((3, array))
    assert Op.QPUT in asked
    del array
    buf.free()
    i, got = q.get(timeout=10)
    assert i == 3 and bool((got == 3).all())
    q.close()
