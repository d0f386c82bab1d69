"""The process-wide table of arena mappings: one mmap per segment (and per
generation table) per process, shared by every Client of the process.

A leaf: it imports nothing of `shmarena.client`, so the client, the registry
(which looks up where a mapping lies) and anything else may import it.
A mapping is never unmapped while a view of it lives (`unmap` keeps it then),
so no Buffer can dangle; the last Client of the process to stop using one
unmaps it (`unuse`).
"""

from __future__ import annotations

import mmap
import os
import threading
from typing import Any

from shmarena.shm.arena import map_segment
from shmarena.shm.backing import map_file

Key = tuple[str, int]  # (locator, epoch): see `locator`

# key -> (mapping, memoryview of all of it), one per process.
MAPPINGS: dict[Key, tuple[mmap.mmap, memoryview]] = {}
# key -> clients of this process that use the mapping; the last to stop
# using it unmaps it if no buffer is left over it (see `unmap`)
_USERS: dict[Key, int] = {}
_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    # Another thread of the parent may have held the lock at fork time.
    global _LOCK
    _LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def locator(where: dict[str, Any]) -> str:
    """A segment's shm name or file path, and its index: with the epoch, its
    mapping's key (a memfd's /proc path may come back for a later segment;
    indices never do)."""
    return f"{where.get('shm') or where['path']}#{int(where.get('index', 0))}"


def mapped_view(key: Key) -> memoryview | None:
    """The view of the mapping `key`, None if this process has none."""
    found = MAPPINGS.get(key)
    return None if found is None else found[1]


def map_view(
    key: Key,
    where: dict[str, Any],
    populate: bool,
    used: set[Key],
    owner_uid: int | None,
    words: bool = False,
) -> memoryview:
    """The process's one mapping of a segment: shm by name, or a file (a
    backing file, a hugetlbfs file, the daemon's memfd) by path and offset,
    made only if it belongs to `owner_uid`, the daemon's uid. The client
    whose `used` set this is counts as one of its users. With `words`, the
    view is of 64-bit words (a generation table)."""
    with _LOCK:
        found = MAPPINGS.get(key)
        if found is None:
            size = int(where["size"])
            if "shm" in where:
                mapping = map_segment(str(where["shm"]), size, populate, owner_uid)
            else:
                offset = int(where["offset"])
                mapping = map_file(str(where["path"]), size, offset, populate, owner_uid)
            found = (mapping, memoryview(mapping).cast("Q") if words else memoryview(mapping))
            MAPPINGS[key] = found
        if key not in used:
            used.add(key)
            _USERS[key] = _USERS.get(key, 0) + 1
        return found[1]


def map_table(
    where: dict[str, Any], epoch: int, used: set[Key], owner_uid: int | None
) -> memoryview | None:
    """The process's one mapping of a segment's generation table, as 64-bit
    words; None when the daemon keeps none (an older daemon)."""
    table = where.get("gens")
    if not table:
        return None
    return map_view(table_key(where, epoch), table, False, used, owner_uid, words=True)


def table_key(where: dict[str, Any], epoch: int) -> Key:
    """A table's mapping key: its name or path, the serial the daemon gave
    it (a name comes back with another object after a restart) and its
    segment's index."""
    table = where["gens"]
    name = table.get("shm") or table["path"]
    return (f"{name}@{int(table.get('serial', 0))}#{int(where.get('index', 0))}", epoch)


def unmap_released(epoch: int, rows: list[dict[str, Any]]) -> None:
    """Unmap this process's mappings of segments of `epoch` that the daemon's
    table `rows` shows released (below its newest index and not listed:
    indices only grow, so an older table cannot hide a newer segment),
    unless a buffer still looks at them."""
    listed = {locator(row) for row in rows}
    listed |= {table_key(row, epoch)[0] for row in rows if row.get("gens")}
    newest = max((int(row["index"]) for row in rows), default=0)
    with _LOCK:
        for key in list(MAPPINGS):
            index = int(key[0].rsplit("#", 1)[1])
            if key[1] == epoch and 0 < index < newest and key[0] not in listed:
                _USERS.pop(key, None)
                _unmap(key)


def unuse(used: set[Key]) -> None:
    """A client is done with the mappings in `used`: the last user in the
    process unmaps each one that no buffer looks at any more, so the memory
    of a stopped daemon's arena is not kept alive by this process."""
    with _LOCK:
        for key in used:
            users = _USERS.get(key, 0) - 1
            if users > 0:
                _USERS[key] = users
                continue
            _USERS.pop(key, None)
            _unmap(key)
        used.clear()


def _unmap(key: Key) -> None:
    """Unmap a mapping unless a buffer still looks at it (then it stays,
    with a fresh view). Called with _LOCK held."""
    found = MAPPINGS.get(key)
    if found is None:
        return
    mapping, view = found
    words = view.format == "Q"  # a generation table
    try:
        view.release()
        mapping.close()
    except BufferError:  # buffers (or arrays made from them) still look at it
        MAPPINGS[key] = (mapping, memoryview(mapping).cast("Q") if words else memoryview(mapping))
        return
    del MAPPINGS[key]
