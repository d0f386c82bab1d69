"""Keeping a file-backed arena's table on disk: recovery at start, a commit
per group of changes, compaction, the final snapshot. I/O; the server calls
it, `table` says what the records mean.

Durability (`--durability`):
- ``batch`` (default): the changes of one loop wake-up (up to
  MESSAGES_PER_WAKE messages) go out as one journal frame and one
  `fdatasync`, before any reply of that wake-up is sent;
- ``sync``: the same per request: each reply waits for its own frame;
- ``none``: nothing is written while serving, only a snapshot at a clean
  stop. After a crash the table is unknown: the next start begins empty, with
  a new epoch, and says so.

After each synced write (every commit in ``batch`` and ``sync``, every
snapshot in all modes) the arena file's commit stamp is set to that record's
number (backing.py): a start refuses a table that ends before the stamp, an
older copy put back in place of the current one.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shmarena.config import format_size
from shmarena.daemon.ledger import Ledger
from shmarena.daemon.service import ALLOCATORS, Service
from shmarena.daemon.table import OPEN, Link, State, build, delta, snapshot
from shmarena.daemon.table import inspect as table_inspect
from shmarena.errors import DaemonStartError
from shmarena.shm.backing import (
    Backing,
    discard,
    mount_of,
    open_backing,
    publish,
    read_header,
    table_path,
)
from shmarena.shm.journal import CrashPoints, Journal, Scan, scan

DURABILITY = ("none", "batch", "sync")
RESTORE = (
    "restore the arena file and its table together from one backup, or remove both to start afresh"
)
DEFAULT_COMPACT_BYTES = 8 << 20  # journal size past which it is rewritten


def new_epoch() -> int:
    return secrets.randbits(52) | 1


@dataclass
class Recovered:
    """What a start found in the files, for the log and `stats`."""

    created: bool = False
    reset: str = ""  # why the table was started afresh, or ""
    blocks: int = 0
    owners: int = 0
    sessions: int = 0
    torn_bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


class Store:
    """The on-disk table of one file-backed arena: recovers it at start, commits
    the ledger's changes as journal frames, compacts the journal into a
    snapshot, and writes the final snapshot at a clean stop."""

    def __init__(
        self,
        backing: Backing,
        journal: Journal,
        mode: str,
        compact_bytes: int,
        log: Callable[[str], None],
    ) -> None:
        self.backing = backing
        self.journal = journal
        self.mode = mode
        self.compact_bytes = compact_bytes
        self.log = log
        self.failed = ""  # why writing failed; nothing more is written then
        self.recovered = Recovered()
        self.mount, self.fstype, self.dax = mount_of(backing.path)

    @classmethod
    def open(
        cls,
        path: str,
        size_bytes: int | None,
        min_block_bytes: int | None,
        allocator: str | None,
        name: str,
        mode: str,
        gid: int | None,
        crash: CrashPoints,
        compact_bytes: int,
        log: Callable[[str], None],
    ) -> tuple[Store, State]:
        """Open (or make) the backing file and read its table. DaemonStartError,
        with both files untouched, when they cannot be used."""
        if mode not in DURABILITY:
            raise DaemonStartError(f"--durability {mode!r}: must be one of {', '.join(DURABILITY)}")
        backing = open_backing(path, size_bytes, min_block_bytes, allocator, name, gid)
        journal = Journal(table_path(backing.path), backing.header.identity, mode != "none", crash)
        store = cls(backing, journal, mode, compact_bytes, log)
        try:
            state = store._read()
        except BaseException:
            discard(backing)
            raise
        journal.commit = state.commit
        return store, state

    def _read(self) -> State:
        started = time.monotonic()
        found = self.recovered
        if self.backing.created:
            found.created = True
            return State(epoch=new_epoch(), valid=True)
        header = self.backing.header
        state, result = read_table(self.backing.path, header.identity, header.commit)
        if header.commit is None:
            found.notes.append(
                "the arena file has no commit stamp yet (made by an earlier release): a table "
                "older than the arena cannot be told this time; it gets one now"
            )
        found.torn_bytes = result.torn_bytes
        if result.torn_bytes:
            found.notes.append(
                f"dropped a torn journal tail of {result.torn_bytes} bytes "
                f"({result.problem}): a write a crash cut short, never acknowledged"
            )
        if not state.valid:
            found.reset = (
                "the last daemon ran with --durability none and did not stop cleanly, so "
                "its allocations were not kept; the arena starts empty with a new epoch "
                "(handles from before are refused)"
            )
            # The commit numbers go on rising: the stamp never moves back.
            state = State(
                epoch=new_epoch(), generation=state.generation, valid=True, commit=state.commit
            )
        found.seconds = time.monotonic() - started
        return state

    def build(self, state: State, name: str, now: float) -> tuple[Ledger, dict[int, Link]]:
        """The ledger the table describes, checked (DaemonStartError if not)."""
        header = self.backing.header
        space = ALLOCATORS[header.allocator](header.data_bytes, header.min_block_bytes)
        try:
            ledger, links = build(state, name, space, now)
        except (ValueError, TypeError, KeyError) as exc:
            problems = [str(exc)]
        else:
            problems = ledger.check()
        if problems:
            raise DaemonStartError(
                f"the allocation table of {self.backing.path} is inconsistent: "
                f"{problems[0]}"
                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                + f"; both files were left untouched; `shmarena inspect {self.backing.path}` "
                "lists every problem"
            )
        found = self.recovered
        found.blocks, found.owners, found.sessions = (
            len(ledger.blocks), len(ledger.owners), len(ledger.sessions),
        )  # fmt: skip
        return ledger, links

    def begin(self, service: Service, final_path: str) -> None:
        """Write the table as it stands now (dropping any torn tail) and, for
        a new file, move it to its name. Then the daemon may serve."""
        try:
            self._rewrite(service, clean=False)
            if self.backing.created:
                publish(self.backing, os.path.abspath(final_path))
                self.journal.path = table_path(self.backing.path)
            if self.mode == "none":
                self.journal.append({"k": OPEN, "mode": "none"})
        except BaseException:
            discard(self.backing)
            raise

    def _rewrite(self, service: Service, clean: bool) -> None:
        extra = {"clean": clean, "mode": self.mode}
        self.journal.rewrite(snapshot(service.ledger, service.links(), extra))
        self.backing.stamp(self.journal.commit)  # the new journal is synced

    def commit(self, service: Service) -> None:
        """Write what changed since the last commit (nothing in mode none).
        An error here is fatal to the daemon: the caller stops it."""
        changes = service.ledger.take_changes()
        if not changes or self.mode == "none" or self.failed:
            return
        try:
            journal = self.journal
            journal.append(delta(service.ledger, service.link, changes))
            if journal.sync:  # a stamp is never ahead of what is on disk
                self.backing.stamp(journal.commit)
            if journal.bytes > self.compact_bytes and journal.bytes > 4 * journal.snapshot_bytes:
                self._rewrite(service, clean=False)
        except OSError as exc:
            self.failed = f"writing the allocation table {self.journal.path} failed: {exc.strerror}"
            raise

    def rewrite(self, service: Service) -> None:
        """Write the whole table again (after a commit failed by a bug, so no
        change it took is lost). An OSError here is fatal, as in `commit`."""
        if self.mode == "none" or self.failed:
            return
        try:
            self._rewrite(service, clean=False)
        except OSError as exc:
            self.failed = f"writing the allocation table {self.journal.path} failed: {exc.strerror}"
            raise

    def close(self, service: Service | None) -> None:
        """A clean stop: the final snapshot (in every mode), then close."""
        try:
            if service is not None and not self.failed:
                self._rewrite(service, clean=True)
        finally:
            self.journal.close()
            self.backing.close()

    def stats(self) -> dict[str, Any]:
        found, journal = self.recovered, self.journal
        return {
            "backing": self.backing.path,
            "backing_fs": self.fstype,
            "backing_mount": self.mount,
            "dax": self.dax,
            "durability": self.mode,
            "journal_bytes": journal.bytes,
            "journal_commits": journal.appends,
            "journal_syncs": journal.syncs,
            "journal_commit": journal.commit,
            "recovered": {
                "created": found.created,
                "reset": found.reset,
                "blocks": found.blocks,
                "owners": found.owners,
                "sessions": found.sessions,
                "torn_bytes": found.torn_bytes,
                "seconds": round(found.seconds, 4),
            },
        }

    def describe(self) -> str:
        header = self.backing.header
        found = self.recovered
        where = f"{self.backing.path} ({self.fstype}{', DAX' if self.dax else ''})"
        if found.created:
            what = f"made a new {format_size(header.data_bytes)} arena in {where}"
        else:
            what = (
                f"recovered {where}: {found.blocks} blocks, {found.owners} owners, "
                f"{found.sessions} sessions waiting to resume, in {found.seconds * 1000:.1f} ms"
            )
        if self.mode == "none":
            return (
                f"{what}; durability none: the allocation table is written only at a clean "
                "stop; if this daemon crashes, the next start cannot trust it and begins "
                "with an empty arena and a new epoch"
            )
        return f"{what}; durability {self.mode}"


def read_table(path: str, identity: bytes, stamp: int | None) -> tuple[State, Scan]:
    """The table of the arena file `path` folded into a State, and what the
    scan found. DaemonStartError when it is missing, belongs to another
    arena, ends before the arena's commit `stamp` (an older copy), or is
    damaged in a way no crash produces."""
    table = table_path(path)
    result = scan(table)
    if result.identity != identity:
        raise DaemonStartError(
            f"allocation table {table} belongs to another arena than {path} (identity "
            "differs); both were left untouched"
        )
    state = State()
    try:
        for record in result.records:
            state.apply(record)
    except (ValueError, KeyError, TypeError) as exc:
        raise DaemonStartError(
            f"allocation table {table} is damaged ({exc}); both files were left "
            f"untouched; `shmarena inspect {path}` shows more"
        ) from None
    if not state.snapshots:
        raise DaemonStartError(
            f"allocation table {table} holds no complete snapshot ({result.problem or 'none'}"
            "); a daemon always writes one before serving, so the table is damaged. Both "
            f"files were left untouched; {RESTORE}"
        )
    if stamp is not None and state.commit < stamp:
        raise DaemonStartError(
            f"allocation table {table} is older than the arena {path}: the table ends at "
            f"commit {state.commit}, the arena file says commit {stamp} was written. Blocks "
            "allocated after the table's last commit would be handed out again while their "
            f"data is in use. Both files were left untouched; put back the table this arena "
            f"was last written with, or {RESTORE}"
        )
    return state, result


def inspect_file(path: str) -> tuple[dict[str, Any], list[str]]:
    """Read a backing file and its table without a daemon (and without
    changing either): a report, and every inconsistency found (empty when
    the table is sound). A file that cannot be read at all is a problem too."""
    report: dict[str, Any] = {"path": os.path.abspath(path), "notes": []}
    try:
        header = read_header(path)
    except DaemonStartError as exc:
        return report, [str(exc)]
    report["header"] = {
        "format": header.format,
        "data_offset": header.data_offset,
        "size_bytes": header.data_bytes,
        "min_block_bytes": header.min_block_bytes,
        "allocator": header.allocator,
        "identity": header.identity.hex(),
        "created_at": header.created_at,
        "name": header.name,
        "commit_stamp": header.commit,
    }
    try:
        state, result = read_table(path, header.identity, header.commit)
    except DaemonStartError as exc:
        return report, [str(exc)]
    report.update(
        epoch=state.epoch,
        commit=state.commit,
        generation=state.generation,
        records=state.records,
        journal_bytes=result.good_bytes,
        torn_bytes=result.torn_bytes,
        clean=state.clean,
        durability=state.mode,
    )
    if result.torn_bytes:
        report["notes"].append(
            f"torn tail of {result.torn_bytes} bytes ({result.problem}): a write a crash cut "
            "short, never acknowledged; a daemon drops it at start"
        )
    if not state.valid:
        report["notes"].append(
            "the table was not kept: the last daemon ran with --durability none and did not "
            "stop cleanly; a daemon starts this arena empty with a new epoch"
        )
        return report, []
    ledger, problems = table_inspect(
        state, header.name, lambda: ALLOCATORS[header.allocator](
            header.data_bytes, header.min_block_bytes
        ), time.time(),
    )  # fmt: skip
    if ledger is not None:
        space = ledger.space
        report.update(
            used_bytes=ledger.owned_bytes,
            cached_bytes=ledger.cached_bytes,
            free_bytes=space.free_bytes,
            largest_free_bytes=space.largest_free_bytes(),
            owners=[
                {
                    "name": o.name,
                    "scope": o.scope,
                    "session": o.session_id,
                    "pid": o.pid,
                    "blocks": len(o.blocks),
                    "bytes": o.bytes,
                }
                for o in ledger.owners.values()
            ],
            sessions=[
                {"session": s.id, "pid": s.pid, "label": s.label, "cached_blocks": len(s.cached)}
                for s in ledger.sessions.values()
            ],
            blocks=[
                {
                    "offset": b.address,
                    "size": b.size,
                    "carved": b.carved,
                    "generation": b.generation,
                    "owner": b.owner,
                    "cached": b.cached,
                    "retainers": sorted(b.retainers or ()),
                    "pinned_by": sorted(b.pins or ()),
                }
                for b in sorted(ledger.blocks.values(), key=lambda b: b.address)
            ],
        )
    return report, problems
