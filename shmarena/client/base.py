"""What every part of the Client shares: its attributes, declared once.

`Client` (client/client.py) is assembled from one class per job: the session
(client.py), allocation (allocating.py), frees and the pin rule (freeing.py),
owners (owners.py), segments and attach (attaching.py) and the admin and
name calls (admin.py). Each of those derives from `ClientBase`, so each sees
the attributes `Client.__init__` sets and the few methods the others provide
(declared for the type checker only: the real ones come through the MRO).
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

    from shmarena.client.buffer import Buffer
    from shmarena.client.cache import Cache
    from shmarena.client.gentables import GenTables
    from shmarena.client.lifecycle import State
    from shmarena.client.mappings import Key
    from shmarena.client.owners import Recycled
    from shmarena.client.transport import Transport
    from shmarena.errors import SessionLost
    from shmarena.protocol import Handle, Op


class ClientBase:
    """The state of one Client; see `Client` for what it means to users."""

    name: str
    runtime_dir: str
    socket_path: str
    timeout_s: float
    retry_s: float
    label: str
    cache_enabled: bool
    populate: bool
    track_sites: bool
    info: dict[str, Any]
    session: int
    epoch: int
    listing_page: int
    _lock: threading.Lock
    _transport: Transport | None
    _daemon_uid: int | None
    _heartbeat: threading.Thread | None
    _stop_heartbeat: threading.Event
    _token: int
    _arena_view: memoryview | None  # segment 0
    # Segments: index -> where to map it (from the daemon), and the views and
    # mapping keys of those this client has mapped so far.
    _segment_info: dict[int, dict[str, Any]]
    _views: dict[int, memoryview]
    _keys: dict[int, Key]
    _gentables: GenTables
    _used: set[Key]  # mapping keys this client counts as a user of (mappings.py)
    _cache: Cache | None
    _flush_wake: threading.Event
    _flusher: threading.Thread | None
    _pid: int
    _closed: bool
    _owner_ids: dict[str, tuple[int, int]]  # owner name -> (session, id): see Owner.id
    _pending_loss: SessionLost | None
    # The pin rule (client/buffer.py): address -> this process's live Buffer
    # allocated there that made a view (or came from the daemon); and the weak
    # references that unpin a pinned block when its pin dies.
    _viewed: dict[int, Buffer]
    _pins: dict[int, weakref.ref[memoryview]]
    _prune_at: int
    _alive_at: float

    if TYPE_CHECKING:
        # Provided by the parts named; declared here so each part type-checks alone.

        def _request(  # client.py
            self, op: Op, *args: Any, timeout_s: float | None = None
        ) -> list[Any]: ...

        def _lose_session(  # client.py
            self, transport: Transport, error: SessionLost, stash: bool = False
        ) -> None: ...

        def _buffer(self, wire: list[int], state: State | str) -> Buffer: ...  # allocating.py

        def _segment_view(self, segment: int) -> memoryview: ...  # attaching.py

        def _watch(self, pin: memoryview, address: int, gen: int) -> None: ...  # freeing.py

        def _pin_owner(self, name: str) -> list[Buffer]: ...  # freeing.py

        def _free_buffer(self, buf: Buffer) -> int: ...  # freeing.py

        def _take_back(self, buf: Buffer, cache: Cache) -> int: ...  # freeing.py

        def _view_at(self, address: int, size: int) -> memoryview: ...  # attaching.py

        def release(self, target: Buffer | Handle) -> None: ...  # attaching.py

        def free(  # freeing.py
            self, target: Buffer | Handle | Iterable[Buffer | Handle]
        ) -> Recycled: ...
