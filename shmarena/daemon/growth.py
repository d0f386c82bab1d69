"""When a segmented arena grows and when it gives a segment back. Pure.

An arena started with `--max-size` may add segments when an allocation does
not fit (`grow`), up to that size in all, and releases an added segment that
stayed empty for `Growth.idle_s` seconds (`trim`). The ledger decides when to
ask; the server makes and releases the memory (`Growth.make`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from shmarena.shm.segments import MAX_SEGMENTS, SEGMENT_SHIFT, Segmented, plan_growth


@dataclass
class Growth:
    """How the arena may grow (`--max-size`): up to `max_bytes` in all, by
    segments of whole `granule`s. `make(index, size)` is the server's: it
    creates the segment's memory and answers whether it could. An added
    segment that stays empty for `idle_s` seconds is released (0: never)."""

    max_bytes: int
    granule: int
    make: Callable[[int, int], bool]
    idle_s: float = 30.0
    failures: int = 0  # segments `make` could not create since the last it could
    last_failure: str = ""


def grow(growth: Growth, space: Segmented, need_bytes: int, size: int) -> bool:
    """Add a segment that can hold `need_bytes` (a request of `size` at
    least), if the cap allows and the server can make it."""
    if len(space.spaces) >= MAX_SEGMENTS:
        return False
    need = max(space.carved_bytes(need_bytes), space.spaces[0].room_for(size))
    planned = plan_growth(space.size_bytes, need, growth.max_bytes, growth.granule)
    if planned is None:
        return False
    index = space.next_index
    if not growth.make(index, planned):
        growth.failures += 1
        return False
    growth.failures, growth.last_failure = 0, ""  # only a current failure is news
    space.add(index, planned)
    return True


def mark_busy(empty_since: dict[int, float], addresses: Iterable[int]) -> None:
    """The segments of `addresses` are in use again: not idle."""
    for addr in addresses:
        empty_since.pop(addr >> SEGMENT_SHIFT, None)


def trim(growth: Growth, space: Segmented, empty_since: dict[int, float], now: float) -> list[int]:
    """The added segments that have been empty for the idle period, now
    removed from the allocator; `empty_since` (segment -> when it was first
    seen empty) is kept up to date."""
    released = []
    for index, part in list(space.spaces.items()):
        if index == 0 or part.live:
            empty_since.pop(index, None)
            continue
        since = empty_since.setdefault(index, now)
        if now - since >= growth.idle_s:
            space.remove(index)
            del empty_since[index]
            released.append(index)
    return released
