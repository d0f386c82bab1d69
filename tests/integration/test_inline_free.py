"""A large block whose handle crossed to another process is freed through the
daemon, and that free is sent at once by the freeing thread (client/freeing.py
`_send_now`), not left for the flusher: the block's notice brings it back to
the producer's kept large blocks, so the next frame reuses it without a FILL.
Smaller blocks keep waiting for the flusher (one message per burst)."""

from __future__ import annotations

from collections.abc import Callable

import shmarena
from shmarena.client.cache import INLINE_FREE_BYTES
from shmarena.testing import wait_until
from tests.conftest import Daemon

MIB = 1 << 20

# A reader that attaches the frame (no retain), reads it and leaves.
READER = """
import shmarena, sys
c = shmarena.connect()
assert bytes(c.attach(shmarena.Handle(*map(int, sys.argv[1:]))).view[:5]) == b"frame"
c.close()
"""


def fills(client: shmarena.Client) -> int:
    return int(client.stats()["counters"]["ops"].get("fill", 0))


def test_a_crossed_large_frame_comes_back_to_the_producer_without_a_fill(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon(size="256M")
    producer = daemon.client()
    cache = producer._cache
    assert cache is not None
    cache.decay_s = 60.0  # a slow machine must not give the block back meanwhile
    buf = producer.alloc(16 * MIB)
    buf.view[:5] = b"frame"
    handle, offset = buf.handle, buf.offset
    assert daemon.python(READER, *map(str, handle)).wait(60) == 0
    producer.sync()
    before = fills(producer)
    woken: list[bool] = []
    cache.wake = lambda: woken.append(True)  # the flusher is not asked from here on
    buf.free()
    assert cache.pending == [] and woken == []  # sent by this thread, nothing queued
    wait_until(lambda: offset in cache.large.freed_at, 30, "the frame's notice")
    again = producer.alloc(16 * MIB)
    assert again.offset == offset  # the same frame, from the kept blocks
    again.free()
    producer.sync()
    assert fills(producer) == before
    stats = producer.stats()
    assert stats["used_bytes"] == 0 and stats["cached_bytes"] == 16 * MIB
    assert producer.check() == []


def test_a_crossed_small_block_still_waits_for_the_flusher(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon(size="64M")
    producer = daemon.client()
    cache = producer._cache
    assert cache is not None
    buf = producer.alloc(65536)
    assert 65536 < INLINE_FREE_BYTES
    buf.view[:5] = b"frame"
    handle = buf.handle
    assert daemon.python(READER, *map(str, handle)).wait(60) == 0
    producer.sync()
    woken: list[bool] = []
    cache.wake = lambda: woken.append(True)  # the flusher is not asked from here on
    buf.free()
    assert cache.pending and woken == [True]  # queued, and the flusher asked to send it
    producer.sync()
    assert producer.stats()["used_bytes"] == 0
    assert producer.check() == []


def test_a_failed_send_leaves_the_free_to_the_flusher(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon(size="256M")
    producer = daemon.client()
    cache, transport = producer._cache, producer._transport
    assert cache is not None and transport is not None
    buf = producer.alloc(16 * MIB)
    buf.view[:5] = b"frame"
    assert daemon.python(READER, *map(str, buf.handle)).wait(60) == 0
    producer.sync()
    woken: list[bool] = []
    cache.wake = lambda: woken.append(True)

    def broken() -> None:
        raise shmarena.DaemonUnavailable("a send that failed (this test)")

    transport.flush = broken  # type: ignore[method-assign]
    buf.free()  # the failure is not the free's: it is reported by a later call
    assert cache.pending and woken == [True]
    del transport.flush  # the class's again
    producer.sync()
    assert producer.stats()["used_bytes"] == 0
    assert producer.check() == []
