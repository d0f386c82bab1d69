"""The Client's frees, and the pin rule (client/buffer.py) on its side.

A free is routed by where the block came from: a Buffer of this session's
cache goes back to the cache (no message), any other block is freed by the
daemon without waiting (a one-way event). A block this process still has
views of is pinned instead of reused, and unpinned when the last view dies
(a weak reference's callback queues the UNPIN on the registry's worker).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable
from typing import Any

from shmarena.client import registry
from shmarena.client.base import ClientBase
from shmarena.client.buffer import Buffer
from shmarena.client.cache import INLINE_FREE_BYTES, Cache
from shmarena.client.handles import as_handle, other_epoch
from shmarena.client.lifecycle import DONE, OWNED, move, refusal
from shmarena.client.owners import Recycled
from shmarena.errors import lifetime_error
from shmarena.protocol import GEN_SHIFT, PIN, UNPIN, Handle, Op
from shmarena.shm import gens
from shmarena.shm.segments import OFFSET_MASK, SEGMENT_SHIFT


class Freeing(ClientBase):
    """free, and what the pin rule needs of the client."""

    def free(self, target: Buffer | Handle | Iterable[Buffer | Handle]) -> Recycled:
        """Free one buffer or handle, or many at once.

        A buffer from this process's cache goes back to it at once. Any other
        block is freed by the daemon, without waiting for its answer: a refusal
        (StaleHandle: it was freed or recycled already) is raised by the next
        call. Buffers are all checked before any is freed. Returns the number
        of blocks and bytes (as carved) given back.

        A block this process still has views of (a slice of `buf.view`, an
        array from `buf.ndarray`, a reader chunk ...) is not reused until the
        last of them is gone: it is *pinned* (`stats()["pinned_bytes"]`) and
        freed by itself then. The Buffer is done at once either way.
        """
        items = [target] if isinstance(target, (Buffer, Handle)) else list(target)
        self._check_frees(items)
        total = 0
        for item in items:
            if isinstance(item, Buffer):
                total += self._free_buffer(item)
            else:
                total += self._free_handle(as_handle(item))
        return Recycled(len(items), total)

    def _check_frees(self, items: list[Buffer | Handle]) -> None:
        """Refuse the whole free before anything is freed: a block of another
        epoch, a Buffer freed already, or one Buffer twice."""
        seen = set()
        for item in items:
            if not isinstance(item, Buffer):
                epoch = as_handle(item).epoch
                if epoch != self.epoch:
                    raise other_epoch(epoch, self.epoch, "free")
                continue
            if item._epoch != self.epoch:
                raise other_epoch(item._epoch, self.epoch, "free")
            if item._state == DONE:
                raise refusal(item, "free")
            if id(item) in seen:
                raise lifetime_error(
                    "double_free",
                    f"free of {len(items)} buffers",
                    f"{item!r} appears twice in it; nothing was freed",
                )
            seen.add(id(item))

    def _free_buffer(self, buf: Buffer) -> int:
        if buf._state == DONE:
            raise refusal(buf, "free")
        if buf._epoch != self.epoch:
            raise other_epoch(buf._epoch, self.epoch, "free")
        cache = buf._cache
        if cache is not None and cache is self._cache:
            return self._take_back(buf, cache)
        address = buf._address
        if self._viewed.get(address) is buf:
            del self._viewed[address]
        segment, offset = address >> SEGMENT_SHIFT, address & OFFSET_MASK
        handle = (self.epoch, segment, offset, buf._size, buf._gen)
        if buf._state == OWNED:  # attach refuses it from now on, not once the daemon heard
            self._gentables.mark(address, buf._gen, gens.FREED)
        pin = buf._release_views()
        if pin is not None and self._cache is not None:
            # Views of it outlive the Buffer: pinned, freed, unpinned when they go.
            self._cache.post(PIN, address, buf._gen)
            self._watch(pin, address, buf._gen)
        carved = self._post_free(handle)
        buf._done("free")
        return carved

    def _take_back(self, buf: Buffer, cache: Cache) -> int:
        """Free a Buffer of this session's cache that made a view or whose
        handle was read (Buffer.free takes the plain case itself); its class
        bytes."""
        if buf._state == DONE:
            raise refusal(buf, "free")
        address = buf._address
        view = buf._view
        if view is not None:  # views were made: they may outlive the Buffer
            pin = buf._pin
            buf._view = buf._pin = None
            self._viewed.pop(address, None)  # one Buffer per block out of this cache
            try:
                view.release()
                pin.release()  # type: ignore[union-attr]
            except BufferError:  # views made from it live on: keep the block
                cls = cache.free_pinned(address, buf._gen, buf._size)
                move(buf, "free")
                self._watch(pin, address, buf._gen)  # type: ignore[arg-type]
                return cls
        if buf._handle is not None:  # its handle may be elsewhere
            now = buf._size >= INLINE_FREE_BYTES
            cls = cache.free_through_daemon(address, buf._gen, buf._size, freed=False, now=now)
            move(buf, "free")  # its views are released already
            if now:
                self._send_now(cache)
            return cls
        cls = cache.give_back(address, buf._gen)
        move(buf, "free")  # its views are released already
        return cls

    def _send_now(self, cache: Cache) -> None:
        """Send a large block's free at once, without waiting for a reply, so
        the daemon's notice gives it back before this thread asks for the next
        one; the flusher's delay would make a pipeline carve a fresh block."""
        transport = self._transport
        try:
            if transport is None or not self._ours():
                raise LookupError("no transport of this process")
            transport.flush()
        except Exception:  # noqa: BLE001 - as the flusher: the next call that waits reports
            cache.unsent()

    def _free_handle(self, handle: Handle) -> int:
        address = handle.segment << SEGMENT_SHIFT | handle.offset
        buf = self._viewed.get(address) if 0 <= handle.offset <= OFFSET_MASK else None
        if buf is not None and buf._gen == handle.generation and buf._size == handle.size:
            return self._free_buffer(buf)  # its views here are checked as for buf.free()
        cache = self._cache
        if cache is not None and handle.generation >> GEN_SHIFT == self.session:
            if not 0 <= handle.offset <= OFFSET_MASK or handle.segment < 0:
                raise cache.stale(handle.offset, handle.generation, raw=True)
            # Made by this very cache: it knows whether the block is still out.
            now = handle.size >= INLINE_FREE_BYTES
            cls = cache.free_through_daemon(address, handle.generation, handle.size, now=now)
            if now:
                self._send_now(cache)
            return cls
        return self._post_free(tuple(handle))  # type: ignore[arg-type]

    def _post_free(self, handle: tuple[int, int, int, int, int]) -> int:
        cache = self._cache
        if cache is None:  # forked: open our own session first
            self._request(Op.PING)
            cache = self._cache
            assert cache is not None
        cache.post_free(handle)
        unit = cache.min_block
        return -(-handle[3] // unit) * unit

    # -- the pin rule (client/buffer.py) -------------------------------------

    def _forget_views(self, event: str) -> None:
        """The session ends (`event`: "close"): its Buffers are done and its
        pins go with it (the daemon drops a session's pins when it ends).
        Views made from them must not outlive the session: their blocks may
        be reused."""
        viewed = list(self._viewed.values())
        self._viewed.clear()
        for buf in viewed:
            buf._done(event)
        self._pins.clear()
        cache = self._cache
        if cache is not None:
            cache.forget_out()  # so its other Buffers refuse a view too

    def _watch(self, pin: memoryview, address: int, gen: int) -> None:
        """Unpin the block once `pin`, kept alive only by the views made from
        it, is gone. The callback may run anywhere (in the garbage collector,
        inside a lock holder): it takes no lock and sends nothing, it only
        queues the work for the registry's worker thread."""
        registry.start_worker()
        pins, session = self._pins, self.session

        def gone(ref: weakref.ref[memoryview], queue_unpin: Any = registry.queue_unpin) -> None:
            pins.pop(id(ref), None)
            # Not contextlib.suppress: at interpreter shutdown, module globals may be gone.
            try:  # noqa: SIM105
                queue_unpin(self, session, address, gen)
            except Exception:  # noqa: BLE001 - at shutdown the session ends, and its pins too
                pass

        ref = weakref.ref(pin, gone)
        pins[id(ref)] = ref

    def _unpin(self, session: int, address: int, gen: int) -> None:
        """The last view of a pinned block is gone (on the worker thread)."""
        cache = self._cache
        if cache is None or self._closed or session != self.session or not self._ours():
            return  # that session is over, and its pins with it
        cache.post(UNPIN, address, gen)

    def _ours(self) -> bool:
        """Whether this process is the one the session belongs to (not a forked child)."""
        return self._pid == os.getpid()

    def _recall(self, cache: Cache, address: int, gen: int) -> bool:
        """The daemon gave back a block of `cache` (see Cache.notice): this
        process's Buffer of it is done, and True if views of it live on (the
        cache keeps it out, pinned, and it is watched)."""
        buf = self._viewed.get(address)
        if buf is None or buf._gen != gen or buf._cache is not cache:
            return False
        del self._viewed[address]
        pin = buf._release_views()
        buf._done("recycle")
        if pin is None:
            return False
        self._watch(pin, address, gen)
        return True

    def _pin_owner(self, name: str) -> list[Buffer]:
        """Before a recycle of `name` by this process: release the views of
        its Buffers here and pin the blocks whose views outlive them. The
        Buffers, to be marked done once the recycle went through."""
        implicit = name == f"session-{self.session}"
        found = [
            b
            for b in list(self._viewed.values())
            if b._owner == name or (implicit and b._owner is None)
        ]
        cache = self._cache
        for buf in found:
            address = buf._address
            if self._viewed.get(address) is buf:
                del self._viewed[address]
            pin = buf._release_views()
            if pin is None or cache is None:
                continue
            if buf._cache is cache:
                cache.pin_out(address, buf._gen)
            else:
                cache.post(PIN, address, buf._gen)
            self._watch(pin, address, buf._gen)
        return found
