"""Every error shmarena can raise, and the table that carries them over the wire.

Each class is named for who caused the failure: the caller passed something
wrong (`InvalidRequest`, `StaleHandle`), the arena cannot satisfy a request
(`OutOfMemory`), the daemon is not there (`DaemonUnavailable`), or the two ends
do not understand each other (`ProtocolError`). `ShmArenaError` is the base and
is never raised itself.

The daemon turns an exception into an error reply in exactly one place
(`daemon/service.py`), the client turns an error reply back into an exception
in exactly one place (`client/transport.py`); both go through `to_wire` and
`from_wire` below. This module is pure: no I/O, and it imports nothing that
loads threads (not even `queue`: see `QueueError`).
"""

from __future__ import annotations

from typing import Any


class ShmArenaError(Exception):
    """Base of every shmarena error. Catch this to catch them all.

    `details` holds the figures behind the message (sizes, names, pids) so a
    program can act on them without parsing text.
    """

    code = "error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details


class OutOfMemory(ShmArenaError, MemoryError):
    """The arena has no free block large enough for the request.

    The message says how much was asked, the largest free block and the free
    total, and whether the arena is full or merely fragmented. Free buffers,
    recycle an owner (`shmarena owners` shows who holds what), or start the
    daemon with a larger `--size`.
    """

    code = "out_of_memory"

    @property
    def requested_bytes(self) -> int:
        return int(self.details.get("requested_bytes", 0))

    @property
    def largest_free_bytes(self) -> int:
        return int(self.details.get("largest_free_bytes", 0))

    @property
    def free_bytes(self) -> int:
        return int(self.details.get("free_bytes", 0))


class QuotaExceeded(OutOfMemory):
    """The allocation would take its owner or its session over a quota
    (`client.owner(name, quota=...)`, `shmarena quota`, or the daemon's
    `--quota-per-session`). The message names the quota, what is held, and
    what to do. A MemoryError like any OutOfMemory."""

    code = "quota_exceeded"


class StaleHandle(ShmArenaError):
    """The handle no longer names a live block.

    It was freed already (double free), its owner was recycled, or it comes
    from another epoch of the arena (the daemon was restarted). The bytes it
    pointed at may belong to someone else now: stop using the buffer.

    The message names the lifetime rule that was broken and what to do;
    `details["rule"]` is its key in LIFETIME_RULES, and where the daemon
    remembers what happened to the block, `details["reason"]` says it
    ("freed", "recycled", "session_ended") with `owner` and `pid`.
    """

    code = "stale_handle"


class SessionLost(StaleHandle):
    """The daemon no longer knows this client's session, so every buffer and
    session-scoped owner the client held is gone.

    Either the daemon was restarted (a new arena: old buffers still read the
    old memory but no longer share it with anyone) or, for a client the daemon
    could not watch by pid, the session's heartbeat lease ran out (a stopped
    process, say) and its blocks were reclaimed. The call that finds this out
    raises it once; the client opens a new session on its next call, or at
    once with `client.reconnect()`. `details["reason"]` is "restarted",
    "lease_expired", "ended" (it said bye) or "moved" (another socket of the
    same process resumed it)."""

    code = "session_lost"


class InvalidRequest(ShmArenaError):
    """The request itself is wrong: a bad size, an unknown owner, a name clash.

    Nothing was changed in the daemon. The message says what was asked and
    what is allowed.
    """

    code = "invalid_request"


class UnknownOwner(InvalidRequest):
    """The named owner does not exist (never created, or already recycled).

    `shmarena owners` lists the owners that do exist.
    """

    code = "unknown_owner"


class NameExists(InvalidRequest):
    """`publish` of a name that is bound already (to another block, or this one).

    Names are unique in an arena: unpublish the old one first, or pick another.
    """

    code = "name_exists"


class UnknownName(InvalidRequest):
    """No block is published under the name (never, or it vanished with its
    block), or `lookup` waited its whole timeout without one appearing.

    `shmarena names` lists the names that exist.
    """

    code = "unknown_name"


