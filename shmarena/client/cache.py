"""The per-process fast path: size classes, batched refill and drain, and
batched bookkeeping. No I/O here: the client does the round trips.

Sizes up to `max_bytes` are served from free lists of *size classes*. A class
is a whole number of minimum blocks: up to 8 minimum blocks every multiple,
above that 8 classes per power of two, so a class exceeds the size it serves
by less than 1/8 (12.5 %) beyond the page rounding every allocation pays.

A hit is a list pop (alloc) or push (free) under a lock, plus a few dict
operations; nothing is sent. What the daemon must know (which owner a block
went to, that it came back) queues up as *events* and leaves in batches
(`take_events`), before any synchronous request of the client and at the
latest `FLUSH_DELAY_S` after the first one queued (the client's flusher thread).

Two shortcuts keep the daemon's work small without making it wrong:
- a block handed out and given back before the next flush, whose handle never
  left the process (nobody read `Buffer.handle`), is never reported at all;
  the daemon's state after the flush is the same either way;
- a block whose handle did leave goes back to the cache only when the daemon
  says so (a *notice*), because another process may still retain it.

A block this process still has views of is never pushed back on a free list
(client/buffer.py, the pin rule): its free is reported (hand-out, PIN, FREE)
and the block comes back by a notice after the client's UNPIN; a notice for
a block with live views here is not pushed either, but pinned the same way.

Generations of the blocks this cache hands out are numbered in the session's
own space (``session << GEN_SHIFT | counter``), so no round trip is needed to
get one and no other process can make the same.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shmarena.client.buffer import Buffer
from shmarena.errors import StaleHandle, lifetime_error
from shmarena.protocol import (
    ASSIGN,
    DRAIN,
    EVENT_LENGTH,
    FREE_EVENT,
    GEN_SHIFT,
    PIN,
    UNASSIGN,
    Op,
)
from shmarena.shm.gens import FREED, LIVE
from shmarena.shm.segments import SEGMENT_SHIFT, SEGMENT_SPAN

if TYPE_CHECKING:
    from shmarena.client.client import Client

CACHE_MAX_BYTES = 1 << 20  # largest size served from the cache
BATCH_BYTES = 2 << 20  # what one refill of a class aims to carve
MAX_BATCH_BLOCKS = 64
MAX_CACHED_BYTES = 64 << 20  # free bytes one process's cache holds at most (or 1/16 arena)
FLUSH_DELAY_S = 0.005  # bookkeeping reaches the daemon this long after it happened, at most
POST_CHUNK = 16384  # integers per POST message (well under MAX_EVENTS and the frame limit)


def size_class(size: int, min_block: int) -> int:
    """The class that serves `size`: page rounding up to 8 minimum blocks, then
    8 classes per power of two."""
    if size <= 8 * min_block:
        return -(-size // min_block) * min_block
    step = 1 << ((size - 1).bit_length() - 4)
    return -(-size // step) * step


def split_events(flat: list[int], limit: int = POST_CHUNK) -> list[list[int]]:
    """Cut a flat event list into POST bodies of at most `limit` integers,
    at event boundaries."""
    chunks: list[list[int]] = []
    start = index = 0
    end = len(flat)
    while index < end:
        step = EVENT_LENGTH[flat[index]]
        if index + step - start > limit:
            chunks.append(flat[start:index])
            start = index
        index += step
    if start < end:
        chunks.append(flat[start:end])
    return chunks


class Cache:
    def __init__(
        self,
        session: int,
        epoch: int,
        min_block: int,
        arena_bytes: int,
        wake: Callable[[], None],
        client: Client,
        view: memoryview,
        enabled: bool = True,
    ) -> None:
        self.session = session
        self.epoch = epoch
        self.min_block = min_block
        # Small arenas (tests, tight budgets) get a small cache: at most 1/64 of
        # the arena per refill, and nothing above that is cached.
        self.batch_bytes = max(min_block, min(BATCH_BYTES, arena_bytes // 64))
        # Disabled: nothing is served from here; the queue still carries the
        # one-way frees.
        self.max_bytes = min(CACHE_MAX_BYTES, self.batch_bytes) if enabled else 0
        # Free bytes the cache may sit on before it gives the coldest back.
        self.cap = max(4 * self.batch_bytes, min(MAX_CACHED_BYTES, arena_bytes // 16))
        self.free_bytes = 0
        self.lock = threading.Lock()
        self.lists: dict[int, list[int]] = {}  # class bytes -> free offsets
        self.high: dict[int, int] = {}  # class bytes -> length that triggers a drain
        # offset -> [generation, size, owner id, class, reported], for every
        # block handed out here and not given back yet
        self.out: dict[int, list[int]] = {}
        self.unreported: list[int] = []  # offsets handed out since the last flush
        # offset -> (generation, class): freed through the daemon, back on its word
        self.awaiting: dict[int, tuple[int, int]] = {}
        self.pending: list[int] = []  # events in order
        self.dirty = False
        self.wake = wake
        self.client = client
        self.view = view  # segment 0; the client maps the others
        self.viewed = client._viewed  # the client's table of Buffers with views (the pin rule)
        self.classes: dict[int, int] = {}  # size -> class, memo
        self._gens = itertools.count((session << GEN_SHIFT) + 1)

    # -- sizes ---------------------------------------------------------------

    def class_of(self, size: int) -> int:
        cls = self.classes.get(size)
        if cls is None:
            cls = size_class(size, self.min_block)
            if len(self.classes) < 65536:
                self.classes[size] = cls
        return cls

    def batch(self, cls: int) -> int:
        return max(1, min(MAX_BATCH_BLOCKS, self.batch_bytes // cls))

    def mark(self) -> int:
        """A generation newer than any handed out so far (for a refill)."""
        return next(self._gens)

    def missing(self, cls: int, count: int) -> int:
        return max(0, count - len(self.lists.get(cls, ())))

    # -- the hot path --------------------------------------------------------

    def hand_out(self, size: int, owner_id: int) -> Buffer | None:
        """A Buffer of `size` bytes from the free list of its class, or None
        on a miss. The hot path: keep it short."""
        cls = self.classes.get(size) or self.class_of(size)
        with self.lock:
            free = self.lists.get(cls)
            if not free:
                return None
            offset = free.pop()
            self.free_bytes -= cls
            gen = next(self._gens)
            self.out[offset] = [gen, size, owner_id, cls, False]
            self.unreported.append(offset)
            if not self.dirty:
                self._queued()
        return Buffer(self.client, self.epoch, offset, size, gen, "owned", self)

    def take_back(self, buf: Buffer) -> int:
        """Free a Buffer this cache handed out; its class bytes. The hot path
        of free: a block whose handle never left the process goes straight
        back on its free list, and if the daemon never heard of it, it never
        will."""
        offset = buf._offset
        view = buf._view
        if view is not None:  # views were made: they may outlive the Buffer
            if buf._state != "owned":
                raise self._stale(offset, buf._gen, freed=True)
            pin = buf._pin
            buf._view = buf._pin = None
            self.viewed.pop(offset, None)  # one Buffer per block out of this cache
            try:
                view.release()
                pin.release()  # type: ignore[union-attr]
            except BufferError:  # views made from it live on: keep the block
                return self.free_pinned(buf, pin)  # type: ignore[arg-type]
        if buf._handle is not None:  # its handle may be elsewhere
            cls = self.free_through_daemon(offset, buf._gen, buf._size, freed=buf._state != "owned")
            buf._done()
            return cls
        with self.lock:
            entry = self.out.pop(offset, None)
            if entry is None or entry[0] != buf._gen or buf._state != "owned":
                if entry is not None:
                    self.out[offset] = entry
                raise self._stale(offset, buf._gen, freed=buf._state != "owned")
            if entry[4]:  # reported: report its return too
                self.pending += (UNASSIGN, offset, entry[0])
                if not self.dirty:
                    self._queued()
            cls = entry[3]
            self._push(cls, offset)
            buf._state = "done"
        return cls

    def free_pinned(self, buf: Buffer, pin: memoryview) -> int:
        """Free a Buffer of this cache whose views outlive it: the daemon
        learns of the hand-out, the pin and the free, and gives the block
        back with a notice once the client unpins it. Its class bytes."""
        offset, gen = buf._offset, buf._gen
        with self.lock:
            entry = self.out.get(offset)
            if entry is None or entry[0] != gen or entry[1] != buf._size:
                raise self._stale(offset, gen)
            self._report(offset)
            del self.out[offset]
            self.awaiting[offset] = (gen, entry[3])
            segment, local = offset >> SEGMENT_SHIFT, offset & (SEGMENT_SPAN - 1)
            self.pending += (PIN, offset, gen)
            self.pending += (FREE_EVENT, self.epoch, segment, local, buf._size, gen)
            if not self.dirty:
                self._queued()
        buf._done()
        self.client._watch(pin, offset, gen)
        return entry[3]

    def pin_out(self, offset: int, gen: int) -> None:
        """A block handed out here keeps views past its owner's recycle: its
        hand-out is reported (if it was not) and pinned; it stays out (in
        `out`) until the notice that follows the client's UNPIN."""
        with self.lock:
            self._report(offset)
            self.pending += (PIN, offset, gen)
            if not self.dirty:
                self._queued()

    def post(self, *events: int) -> None:
        """Queue events about blocks that are not this cache's (PIN, UNPIN)."""
        with self.lock:
            self.pending += events
            if not self.dirty:
                self._queued()

    def _stale(
        self, offset: int, gen: int, raw: bool = False, freed: bool | None = None
    ) -> StaleHandle:
        """The refusal of a free of a block this cache does not have out under
        `gen`. `offset` is an address, or with `raw` a handle's offset as given;
        `freed`: whether the Buffer itself was freed already (None: not known,
        a free by handle). Called with the lock held."""
        where = f"offset {offset:#x}"
        if offset >= SEGMENT_SPAN and not raw:
            where = f"offset {offset & (SEGMENT_SPAN - 1):#x} of segment {offset >> SEGMENT_SHIFT}"
        asked = f"free of the block at {where} (generation {gen})"
        entry = self.out.get(offset)
        if freed or self.awaiting.get(offset, (0, 0))[0] == gen:
            found, rule = "it was freed already", "double_free"
        elif freed is False:
            found = "its owner was recycled (or the block was freed by its handle) since"
            rule = "owner_recycled"
        else:
            found, rule = "it was freed already, or its owner recycled", "double_free"
        if entry is not None and entry[0] != gen:
            found += ", and the block has been handed out again since"
        return lifetime_error(
            rule, asked, found + "; nothing was freed", offset=offset, generation=gen
        )

    def free_through_daemon(
        self, offset: int, gen: int, size: int, freed: bool | None = None
    ) -> int:
        """Free a block handed out here whose handle may be in another process
        (which may retain it): the daemon frees it and, once nobody holds it,
        gives it back with a notice. Its class bytes; StaleHandle if it is not
        out under that generation (freed or recycled already)."""
        with self.lock:
            entry = self.out.get(offset)
            if entry is None or entry[0] != gen or entry[1] != size:
                raise self._stale(offset, gen, freed=freed)
            self._report(offset)
            del self.out[offset]
            self.awaiting[offset] = (gen, entry[3])
            self.client._mark(offset, gen, FREED)  # attach refuses it from now on
            segment, local = offset >> SEGMENT_SHIFT, offset & (SEGMENT_SPAN - 1)
            self.pending += (FREE_EVENT, self.epoch, segment, local, size, gen)
            if not self.dirty:
                self._queued()
        return entry[3]

    def _queued(self) -> None:
        """The first event since the last flush: the flusher must know."""
        self.dirty = True
        self.wake()

    def post_free(self, handle: tuple[int, int, int, int, int]) -> None:
        """Queue a free by handle of a block that is not this cache's."""
        with self.lock:
            self.pending += (FREE_EVENT, *handle)
            if not self.dirty:
                self._queued()

    def escape(self, offset: int, gen: int) -> bool:
        """The block's handle is leaving this process: its hand-out must be
        reported, never folded away, and the generation table must say it is
        live (so that another process can attach it). False if the block is
        no longer out under `gen` (it came back through another process)."""
        with self.lock:
            entry = self.out.get(offset)
            if entry is None or entry[0] != gen:
                return False
            self._report(offset)
            self.client._mark(offset, gen, LIVE)
            return True

    def _report(self, offset: int) -> None:
        entry = self.out.get(offset)
        if entry is not None and not entry[4]:
            entry[4] = True
            self.pending += (ASSIGN, offset, entry[1], entry[0], entry[2])

    def _push(self, cls: int, offset: int) -> None:
        free = self.lists[cls]
        free.append(offset)
        self.free_bytes += cls
        if len(free) > self.high[cls] or self.free_bytes > self.cap:
            self._drain_cold(cls)

    def _drain_cold(self, cls: int) -> None:
        """Give the coldest blocks of a class back (pops take from the end):
        down to one batch; and when the whole cache holds more than its cap,
        every class down to half a batch."""
        over = self.free_bytes > self.cap
        for each in list(self.lists) if over else [cls]:
            keep = self.batch(each) // 2 if over else self.batch(each)
            # The class at hand keeps a block: a refill must serve its miss.
            self._drain_class(each, max(1, keep) if each == cls else keep)
        # Still over (many classes in use): empty the others, largest first.
        for each in sorted(self.lists, reverse=True):
            if self.free_bytes <= self.cap:
                break
            if each != cls:
                self._drain_class(each, 0)
        if not self.dirty:
            self._queued()

    def _drain_class(self, cls: int, keep: int) -> None:
        free = self.lists[cls]
        extra = len(free) - keep
        if extra <= 0:
            return
        for offset in free[:extra]:
            self.pending += (DRAIN, offset)
        del free[:extra]
        self.free_bytes -= cls * extra

    # -- what the daemon said ------------------------------------------------

    def add(self, cls: int, offsets: list[int]) -> None:
        with self.lock:
            if cls not in self.lists:
                self.lists[cls] = []
                self.high[cls] = 2 * self.batch(cls)
            self.lists[cls].extend(offsets)
            self.free_bytes += cls * len(offsets)
            if self.free_bytes > self.cap:
                self._drain_cold(cls)

    def notice(self, flat: list[int]) -> None:
        """Blocks the daemon put back into this cache (freed or recycled
        through someone else, or released by the last reader)."""
        if not flat:
            return
        viewed = self.viewed
        with self.lock:
            for i in range(0, len(flat) - 1, 2):
                offset, gen = flat[i], flat[i + 1]
                entry = self.out.get(offset)
                if entry is not None and entry[0] == gen:
                    buf = viewed.get(offset)
                    if buf is not None and buf._gen == gen and buf._cache is self:
                        del viewed[offset]
                        pin = buf._release_views()
                        buf._done("recycled")
                        if pin is not None:
                            # Views of it live here: aside (in `out`) until they are gone.
                            self.pending += (PIN, offset, gen)
                            if not self.dirty:
                                self._queued()
                            self.client._watch(pin, offset, gen)
                            continue
                    del self.out[offset]
                    self._push(entry[3], offset)
                elif self.awaiting.get(offset, (0, 0))[0] == gen:
                    self._push(self.awaiting.pop(offset)[1], offset)

    def orphan(self, op: Op, args: tuple[Any, ...], result: list[Any]) -> None:
        """The answer to an allocating request the caller gave up on (it timed
        out, the daemon was only slow) came after all: give its blocks back.
        Called by the transport, under its lock: only queues events."""
        if op is Op.FILL:
            taken, direct, notices = result
            fills = args[0]
            for i, offsets in enumerate(taken):
                self.add(fills[3 * i], offsets)  # this session's cache blocks: keep them
            self.notice(notices)
            handles = direct
        else:
            handles = result if op is Op.ALLOC else result[0]
        for handle in handles:
            self.post_free(tuple(handle))  # type: ignore[arg-type]

    def drain_all(self) -> int:
        """Queue every free cached block for return to the arena; bytes queued."""
        with self.lock:
            total = 0
            for cls, free in self.lists.items():
                for offset in free:
                    self.pending += (DRAIN, offset)
                total += cls * len(free)
                free.clear()
            self.free_bytes = 0
            if total and not self.dirty:
                self._queued()
            return total

    def take_events(self) -> list[list[int]]:
        """Everything to report, as POST bodies, in order; the queue is empty after."""
        with self.lock:
            self.dirty = False
            if not self.pending and not self.unreported:
                return []
            flat = self.pending
            self.pending = []
            out = self.out
            for offset in self.unreported:
                entry = out.get(offset)
                if entry is not None and not entry[4]:  # still out, not reported
                    entry[4] = True
                    flat += (ASSIGN, offset, entry[1], entry[0], entry[2])
            self.unreported.clear()
        return split_events(flat)
