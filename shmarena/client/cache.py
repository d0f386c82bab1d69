"""The per-process fast path: size classes, batched refill and drain, and
batched bookkeeping. No I/O here: the client does the round trips.

Sizes up to `max_bytes` are served from free lists of *size classes*. A class
is a whole number of minimum blocks: up to 8 minimum blocks every multiple,
above that 8 classes per power of two, so a class exceeds the size it serves
by less than 1/8 (12.5 %) beyond the page rounding every allocation pays. A
class's refills bring 2 blocks, then 4, 8, ... up to a batch (`refill_count`).

Sizes above `max_bytes`, up to the large-block budget (`large_max`), are
carved to their pages as blocks of this cache too (a FILL of one block of
that size), and once freed are kept for reuse by client/large.py: best fit,
a byte budget, and an idle decay the client's flusher drives (`decay`).

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
a block with live views here is not pushed either, but pinned the same way
(the client's `recall` says which).

The cache is integer bookkeeping: it hands out (address, generation) pairs
and takes them back; it knows no Buffer and no Client (the client builds the
Buffers and routes their frees). An *address* is `segment << SEGMENT_SHIFT |
offset` (shm/segments.py).

Generations of the blocks this cache hands out are numbered in the session's
own space (``session << GEN_SHIFT | counter``), so no round trip is needed to
get one and no other process can make the same.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

from shmarena.client.large import DECAY_S, LargeBlocks, large_budget
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

CACHE_MAX_BYTES = 1 << 20  # largest size served from the cache
BATCH_BYTES = 2 << 20  # what one refill of a class aims to carve
MAX_BATCH_BLOCKS = 64
MAX_CACHED_BYTES = 64 << 20  # free bytes one process's cache holds at most (or 1/16 arena)
FLUSH_DELAY_S = 0.005  # bookkeeping reaches the daemon this long after it happened, at most
# A free through the daemon of a block this large is sent at once, in the
# freeing thread: its notice is back before the next frame of a pipeline is
# allocated (no FILL for a fresh block), and one send is cheap next to the
# block's bytes. Smaller ones wait for the flusher (one message per burst).
INLINE_FREE_BYTES = 4 << 20
# After its free blocks were asked back (an allocation did not fit, or the
# daemon's watermark), a cache keeps little for this long: frees go back to
# the arena at once, where best fit reuses them, instead of sitting here as
# holes while the arena fills up around them.
SQUEEZE_S = 2.0
POST_CHUNK = 16384  # integers per POST message (well under MAX_EVENTS and the frame limit)


def size_class(size: int, min_block: int) -> int:
    """The class that serves `size`: page rounding up to 8 minimum blocks, then
    8 classes per power of two."""
    if size <= 8 * min_block:
        return -(-size // min_block) * min_block
    step = 1 << ((size - 1).bit_length() - 4)
    return -(-size // step) * step


def largest_class(limit: int, min_block: int) -> int:
    """The largest size class of at most `limit` bytes (`min_block` if none)."""
    if limit <= 8 * min_block:
        return max(min_block, limit // min_block * min_block)
    step = 1 << ((limit - 1).bit_length() - 4)
    return limit // step * step


def _never() -> float:
    return 0.0


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
    """One session's cache of free blocks by size class, and the queue of
    what the daemon must hear about them (see the module's docstring).

    `wake` is called when the first event queues up (the client's flusher
    sends it); `mark(address, generation, reason)` writes a block's word in
    the generation table; `recall(cache, address, generation)` is asked, under the
    lock, about a block the daemon gave back while it is still out here: it
    ends this process's Buffer of it, and says True if views of it live on
    (the block then stays out, pinned, until the notice after the UNPIN).
    """

    def __init__(
        self,
        session: int,
        epoch: int,
        min_block: int,
        arena_bytes: int,
        wake: Callable[[], None],
        mark: Callable[[int, int, int], None],
        recall: Callable[[Cache, int, int], bool],
        view: memoryview,
        enabled: bool = True,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.session = session
        self.epoch = epoch
        self.min_block = min_block
        # Small arenas (tests, tight budgets) get a small cache: at most 1/64 of
        # the arena per refill, and nothing above that is cached.
        self.batch_bytes = max(min_block, min(BATCH_BYTES, arena_bytes // 64))
        # Disabled: nothing is served from here; the queue still carries the
        # one-way frees.
        # A class itself, so no size it serves has a class above it: every
        # block above max_bytes is a large one (client/large.py).
        self.max_bytes = largest_class(min(CACHE_MAX_BYTES, self.batch_bytes), min_block)
        if not enabled:
            self.max_bytes = 0
        # Free bytes the cache may sit on before it gives the coldest back.
        self.cap = max(4 * self.batch_bytes, min(MAX_CACHED_BYTES, arena_bytes // 16))
        # Free large blocks (above max_bytes, up to the budget) kept for reuse
        # (client/large.py); `large_max` 0: none are.
        self.large = LargeBlocks(large_budget(arena_bytes) if enabled else 0)
        self.large_max = self.large.budget if self.large.budget > self.max_bytes else 0
        # While squeezed (see `squeeze`): the normal cap and large budget, and
        # until when. One attribute: past 30 an instance's attributes are no
        # longer shared keys and every attribute read of the hot path slows.
        self.squeezed: tuple[int, int, float] | None = None
        # Seconds, for the decay (time.monotonic; this module does no I/O).
        # Without one (a unit test) every kept block counts as just freed.
        self.clock = clock if clock is not None else _never
        self.decay_s = DECAY_S  # idle seconds after which a kept large block goes back
        self.timed = False  # the flusher knows when the coldest large block is due
        self.free_bytes = 0
        self.lock = threading.Lock()
        self.lists: dict[int, list[int]] = {}  # class bytes -> free addresses
        self.high: dict[int, int] = {}  # class bytes -> length that triggers a drain
        # address -> [generation, size, owner id, class, reported], for every
        # block handed out here and not given back yet
        self.out: dict[int, list[int]] = {}
        self.unreported: list[int] = []  # addresses handed out since the last flush
        # address -> (generation, class): freed through the daemon, back on its word
        self.awaiting: dict[int, tuple[int, int]] = {}
        self.pending: list[int] = []  # events in order
        self.dirty = False
        self.wake = wake
        self._write_word = mark
        self._recall = recall
        # Segment 0 of the arena these addresses are in, for the Buffers of
        # its blocks (a view of it is a slice: no lookup on the hot path).
        self.view = view
        self.classes: dict[int, int] = {}  # size -> class, memo
        self.refills: dict[int, int] = {}  # class -> refills so far (at most 8 counted)
        self._gens = itertools.count((session << GEN_SHIFT) + 1)

    # -- sizes ---------------------------------------------------------------

    def class_of(self, size: int) -> int:
        """The size class serving `size` (memoised)."""
        cls = self.classes.get(size)
        if cls is None:
            cls = size_class(size, self.min_block)
            if len(self.classes) < 65536:
                self.classes[size] = cls
        return cls

    def batch(self, cls: int) -> int:
        """How many blocks of class `cls` one refill brings."""
        return max(1, min(MAX_BATCH_BLOCKS, self.batch_bytes // cls))

    def refill_count(self, cls: int) -> int:
        """How many blocks the next refill of class `cls` brings: 2 the first
        time, twice as many each time after, up to a batch. A class asked for
        now and then never sits on a whole batch (up to 2 MiB) it does not use:
        with ~80 classes per session and several sessions, those unused
        batches became holes all over the arena (as jemalloc grows a thread
        cache's fill count with use, not all at once)."""
        done = self.refills.get(cls, 0)
        if done < 8:
            self.refills[cls] = done + 1
        return min(self.batch(cls), 2 << done)

    def mark(self) -> int:
        """A generation newer than any handed out so far (for a refill)."""
        return next(self._gens)

    def carve_size(self, size: int) -> int:
        """What a large block for `size` is carved to: whole minimum blocks."""
        unit = self.min_block
        return -(-size // unit) * unit

    def missing(self, cls: int, count: int) -> int:
        """How many of `count` blocks of class `cls` the free list lacks."""
        return max(0, count - len(self.lists.get(cls, ())))

    # -- the hot path --------------------------------------------------------

    def hand_out(self, size: int, owner_id: int) -> tuple[int, int] | None:
        """(address, generation) of a block of `size` bytes from the free
        list of its class, or None on a miss. The hot path: keep it short."""
        cls = self.classes.get(size) or self.class_of(size)
        lock = self.lock
        # acquire/release, not `with`: half the cost on this path (no __exit__ call)
        lock.acquire()
        try:
            free = self.lists.get(cls)
            if not free:
                return None
            address = free.pop()
            self.free_bytes -= cls
            gen = next(self._gens)
            self.out[address] = [gen, size, owner_id, cls, False]
            self.unreported.append(address)
            if not self.dirty:
                self._queued()
        finally:
            lock.release()
        return address, gen

    def hand_out_large(self, size: int, owner_id: int) -> tuple[int, int] | None:
        """(address, generation) of a kept large block that fits `size` with
        little to spare (client/large.py), or None on a miss."""
        unit = self.min_block
        need = -(-size // unit) * unit
        with self.lock:
            got = self.large.take(need)
            if got is None:
                return None
            address, carved = got
            gen = next(self._gens)
            self.out[address] = [gen, size, owner_id, carved, False]
            self.unreported.append(address)
            if not self.dirty:
                self._queued()
        return address, gen

    def give_back(self, address: int, gen: int) -> int:
        """Take back a block handed out here whose handle never left the
        process and that no view looks at; its class bytes. The hot path of
        free: straight back on its free list, and if the daemon never heard
        of it, it never will. StaleHandle if it is not out under `gen`."""
        lock = self.lock
        lock.acquire()  # not `with`: see hand_out
        try:
            entry = self.out.pop(address, None)
            if entry is None or entry[0] != gen:
                if entry is not None:
                    self.out[address] = entry
                raise self.stale(address, gen, freed=False)
            if entry[4]:  # reported: report its return too
                self.pending += (UNASSIGN, address, gen)
                if not self.dirty:
                    self._queued()
            cls = entry[3]
            free = self.lists.get(cls)  # _push, inlined for the hot path
            if free is None:
                self._keep_large(address, cls)
                return cls
            free.append(address)
            self.free_bytes += cls
            if len(free) > self.high[cls] or self.free_bytes > self.cap:
                self._drain_cold(cls)
        finally:
            lock.release()
        return cls

    def free_pinned(self, address: int, gen: int, size: int) -> int:
        """Free a block of this cache whose views outlive its Buffer: the
        daemon learns of the hand-out, the pin and the free, and gives the
        block back with a notice once the client unpins it. Its class bytes."""
        with self.lock:
            entry = self.out.get(address)
            if entry is None or entry[0] != gen or entry[1] != size:
                raise self.stale(address, gen)
            self._report(address)
            del self.out[address]
            self.awaiting[address] = (gen, entry[3])
            segment, local = address >> SEGMENT_SHIFT, address & (SEGMENT_SPAN - 1)
            self.pending += (PIN, address, gen)
            self.pending += (FREE_EVENT, self.epoch, segment, local, size, gen)
            if not self.dirty:
                self._queued()
        return entry[3]

    def pin_out(self, address: int, gen: int) -> None:
        """A block handed out here keeps views past its owner's recycle: its
        hand-out is reported (if it was not) and pinned; it stays out (in
        `out`) until the notice that follows the client's UNPIN."""
        with self.lock:
            self._report(address)
            self.pending += (PIN, address, gen)
            if not self.dirty:
                self._queued()

    def post(self, *events: int) -> None:
        """Queue events about blocks that are not this cache's (PIN, UNPIN)."""
        with self.lock:
            self.pending += events
            if not self.dirty:
                self._queued()

    def stale(
        self, address: int, gen: int, raw: bool = False, freed: bool | None = None
    ) -> StaleHandle:
        """The refusal of a free of a block this cache does not have out under
        `gen`. `address` is an address, or with `raw` a handle's offset as
        given; `freed`: whether the Buffer itself was freed already (None: not
        known, a free by handle)."""
        where = f"offset {address:#x}"
        if address >= SEGMENT_SPAN and not raw:
            where = (
                f"offset {address & (SEGMENT_SPAN - 1):#x} of segment {address >> SEGMENT_SHIFT}"
            )
        asked = f"free of the block at {where} (generation {gen})"
        entry = self.out.get(address)
        if freed or self.awaiting.get(address, (0, 0))[0] == gen:
            found, rule = "it was freed already", "double_free"
        elif freed is False:
            found = "its owner was recycled (or the block was freed by its handle) since"
            rule = "owner_recycled"
        else:
            found, rule = "it was freed already, or its owner recycled", "double_free"
        if entry is not None and entry[0] != gen:
            found += ", and the block has been handed out again since"
        return lifetime_error(
            rule, asked, found + "; nothing was freed", offset=address, generation=gen
        )

    def free_through_daemon(
        self, address: int, gen: int, size: int, freed: bool | None = None, now: bool = False
    ) -> int:
        """Free a block handed out here whose handle may be in another process
        (which may retain it): the daemon frees it and, once nobody holds it,
        gives it back with a notice. Its class bytes; StaleHandle if it is not
        out under that generation (freed or recycled already). With `now`, the
        caller sends the event at once (Client._send_now): the flusher is not
        woken for it."""
        with self.lock:
            entry = self.out.get(address)
            if entry is None or entry[0] != gen or entry[1] != size:
                raise self.stale(address, gen, freed=freed)
            self._report(address)
            del self.out[address]
            self.awaiting[address] = (gen, entry[3])
            self._write_word(address, gen, FREED)  # attach refuses it from now on
            segment, local = address >> SEGMENT_SHIFT, address & (SEGMENT_SPAN - 1)
            self.pending += (FREE_EVENT, self.epoch, segment, local, size, gen)
            if not self.dirty and not now:
                self._queued()
        return entry[3]

    def unsent(self) -> None:
        """A send at once (free_through_daemon's `now`) failed: the flusher
        takes what is queued."""
        with self.lock:
            if self.pending and not self.dirty:
                self._queued()

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

    def escape(self, address: int, gen: int) -> bool:
        """The block's handle is leaving this process: its hand-out must be
        reported, never folded away, and the generation table must say it is
        live (so that another process can attach it). False if the block is
        no longer out under `gen` (it came back through another process)."""
        with self.lock:
            entry = self.out.get(address)
            if entry is None or entry[0] != gen:
                return False
            self._report(address)
            self._write_word(address, gen, LIVE)
            return True

    def is_out(self, address: int, gen: int) -> bool:
        """Whether the block is handed out here under `gen` (not given back,
        not taken back through another process)."""
        entry = self.out.get(address)
        return entry is not None and entry[0] == gen

    def forget_out(self) -> None:
        """The session ended: nothing is out any more (its Buffers refuse a view)."""
        with self.lock:
            self.out.clear()

    def _report(self, address: int) -> None:
        entry = self.out.get(address)
        if entry is not None and not entry[4]:
            entry[4] = True
            self.pending += (ASSIGN, address, entry[1], entry[0], entry[2])

    def _push(self, cls: int, address: int) -> None:
        free = self.lists.get(cls)
        if free is None:  # a large block: no class of its own
            self._keep_large(address, cls)
            return
        free.append(address)
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
        for address in free[:extra]:
            self.pending += (DRAIN, address)
        del free[:extra]
        self.free_bytes -= cls * extra

    def _keep_large(self, address: int, carved: int, trim: bool = True) -> None:
        """A free large block: kept for reuse, within the budget (a new one,
        about to be handed out, without trimming: nothing need go for it)."""
        for cold, _ in self.large.put(address, carved, self.clock(), trim):
            self.pending += (DRAIN, cold)
            if not self.dirty:
                self._queued()
        if not self.timed:  # the flusher must learn when it is due
            self.timed = True
            self.wake()

    def decay(self) -> float | None:
        """Give back the large blocks idle for DECAY_S (client/large.py);
        seconds until the next is due, None when none is kept. The flusher's."""
        with self.lock:
            now = self.clock()
            for address, _ in self.large.expired(now, self.decay_s):
                self.pending += (DRAIN, address)
                if not self.dirty:
                    self._queued()
            due = self.large.due_in(now, self.decay_s)
            self.timed = due is not None
            return due

    # -- what the daemon said ------------------------------------------------

    def add(self, cls: int, addresses: list[int]) -> None:
        """Blocks of class `cls` a refill brought: onto its free list (a large
        block: kept among the large ones)."""
        with self.lock:
            if cls > self.max_bytes and cls not in self.lists:
                for address in addresses:
                    self._keep_large(address, cls, trim=False)
                return
            if cls not in self.lists:
                self.lists[cls] = []
                self.high[cls] = 2 * self.batch(cls)
            self.lists[cls].extend(addresses)
            self.free_bytes += cls * len(addresses)
            if self.free_bytes > self.cap:
                self._drain_cold(cls)
            squeezed = self.squeezed
            if squeezed is not None and self.clock() >= squeezed[2]:  # the pressure is old
                self.cap, self.large.budget, _ = squeezed
                self.squeezed = None

    def squeeze(self) -> None:
        """Its blocks were asked back under pressure: for SQUEEZE_S, keep at
        most two batches of free class blocks and no more free large bytes
        than the largest class (the first refill after that restores the
        limits). Under the cache's lock."""
        cap, budget = self.cap, self.large.budget
        if self.squeezed is not None:  # squeezed already: the normal limits are saved
            cap, budget, _ = self.squeezed
        self.squeezed = (cap, budget, self.clock() + SQUEEZE_S)
        self.cap = min(cap, 2 * self.batch_bytes)
        self.large.budget = min(budget, self.max_bytes)

    def notice(self, flat: list[int]) -> None:
        """Blocks the daemon put back into this cache (freed or recycled
        through someone else, or released by the last reader), as flat
        [address, generation, ...]."""
        if not flat:
            return
        recall = self._recall
        with self.lock:
            for i in range(0, len(flat) - 1, 2):
                address, gen = flat[i], flat[i + 1]
                entry = self.out.get(address)
                if entry is not None and entry[0] == gen:
                    if recall(self, address, gen):
                        # Views of it live here: aside (in `out`) until they are gone.
                        self.pending += (PIN, address, gen)
                        if not self.dirty:
                            self._queued()
                        continue
                    del self.out[address]
                    self._push(entry[3], address)
                elif self.awaiting.get(address, (0, 0))[0] == gen:
                    self._push(self.awaiting.pop(address)[1], address)

    def orphan(self, op: Op, args: tuple[Any, ...], result: list[Any]) -> None:
        """The answer to an allocating request the caller gave up on (it timed
        out, the daemon was only slow) came after all: give its blocks back.
        Called by the transport, under its lock: only queues events."""
        if op is Op.FILL:
            taken, direct, notices = result
            fills = args[0]
            for i, addresses in enumerate(taken):
                self.add(fills[3 * i], addresses)  # this session's cache blocks: keep them
            self.notice(notices)
            handles = direct
        else:
            handles = result if op is Op.ALLOC else result[0]
        for handle in handles:
            self.post_free(tuple(handle))

    def drain_all(self) -> int:
        """Queue every free cached block, large ones too, for return to the
        arena, and keep little for a while (`squeeze`: this is asked under
        pressure); bytes queued. Safe from any thread at any time."""
        with self.lock:
            total = 0
            for cls, free in self.lists.items():
                for address in free:
                    self.pending += (DRAIN, address)
                total += cls * len(free)
                free.clear()
            self.free_bytes = 0
            for address, carved in self.large.clear():
                self.pending += (DRAIN, address)
                total += carved
            self.squeeze()
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
            for address in self.unreported:
                entry = out.get(address)
                if entry is not None and not entry[4]:  # still out, not reported
                    entry[4] = True
                    flat += (ASSIGN, address, entry[1], entry[0], entry[2])
            self.unreported.clear()
        return split_events(flat)
