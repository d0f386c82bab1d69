"""The Client's allocation paths: a cache hit (no round trip), a refill of a
size class (one FILL), a large block (a kept one, client/large.py, or one
carved for it by one FILL), a direct ALLOC (beyond the large-block budget,
labelled, detached, quota'd or waiting), and alloc_many (one round trip at
most; its large sizes are direct ALLOCs).

The cache (client/cache.py) hands out addresses and generations; Buffers are
built here, and only here for blocks of this session.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from shmarena.client.base import ClientBase
from shmarena.client.buffer import Buffer
from shmarena.client.cache import Cache
from shmarena.client.lifecycle import OWNED, STATES, State
from shmarena.errors import InvalidRequest, OutOfMemory, QuotaExceeded
from shmarena.limits import MAX_BATCH, MAX_WAIT_S
from shmarena.protocol import Op
from shmarena.shm.segments import SEGMENT_SHIFT, SEGMENT_SPAN

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def caller_site() -> str:
    """'file.py:LINE function' of the nearest caller outside shmarena."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return "?"
    code = frame.f_code
    return f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}"


def check_size(size: int) -> None:
    """InvalidRequest unless `size` is a positive int."""
    if type(size) is not int or size <= 0:
        raise InvalidRequest(f"buffer size must be a positive int of bytes, got {size!r}")


def _checked_sizes(sizes: Sequence[int]) -> list[int]:
    sizes = list(sizes)
    for size in sizes:
        check_size(size)
    if len(sizes) > MAX_BATCH:
        raise InvalidRequest(
            f"alloc_many takes at most {MAX_BATCH} sizes per call, got {len(sizes)}"
        )
    return sizes


def _fills_for(cache: Cache, sizes: list[int]) -> tuple[list[int], list[int]]:
    """What one FILL must bring for `sizes`: [class, count, needed, ...] for
    the classes the cache lacks, and the sizes too large for the cache."""
    wanted: dict[int, int] = {}
    large = []
    for size in sizes:
        if size <= cache.max_bytes:
            cls = cache.class_of(size)
            wanted[cls] = wanted.get(cls, 0) + 1
        else:
            large.append(size)
    fills: list[int] = []
    for cls, count in wanted.items():
        missing = cache.missing(cls, count)
        if missing:
            fills += (cls, min(4096, missing + cache.refill_count(cls)), missing)
    return fills, large


