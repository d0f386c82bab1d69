"""The Client's segments and attach: mapping a segment the first time one
of its blocks is met, attach (checked against the generation table, no
round trip), retain and release.
"""

from __future__ import annotations

from typing import Any

from shmarena.client import mappings
from shmarena.client.base import ClientBase
from shmarena.client.buffer import Buffer
from shmarena.client.handles import as_handle, handle_of, other_epoch
from shmarena.client.lifecycle import ATTACHED, RETAINED, move
from shmarena.errors import InvalidRequest, ShmArenaError, StaleHandle
from shmarena.protocol import PIN, Handle, Op
from shmarena.shm.segments import OFFSET_MASK, SEGMENT_SHIFT


class Attaching(ClientBase):
    """Segments, attach, retain and release."""

    # -- segments ----------------------------------------------------------

    def _segment_view(self, segment: int) -> memoryview:
        """The view of a segment, mapped the first time it is met. The
        daemon says where it lives (one round trip per new segment).
        StaleHandle when the segment no longer exists (released when empty)."""
        view = self._views.get(segment)
        if view is not None and (segment == 0 or mappings.mapped_view(self._keys[segment]) is view):
            return view
        with self._lock:
            where = self._segment_info.get(segment)
        for _ in range(2):
            if where is None:
                where = self._learn_segments(segment)
                if where is None:
                    break
            key = (mappings.locator(where), self.epoch)
            try:
                view = mappings.map_view(key, where, self.populate, self._used, self._daemon_uid)
            except ShmArenaError:
                if segment == 0:
                    raise
                where = None  # released since this client learnt of it: ask again
                continue
            table = mappings.map_table(where, self.epoch, self._used, self._daemon_uid)
            with self._lock:
                self._views[segment], self._keys[segment] = view, key
                if table is not None:
                    self._gentables.tables[segment] = table
            return view
        raise StaleHandle(
            f"segment {segment} of arena {self.name!r} (epoch {self.epoch}) does not exist: "
            "it was released after it stood empty, or never made; the block is gone",
            segment=segment,
        )

    def _learn_segments(self, segment: int) -> dict[str, Any] | None:
        """Ask the daemon for its segments now (unmapping those it released);
        where `segment` lives, None if it has no such segment."""
        (rows,) = self._request(Op.SEGMENTS)
        with self._lock:
            self._segment_info = {int(row["index"]): row for row in rows}
            where = self._segment_info.get(segment)
        mappings.unmap_released(self.epoch, rows)
        return where

    def _view_at(self, address: int, size: int) -> memoryview:
        """The bytes [address, address + size) of the arena (see segments.address)."""
        offset = address & OFFSET_MASK
        return self._segment_view(address >> SEGMENT_SHIFT)[offset : offset + size]

    def segments(self) -> list[dict[str, Any]]:
        """The arena's segments now: index, size and where each lives."""
        (rows,) = self._request(Op.SEGMENTS)
        return list(rows)

    # -- attach ------------------------------------------------------------

    def attach(self, handle: Handle, retain: bool = False) -> Buffer:
        """A Buffer over the block `handle` names, allocated by any process.

        Plain attach costs no round trip and takes no reference: the block
        lives as long as its owner keeps it. It checks the handle against the
        arena's generation table (shared memory, shm/gens.py) and raises
        StaleHandle, saying what happened, unless the block is live under the
        handle's generation: freed, owner recycled, its session ended (the
        producer exited), handed out again since, or never handed out. A block
        freed *after* a plain attach is not noticed: the Buffer then looks at
        bytes that may be handed out again. With `retain=True` this process
        holds a reference (the daemon refuses a freed block too): a free or
        recycle of the owner then waits until `buf.release()` (or this
        process's death) before the memory is reused.
        """
        handle = as_handle(handle)
        if handle.epoch != self.epoch:
            raise other_epoch(handle.epoch, self.epoch, "attach")
        # Inside a segment of the arena? (inline: attach is a hot path)
        try:
            view = self._segment_view(handle.segment) if handle.segment >= 0 else None
        except StaleHandle:
            view = None
        offset, size = handle.offset, handle.size
        if view is None or offset < 0 or size <= 0 or offset + size > len(view):
            self._refuse_bounds(handle, view)
        gentables = self._gentables
        table = gentables.tables.get(handle[1])
        if table is not None:  # the block's word: live under this very generation?
            offset, shift = handle[2], gentables.min_shift
            if table[offset >> shift] != handle[4] or offset & ((1 << shift) - 1):
                self._refuse_attach(handle, gentables.not_live(handle, table), retain)
        if retain:
            self._request(Op.RETAIN, [list(handle)])
        return self._buffer(list(handle), RETAINED if retain else ATTACHED)

    def _refuse_bounds(self, handle: Handle, view: memoryview | None) -> None:
        """InvalidRequest for a handle outside the arena's segments."""
        if view is None:
            sizes = {k: int(v["size"]) for k, v in self._segment_info.items()}
            raise InvalidRequest(
                f"handle {tuple(handle)} names segment {handle.segment}, which arena "
                f"{self.name!r} does not have: its segments (index: bytes) are {sizes}"
            )
        raise InvalidRequest(
            f"handle {tuple(handle)} lies outside segment {handle.segment} of the arena, "
            f"which has {len(view)} bytes"
        )

    def _refuse_attach(self, handle: Handle, refusal: StaleHandle, retain: bool) -> None:
        """Raise the refusal of an attach the table says is stale; for a
        retain, the daemon's own refusal when it names a reason (it may
        remember more: whose, which pid)."""
        if retain:
            try:
                self._request(Op.RETAIN, [list(handle)])
            except StaleHandle as error:
                if error.details.get("reason"):
                    raise
                raise refusal from None
            self._request(Op.RELEASE, [list(handle)])  # it took it: the table rules
        raise refusal

    def retain(self, target: Buffer | Handle) -> None:
        """Take a reader's reference on a block (see `attach`)."""
        handle = handle_of(target)
        self._request(Op.RETAIN, [list(handle)])
        if isinstance(target, Buffer):
            move(target, "retain")

    def release(self, target: Buffer | Handle) -> None:
        """Drop a reference taken with `attach(..., retain=True)` or `retain()`."""
        # A Buffer's owner may have been recycled: the reference is still ours.
        handle = target._make_handle() if isinstance(target, Buffer) else as_handle(target)
        pin = target._release_views() if isinstance(target, Buffer) else None
        cache = self._cache
        if pin is not None and cache is not None:
            # Views of it outlive this reference: keep the block out of reuse.
            cache.post(PIN, target._address, handle.generation)  # type: ignore[union-attr]
            self._watch(pin, target._address, handle.generation)  # type: ignore[union-attr]
        self._request(Op.RELEASE, [list(handle)])
        if isinstance(target, Buffer):
            target._done("release")
