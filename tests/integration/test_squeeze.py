"""A cache whose blocks were asked back under pressure (client/cache.py
`squeeze`) keeps little for a while, against a real daemon: the frees that
follow go back to the arena, where best fit reuses them, instead of sitting in
the cache as holes; the first refill after SQUEEZE_S restores its limits."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import shmarena
from tests.conftest import Daemon

KIB = 1 << 10


def test_after_an_allocation_that_did_not_fit_the_cache_keeps_little(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon(size="256M")
    client = daemon.client()
    cache = client._cache
    assert cache is not None
    normal = (cache.cap, cache.large.budget)
    tight = (2 * cache.batch_bytes, cache.max_bytes)
    assert normal[0] > tight[0] and normal[1] > tight[1] and cache.squeezed is None
    bufs = []
    with pytest.raises(shmarena.OutOfMemory):
        while True:
            bufs.append(client.alloc(64 * KIB))
    assert (cache.cap, cache.large.budget) == tight  # drained on the way: squeezed
    client.free(bufs)
    assert cache.free_bytes <= tight[0]  # the rest went back to the arena
    client.sync()
    stats = client.stats()
    assert stats["requested_bytes"] == 0
    assert stats["used_bytes"] == 0 and stats["cached_bytes"] == cache.free_bytes
    # The squeeze is over: the first refill restores the limits.
    assert cache.squeezed is not None
    cache.squeezed = (*cache.squeezed[:2], cache.clock() - 1.0)
    client.alloc(8 * KIB).free()
    assert (cache.cap, cache.large.budget) == normal and cache.squeezed is None
    client.sync()
    assert client.check() == []
