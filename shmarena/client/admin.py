"""The Client's calls that ask the daemon and change no block of this
process: named buffers (publish, lookup, names, subscribe), introspection
(stats, blocks, owners, clients, check, ping) and NUMA placement.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# Imported under another name: `Admin.names` is a method, and would shadow it.
from shmarena.client import names as named
from shmarena.client.base import ClientBase
from shmarena.errors import ShmArenaError
from shmarena.protocol import Handle, Op

if TYPE_CHECKING:
    from shmarena.client.buffer import Buffer
    from shmarena.client.client import Client


class Admin(ClientBase):
    """Named buffers, introspection and placement."""

    # -- named buffers -----------------------------------------------------

    def publish(self, name: str, target: Buffer | Handle, *, sealed: bool = True) -> Handle:
        """Bind `name` to the block, for any process to `lookup`. Sealed (the
        default): read-only from now on, for this Buffer and every lookup. The
        name vanishes by itself when the block leaves its owner. NameExists if
        the name is taken."""
        return named.publish(self._whole(), name, target, sealed)

    def unpublish(self, name: str) -> None:
        """Remove the name (the block stays); UnknownName if there is none."""
        self._request(Op.UNPUBLISH, name)

    def lookup(self, name: str, timeout: float | None = 0.0) -> Buffer:
        """The block published as `name`, retained for this process (let it go
        with `buf.release()`; it goes anyway when the process ends). Waits up to
        `timeout` seconds (None: for ever) and returns the moment it is
        published; UnknownName if it was not. The wait holds this client's
        connection: give a thread that waits long a client of its own."""
        return named.lookup(self._whole(), name, timeout)

    def names(self, prefix: str = "") -> list[dict[str, Any]]:
        """The published names starting with `prefix` (`shmarena names --json`)."""
        return self._listing(Op.NAMES, "name", prefix)

    def subscribe(self, prefix: str = "") -> named.Subscription:
        """Follow every publish and recycle of names starting with `prefix`
        from now on, in order (an iterator of `Event`; its own connection)."""
        return named.Subscription(self._whole(), prefix)

    def _whole(self) -> Client:
        # This part only exists inside a Client (the one class instantiated).
        return self  # type: ignore[return-value]

    # -- introspection -----------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The daemon's figures (the same as `shmarena stats --json`)."""
        (stats,) = self._request(Op.STATS)
        return dict(stats)

    def reset_peak(self) -> dict[str, Any]:
        """Set the daemon's peak of used bytes (`stats()["peak_used_bytes"]`)
        to its used bytes now, as `shmarena stats --reset-peak` does; only
        the daemon's own user and root may (AccessDenied otherwise). Returns
        the peak before and after: previous_peak_used_bytes,
        previous_peak_at, peak_used_bytes and peak_at (seconds since the
        epoch)."""
        (stats,) = self._request(Op.STATS, True)
        keys = ("previous_peak_used_bytes", "previous_peak_at", "peak_used_bytes", "peak_at")
        return {key: stats[key] for key in keys}

    def blocks(self, max_blocks: int | None = None) -> dict[str, Any]:
        """The arena's layout (what `shmarena map` draws): per segment its used
        blocks as flat [offset, size, holder index] and free runs as flat
        [offset, size], the holder names, and "truncated" when there were more
        than `max_blocks` blocks (default and cap: 200 000)."""
        args = () if max_blocks is None else (max_blocks,)
        (layout,) = self._request(Op.BLOCKS, *args)
        return dict(layout)

    def list_owners(self) -> list[dict[str, Any]]:
        """One row per owner (the same as `shmarena owners --json`): detached
        first, then by bytes held (most first), then by name."""
        rows = self._listing(Op.OWNERS, "name")
        rows.sort(key=lambda r: (r["scope"] != "detached", -r["bytes"], r["name"]))
        return rows

    def top_owners(self, count: int) -> list[dict[str, Any]]:
        """The `count` owners holding the most bytes (most first, then by
        name; at most 10 000), rows as in `list_owners`, in one request
        however many owners exist: what `shmarena top` shows. `stats()`
        has the number of owners in all."""
        if count < 1:
            raise ValueError(f"top_owners: count must be 1 or more, got {count}")
        rows, _ = self._request(Op.OWNERS, "", count, "bytes")
        return list(rows)

    def list_clients(self) -> list[dict[str, Any]]:
        """One row per connected session (the same as `shmarena clients --json`)."""
        return self._listing(Op.CLIENTS, "session")

    def _listing(self, op: Op, key: str, *args: Any) -> list[dict[str, Any]]:
        """Every row of a listing the daemon sends in pages (protocol.py,
        OWNERS), one request per page. A row that changed between pages
        may come twice: its later one is kept."""
        rows: dict[Any, dict[str, Any]] = {}
        cursor = ""
        while True:
            page, cursor = self._request(op, *args, cursor, self.listing_page)
            for row in page:
                rows.pop(row[key], None)
                rows[row[key]] = row
            if cursor is None:
                return list(rows.values())

    def check(self) -> list[str]:
        """Verify the daemon's allocator and ledger invariants; [] when healthy."""
        (problems,) = self._request(Op.CHECK)
        return list(problems)

    def ping(self) -> float:
        """One round trip; the daemon's clock (seconds) when it answered."""
        (now,) = self._request(Op.PING)
        return float(now)

    # -- placement ---------------------------------------------------------

    @property
    def numa_nodes(self) -> list[int]:
        """The NUMA nodes the arena's pages are bound to (`--numa-node`,
        `--numa-interleave`); empty when the daemon placed them freely."""
        return list(self.info.get("numa", {}).get("nodes", []))

    def pin_to_arena(self) -> set[int]:
        """Run this process (its threads started from now on too) on the
        CPUs of the arena's NUMA node(s), so its reads and writes stay local.
        Returns those CPUs; ShmArenaError when the arena is not bound."""
        cpus = set(self.info.get("numa", {}).get("cpus", []))
        if not cpus:
            raise ShmArenaError(
                f"arena {self.name!r} is not bound to a NUMA node, so there is no node to run "
                "next to; start the daemon with --numa-node N to bind it"
            )
        os.sched_setaffinity(0, cpus)
        return cpus