class Allocating(ClientBase):
    """alloc, alloc_many and the paths behind them."""

    def alloc(self, size: int, *, timeout: float | None = None, site: str | None = None) -> Buffer:
        """A buffer of exactly `size` bytes, owned by this session.

        Raises OutOfMemory (a MemoryError) when no free block is large enough;
        its message gives the largest free block and the free total. With
        `timeout` (seconds), an allocation that does not fit waits in the
        daemon, first come first served, until frees make room, and raises
        OutOfMemory only when the time is up. QuotaExceeded (an OutOfMemory)
        when it would take the session over its quota; that never waits.

        `site` labels the block with where it was allocated ("decoder"), shown
        per owner by `shmarena owners`, so a leak points at code; with
        $SHMARENA_TRACK_SITES=1 the caller's file, line and function are
        taken. A labelled allocation goes to the daemon (a round trip).
        """
        if timeout is not None or site or self.track_sites:
            return self._alloc_direct(size, None, False, timeout, site)
        cache = self._cache
        if cache is not None and type(size) is int and 0 < size <= cache.max_bytes:
            # Cache.hand_out(size, 0), inlined (a call and a tuple less on the
            # hottest path): keep the two in step.
            cls = cache.classes.get(size) or cache.class_of(size)
            lock = cache.lock
            address = gen = -1
            lock.acquire()
            try:
                free = cache.lists.get(cls)
                if free:
                    address = free.pop()
                    cache.free_bytes -= cls
                    gen = next(cache._gens)
                    cache.out[address] = [gen, size, 0, cls, False]
                    cache.unreported.append(address)
                    if not cache.dirty:
                        cache._queued()
            finally:
                lock.release()
            if gen < 0:  # a miss: refilled without the lock held
                return self._alloc_miss(size, 0, None)
            return Buffer(self, self.epoch, address, size, gen, OWNED, cache)
        return self._alloc_large(size, 0, None)

    def alloc_many(self, sizes: Sequence[int]) -> list[Buffer]:
        """Several buffers; all or none, one round trip at most."""
        return self._alloc_many(sizes, None, False, 0)

    def _from_cache(self, size: int, owner_id: int) -> Buffer | None:
        """A Buffer from this session's cache without a round trip, or None
        (no cache, a size it does not serve, or a miss)."""
        cache = self._cache
        if cache is None or type(size) is not int or not 0 < size <= cache.large_max:
            return None
        if size <= cache.max_bytes:
            got = cache.hand_out(size, owner_id)
        else:
            got = cache.hand_out_large(size, owner_id)
        if got is None:
            return None
        return Buffer(self, self.epoch, got[0], size, got[1], OWNED, cache)

    def _alloc_cached(self, size: int, owner_id: int, owner: str | None) -> Buffer:
        cache = self._cache
        if cache is not None and type(size) is int and 0 < size <= cache.max_bytes:
            got = cache.hand_out(size, owner_id)
            if got is not None:
                return Buffer(self, self.epoch, got[0], size, got[1], OWNED, cache)
            return self._alloc_miss(size, owner_id, owner)
        return self._alloc_large(size, owner_id, owner)

    def _alloc_large(self, size: int, owner_id: int, owner: str | None) -> Buffer:
        """A size above the size classes: a kept large block that fits it
        (client/large.py), else one carved for it as a block of this session's
        cache (one FILL), else (beyond the budget, or no cache) a direct ALLOC."""
        cache = self._cache
        if cache is None or type(size) is not int or not 0 < size <= cache.large_max:
            return self._alloc(size, owner, False)
        got = cache.hand_out_large(size, owner_id)
        while got is None:
            self._refill(cache, [cache.carve_size(size), 1, 1], [], owner)
            got = cache.hand_out_large(size, owner_id)  # None: another thread took it
            if got is None and cache is not self._cache:  # forked meanwhile
                return self._alloc(size, owner, False)
        return Buffer(self, self.epoch, got[0], size, got[1], OWNED, cache)

    def _alloc_miss(self, size: int, owner_id: int, owner: str | None) -> Buffer:
        """Refill the class (one round trip), then take from it."""
        while True:
            cache = self._cache
            if cache is None:  # forked: the next request opens our own session
                return self._alloc(size, owner, False)
            cls = cache.class_of(size)
            self._refill(cache, [cls, cache.refill_count(cls), 1], [], owner)
            got = cache.hand_out(size, owner_id)
            if got is not None:  # else another thread took them first: again
                return Buffer(self, self.epoch, got[0], size, got[1], OWNED, cache)

    def _refill(
        self, cache: Cache, fills: list[int], sizes: list[int], owner: str | None
    ) -> list[list[int]]:
        """One FILL round trip (two when the arena is full, see `_request_room`:
        the daemon takes what is needed and only as many more as fit)."""
        taken, direct, notices = self._request_room(Op.FILL, fills, cache.mark(), sizes, owner)
        for addresses in taken:  # map new segments before their blocks are handed out
            if addresses and max(addresses) >= SEGMENT_SPAN:
                for segment in {a >> SEGMENT_SHIFT for a in addresses} - self._views.keys():
                    self._segment_view(segment)
        cache.notice(notices)
        for i, addresses in enumerate(taken):
            cache.add(fills[3 * i], addresses)
        return direct  # type: ignore[no-any-return]

    def _alloc(self, size: int, owner: str | None, detached: bool, site: str = "") -> Buffer:
        check_size(size)
        if site:
            (wire,) = self._request_room(Op.ALLOC, size, owner, detached, 0.0, site)
        else:
            (wire,) = self._request_room(Op.ALLOC, size, owner, detached)
        return self._buffer(wire, OWNED)

    def _alloc_direct(
        self,
        size: int,
        owner: str | None,
        detached: bool,
        timeout: float | None,
        site: str | None,
    ) -> Buffer:
        """An allocation the daemon makes itself (no cache): one that may wait,
        is labelled with its site, or goes to a detached or quota'd owner."""
        if site is None and self.track_sites:
            site = caller_site()
        if timeout is not None:
            return self._alloc_waiting(size, owner, detached, timeout, site or "")
        return self._alloc(size, owner, detached, site or "")

    def _alloc_waiting(
        self, size: int, owner: str | None, detached: bool, timeout: float, site: str = ""
    ) -> Buffer:
        """An ALLOC the daemon keeps until it fits or `timeout` runs out. What
        this process's cache holds goes back first: waiting while holding
        free blocks would be waiting for ourselves."""
        check_size(size)
        if not timeout >= 0:
            raise ValueError(f"timeout must be 0 or more seconds, got {timeout}")
        wait_s = min(float(timeout), MAX_WAIT_S)
        try:
            (wire,) = self._request(Op.ALLOC, size, owner, detached, 0.0, site)
        except OutOfMemory as error:
            if isinstance(error, QuotaExceeded) or wait_s <= 0:
                raise
            cache = self._cache
            if cache is not None:
                cache.drain_all()
            (wire,) = self._request(
                Op.ALLOC, size, owner, detached, wait_s, site, timeout_s=wait_s + self.timeout_s
            )
        return self._buffer(wire, OWNED)

    def _request_room(self, op: Op, *args: Any) -> list[Any]:
        """An allocating request; on OutOfMemory, give this process's cached
        blocks back to the arena and try once more."""
        try:
            return self._request(op, *args)
        except OutOfMemory:
            cache = self._cache
            if cache is None or not cache.drain_all():
                raise
            return self._request(op, *args)

    def _alloc_many(
        self,
        sizes: Sequence[int],
        owner: str | None,
        detached: bool,
        owner_id: int,
        direct: bool = False,
    ) -> list[Buffer]:
        sizes = _checked_sizes(sizes)
        if not sizes:
            return []
        cache = self._cache
        if cache is None or detached or direct or not cache.max_bytes:
            (wires,) = self._request_room(Op.ALLOC_MANY, sizes, owner, detached)
            return [self._buffer(w, OWNED) for w in wires]
        # Count what the cache lacks per class; one FILL brings it, together
        # with the sizes too large for the cache; then every cached size hits.
        fills, large = _fills_for(cache, sizes)
        uncached: list[list[int]] = []
        if fills or large:
            uncached = self._refill(cache, fills, large, owner)
        direct_iter = iter(uncached)
        return [
            self._buffer(next(direct_iter), OWNED)
            if size > cache.max_bytes
            else self._alloc_cached(size, owner_id, owner)
            for size in sizes
        ]

    def _buffer(self, wire: list[int], state: State | str) -> Buffer:
        """A Buffer over the block a daemon reply or a handle names (mapping
        its segment first if need be)."""
        _, segment, offset, size, gen = wire
        self._segment_view(segment)  # mapped now: a view of it is made on first use
        address = segment << SEGMENT_SHIFT | offset
        state = STATES[state]
        buf = Buffer(self, self.epoch, address, size, gen, state, None)
        if state is OWNED:
            self._viewed[address] = buf  # a recycle here marks it done (cheap next to the trip)
            if len(self._viewed) >= self._prune_at:
                self._prune_viewed()
        return buf

    def _prune_viewed(self) -> None:
        """Forget the Buffers of the table nobody else references and that
        made no view (their blocks may have been freed by another process,
        which this one never hears of): nothing can use them any more."""
        viewed = self._viewed
        for address in list(viewed):
            buf = viewed.get(address)
            # references: the table, `buf`, getrefcount's argument
            if buf is not None and buf._view is None and sys.getrefcount(buf) <= 3:
                del viewed[address]
        self._prune_at = max(1024, 2 * len(viewed))