class LimitReached(InvalidRequest):
    """A bound the daemon keeps on what one client may make it hold was reached:
    kept (waiting) requests, owners, names or queues per session, bytes queued
    in one queue or in all, rows in one listing.

    `details["limit"]` names the bound (the key under `limits` in `shmarena
    stats`) and `details["value"]` its value. Nothing was changed: finish or
    drop some of what you hold first, or ask the operator to raise the limit.
    """

    code = "limit_reached"


class AccessDenied(ShmArenaError):
    """The operation is administrative (shutdown, quotas, acting on another
    user's owners or blocks) and the calling process's user may not perform
    it. docs/reliability.md, "Access" says who may; nothing was changed."""

    code = "access_denied"


class InternalError(ShmArenaError):
    """A bug in the daemon while handling this request or one of its timers.

    The daemon logged it with its traceback, counted it
    (`counters.internal_errors`) and goes on serving; what the request would
    have changed was undone or set aside. Please report the log lines."""

    code = "internal_error"


class QueueError(ShmArenaError):
    """Base of QueueEmpty and QueueFull; never raised itself.

    A client raises them as `queue.Empty` and `queue.Full` too, so code written
    for `multiprocessing.Queue` catches them unchanged. Those two stdlib classes
    live in `queue`, which imports threading, and the daemon's pure core imports
    this module; so the classes here are the daemon's, and `from_wire` gives a
    client their subclasses that also derive from the stdlib class, built on
    first use (`client_class`). `except shmarena.QueueFull` catches both.
    """

    #: the class of `queue` a client's instance also derives from
    stdlib_base = ""

    def __reduce__(self) -> tuple[Any, ...]:
        # Unpickling happens in a client: it gets the class from_wire gives,
        # the stdlib-compatible one (pickle could not find that one by name).
        return from_wire, (self.code, self.message, self.details)


class QueueEmpty(QueueError):
    """`Queue.get` found no message (within its timeout). In a client also a
    `queue.Empty`, so code written for `multiprocessing.Queue` catches it unchanged."""

    code = "queue_empty"
    stdlib_base = "Empty"


class QueueFull(QueueError):
    """`Queue.put` found the queue at its `maxsize` (within its timeout). In a
    client also a `queue.Full`, as `multiprocessing.Queue` raises."""

    code = "queue_full"
    stdlib_base = "Full"


class DaemonUnavailable(ShmArenaError):
    """No daemon answered at the socket path within the timeout.

    Start one with `shmarena daemon --name NAME` (or check `--name`,
    `SHMARENA_NAME` and `SHMARENA_RUNTIME_DIR`); the message names the socket
    path that was tried.
    """

    code = "daemon_unavailable"


class ProtocolError(ShmArenaError):
    """A message could not be understood: malformed bytes, wrong shape, or a
    protocol version the other end does not speak. Upgrade the side that is
    older; a client and daemon from the same release always agree."""

    code = "protocol"


class Resend(ShmArenaError):
    """The daemon missed requests of this session (it was restarted and they
    were lost with it): `details["seen"]` is the last one it applied. The
    client's transport sends the rest again by itself; users never see this."""

    code = "resend"


class DaemonStartError(ShmArenaError):
    """The daemon could not start: another daemon holds the name, `/dev/shm`
    is too small, or the runtime directory is unusable. The message says which
    and what to do; nothing is left behind."""

    code = "daemon_start"


# -- lifetime errors ----------------------------------------------------------
#
# The rules a StaleHandle says were broken (its details["rule"]): for each, the
# rule in a few words and what to do. `lifetime_error` is the one place that
# turns them into a message, so the client, the daemon and the helpers
# (pickling, arrays, queues) say the same thing the same way.

