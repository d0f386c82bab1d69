"""Owners: named groups of blocks, recycled in one call (`Owner`, and the
Client's `owner`, `set_quota` and `recycle`)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from shmarena.client.base import ClientBase
from shmarena.errors import UnknownOwner
from shmarena.protocol import Op

if TYPE_CHECKING:
    from shmarena.client.buffer import Buffer
    from shmarena.client.client import Client


class Recycled(NamedTuple):
    """What a recycle (or free) gave back."""

    blocks: int
    bytes: int


class Owner:
    """A named group of blocks, recycled in one call.

    Session scope (the default): recycled when this process's session ends,
    and when a `with` block over it exits. Detached: survives this process and
    is recycled only explicitly (`recycle()`, `client.recycle(name)` or
    `shmarena recycle NAME`).
    """

    def __init__(
        self, client: Client, name: str, detached: bool, owner_id: int, quota: int = 0
    ) -> None:
        self.client = client
        self.name = name
        self.detached = detached
        self.quota = quota  # bytes, 0: none (as the daemon said when this was opened)
        client._owner_ids[name] = (client.session, owner_id)

    @property
    def id(self) -> int:
        """The number this session's cache hand-outs name the owner by. The
        daemon forgets it when the owner is recycled (and never gives it
        again); using the owner after that opens it again, for a new id."""
        known = self.known_id()
        return self.client._reopen(self.name) if known is None else known

    def known_id(self) -> int | None:
        """`id` if it needs no round trip, else None."""
        client = self.client
        known = client._owner_ids.get(self.name)
        return known[1] if known is not None and known[0] == client.session else None

    def alloc(self, size: int, *, timeout: float | None = None, site: str | None = None) -> Buffer:
        """Like `Client.alloc`, into this owner. A detached owner's buffers are
        registered with the daemon before this returns (one round trip), so
        they outlive this process even if it is killed the next instant; so
        are those of an owner with a quota, which the daemon checks."""
        client = self.client
        if self.detached or self.quota or timeout is not None or site or client.track_sites:
            buf = client._alloc_direct(size, self.name, self.detached, timeout, site)
        else:
            buf = client._alloc_cached(size, self.id, self.name)
        buf._owner = self.name  # a recycle in this process finds it (Client.recycle)
        return buf

    def alloc_many(self, sizes: Sequence[int]) -> list[Buffer]:
        """Like `Client.alloc_many`, into this owner."""
        bufs = self.client._alloc_many(
            sizes, self.name, self.detached, self.id, direct=bool(self.quota)
        )
        for buf in bufs:
            buf._owner = self.name
        return bufs

    def recycle(self) -> Recycled:
        """Free every block of this owner (see `Client.recycle`)."""
        return self.client.recycle(self.name)

    def __enter__(self) -> Owner:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.detached:
            with contextlib.suppress(UnknownOwner):  # recycled inside the block already
                self.recycle()

    def __repr__(self) -> str:
        scope = "detached" if self.detached else "session"
        return f"<shmarena.Owner {self.name!r} {scope}>"


class Owning(ClientBase):
    """The Client's owner calls."""

    def owner(self, name: str, detached: bool = False, *, quota: int | None = None) -> Owner:
        """The owner `name`, created now if needed (it shows in `shmarena owners`
        at once). As a context manager, leaving the block recycles a
        session-scoped owner. `quota` (bytes; 0 removes it) caps what the
        owner may hold: an allocation over it raises QuotaExceeded. An owner
        with a quota allocates through the daemon (no cache), which checks it."""
        if quota is not None and (type(quota) is not int or quota < 0):
            raise ValueError(f"quota must be a number of bytes (0: none), got {quota!r}")
        (row,) = self._request(Op.OWNER, name, detached, -1 if quota is None else quota)
        return Owner(
            self,  # type: ignore[arg-type]  # a part of Client: only Client is instantiated
            name,
            detached,
            int(row.get("id", 0)),
            int(row.get("quota", 0)),
        )

    def _reopen(self, name: str) -> int:
        """A session-scoped owner used after it was recycled (or from a new
        session): open it again for the id of its cache hand-outs."""
        (row,) = self._request(Op.OWNER, name, False, -1)
        owner_id = int(row.get("id", 0))
        self._owner_ids[name] = (self.session, owner_id)
        return owner_id

    def set_quota(self, owner: str, quota: int) -> None:
        """Set the quota of the owner `owner` (any owner, by name; "" sets the
        daemon's per-session quota) to `quota` bytes, 0 for none. What is held
        already stays, even over it; `shmarena quota` does the same."""
        self._request(Op.QUOTA, owner, quota)

    def recycle(self, name: str) -> Recycled:
        """Free every block the owner holds, in one call, and remove the owner.

        Its Buffers in this process are done; blocks this process still has
        views of are pinned until the last of them is gone (see `free`).
        UnknownOwner if there is no owner of that name.
        """
        ours = self._pin_owner(name) if self._viewed else []
        try:
            (blocks, freed), notices = self._request(Op.RECYCLE, name)
        finally:
            self._owner_ids.pop(name, None)  # its id goes with it (Owner.id)
        for buf in ours:
            buf._done("recycle")
        if self._cache is not None:
            self._cache.notice(notices)
        return Recycled(blocks, freed)