LIFETIME_RULES: dict[str, tuple[str, str]] = {
    "double_free": (
        "a block is freed once: a free after its free, or after its owner's recycle, "
        "is a double free",
        "free each buffer once and drop it afterwards; when an owner is recycled, do not "
        "free its buffers one by one as well",
    ),
    "use_after_free": (
        "a buffer is used only while its block is live (use after free)",
        "keep the buffer until every use of it is over (a reader in another process keeps "
        "it with attach(handle, retain=True), taken while the block is live); take a new "
        "one with alloc",
    ),
    "owner_recycled": (
        "recycling an owner frees every block it holds: none of them may be used after "
        "the recycle, and a free of one is a double free",
        "finish with an owner's buffers before recycling it; a reader in another process "
        "keeps a block past the recycle with attach(handle, retain=True)",
    ),
    "producer_exited": (
        "the blocks of a session-scoped owner are freed when its process exits (the "
        "producer exited)",
        "keep the producer running until the consumer has attached with retain=True or "
        "loaded the message, or allocate under a detached owner "
        "(client.owner(name, detached=True)), which outlives its process",
    ),
    "loaded_twice": (
        "a dumps message is loaded once: loads recycles the message's owner",
        "pass keep=True to every loads of it but the last (the last one, or "
        "shmarena.discard(data), frees it), or dumps the object again",
    ),
    "freed_before_load": (
        "an arena array that dumps (or a Dask task's result) names in place is not copied: "
        "its producer must keep it alive until the consumer has loaded it",
        "keep the array (or a view of it) referenced in the producer until the consumer's "
        "loads returned, or send a copy outside the arena (array.copy()) that dumps puts "
        "into a block of the message's own",
    ),
    "token_outlived": (
        "a share token names bytes, not a reference: the sharer must keep its array alive "
        "until the receiver has attached",
        "keep the shared array referenced in the sharer until attach_array returned in "
        "the receiver (the receiver's array then keeps the block by itself)",
    ),
    "handle_altered": (
        "a handle is used exactly as it was given out",
        "pass the Handle from buf.handle unchanged (a handle's fields are not to be edited)",
    ),
    "release_unretained": (
        "a process releases only what it retained, once per retain",
        "call release once per attach(handle, retain=True) or retain(handle) of this process",
    ),
}


def lifetime_message(rule: str, asked: str, found: str) -> str:
    """What was asked, what was found, the rule (a key of LIFETIME_RULES) that
    was broken, and what to do: the text of every lifetime error."""
    broken, todo = LIFETIME_RULES[rule]
    return f"{asked}: {found}. Rule: {broken}. What to do: {todo}"


def lifetime_error(rule: str, asked: str, found: str, **details: Any) -> StaleHandle:
    """A StaleHandle for a broken lifetime rule (see `lifetime_message`);
    `details` gain "rule", the rule's key."""
    return StaleHandle(lifetime_message(rule, asked, found), rule=rule, **details)


_BY_CODE: dict[str, type[ShmArenaError]] = {
    cls.code: cls
    for cls in (
        ShmArenaError,
        OutOfMemory,
        QuotaExceeded,
        StaleHandle,
        SessionLost,
        InvalidRequest,
        UnknownOwner,
        NameExists,
        UnknownName,
        LimitReached,
        AccessDenied,
        InternalError,
        QueueEmpty,
        QueueFull,
        DaemonUnavailable,
        ProtocolError,
        Resend,
        DaemonStartError,
    )
}


def to_wire(error: ShmArenaError) -> tuple[str, str, dict[str, Any]]:
    """(code, message, details) of an error, ready to pack."""
    return error.code, error.message, dict(error.details)


_CLIENT_CLASSES: dict[type[ShmArenaError], type[ShmArenaError]] = {}


def client_class(cls: type[ShmArenaError]) -> type[ShmArenaError]:
    """The class a client raises for `cls`: `cls` itself, or for a QueueError its
    subclass that is also the stdlib's `queue.Empty` / `queue.Full`."""
    if not issubclass(cls, QueueError):
        return cls
    if cls not in _CLIENT_CLASSES:
        # Imported here, not at the top: `queue` loads threading, and only a
        # client (never the daemon) turns a wire error into an exception.
        import queue

        namespace = {
            "__module__": __name__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
        }
        base = getattr(queue, cls.stdlib_base)
        _CLIENT_CLASSES[cls] = type(cls.__name__, (cls, base), namespace)
    return _CLIENT_CLASSES[cls]


def from_wire(code: object, message: object, details: object) -> ShmArenaError:
    """The exception for an error reply; unknown codes become the base class
    so an older client still gets the daemon's message."""
    cls = _BY_CODE.get(code, ShmArenaError) if isinstance(code, str) else ShmArenaError
    text = message if isinstance(message, str) else repr(message)
    extra = details if isinstance(details, dict) else {}
    error = client_class(cls)(text)
    error.details = {str(k): v for k, v in extra.items()}
    return error
