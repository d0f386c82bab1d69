"""Every message shmarena sends, its shape and its limits, in one place. Pure.

Transport: the daemon binds a ZeroMQ ROUTER at ``ipc://<runtime dir>/<name>.sock``,
clients connect a DEALER. Each request is one frame of msgpack holding a short
array; a message may carry up to MAX_FRAMES requests, handled in order (a
client sends its queued one-way posts in the same message as the request that
follows them: one wake-up of the daemon instead of two). Each reply is a
message of one frame:

    request:      [op, request_id, arg, ...]
    ok reply:     [0, request_id, result, ...]
    error reply:  [1, request_id, code, message, details]
    late error:   [2, request_id, code, message, details]   (of a one-way request)
    push:         [3, kind, payload]        (unasked, to a LISTEN socket; see below)

``request_id`` is chosen by the client; a reply carries the id of the request
it answers. Requests that change state (SEQUENCED_OPS: the mutating ones and
POST) are numbered 1, 2, 3 ... per session, in sending order; the others
carry ids with FREE_ID_BIT set. The daemon applies each sequence number once
and in order: a repeat (a retry after `retry_s`, or a frame sent again after
a restart) is answered from a small per-session reply cache (POST: dropped),
never executed twice; a number beyond the next one gets a ``resend`` error
whose details hold ``seen``, the last number applied, and the client sends
its unconfirmed frames after that one again. A daemon with a persistent
table keeps ``seen`` and the last reply across restarts.

The first request of a session must be HELLO (protocol version, pid, process
start time in clock ticks since boot). A version the daemon does not speak gets
a ``protocol`` error naming both versions. Any other request from a socket the
daemon has no session for (a restarted daemon, a session ended by its lease)
gets a ``session_lost`` error saying which; the client then says hello again.
A daemon restarted on a persistent arena knows a client socket again by its
routing id (chosen at random by the client, kept in the table), so a running
client goes on in its session without a new hello; a ``resend`` late error
with request id 0 tells it which of its requests the daemon has.

Requests, in the order of ``Op`` (arguments after the request id):

    HELLO      version:int, pid:int, start_ticks:int, label:str, resume:[int]
               -> info:map  (see daemon/handlers/sessions.py for the keys)
               `resume` is [session, token] from an earlier hello of this same
               process: the daemon binds this socket to that session again if
               it still exists (info "resumed": true), else opens a new one.
    BYE        -> [blocks, bytes] recycled with the session
    PING       -> now:float               (also serves as heartbeat)
    ALLOC      size:int, owner:str|nil, detached:bool, wait_s:num, site:str -> handle
               `site` labels where the block was allocated (owners show it)
               with wait_s > 0 an alloc that does not fit waits (first come,
               first served among waiters) until frees make room, then
               out_of_memory; quota_exceeded never waits
    ALLOC_MANY sizes:[int], owner:str|nil, detached:bool, site:str -> [handle] (all or none)
    FREE       handles:[handle]           -> [blocks, bytes]  (all or none)
    OWNER      name:str, detached:bool, quota:int -> owner:map (its "id" names it in
               ASSIGN events); quota >= 0 sets the owner's quota (0: none), -1 leaves it
    RECYCLE    name:str                   -> [blocks, bytes]
    RETAIN     handles:[handle]           -> count
    RELEASE    handles:[handle]           -> count
    FILL       fills:[int], mark:int, sizes:[int], owner:str|nil, detached:bool
               -> [[offset] per fill, [handle] per size, notices:[int]]
               Cache refill: `fills` is flat (class_bytes, count, need) triples;
               `need` blocks of each class are required (all or none, with the
               `sizes` allocated directly), up to `count` are taken if they fit.
               `mark` is a generation of this session's space that is newer than
               any it handed out before: the new cache blocks start there.
    POST       events:[int]               one-way: no reply unless refused
               Cache bookkeeping and frees, flat (see EVENTS below).
    SYNC       -> notices:[int], pushed:int   everything sent before is applied; `pushed`:
               NOTICES pushes sent to this session so far (see LISTEN)
    STATS      reset_peak:bool -> map
               reset_peak (administrators): peak_used_bytes becomes the used bytes
               now; the map (taken after) has "previous_peak_used_bytes" and
               "previous_peak_at". Not a sequenced op: a retry resets again.
    OWNERS     cursor:str, page:int, order:str -> [map], next:str|nil
    CLIENTS    cursor:str, page:int  -> [map], next:str|nil
               Listings come in pages of at most `page` rows (capped at
               MAX_LISTING_ROWS), from `cursor` ("": the start) on; `next` is
               the cursor of the following page, nil after the last. A request
               without `page` (0) gets the first page's rows alone, as a
               client before paging expects (only MAX_LISTING_ROWS of them).
               Owners come detached first, then by bytes (most first), then
               by name; clients by session. A page starts after the last row
               of the one before in that order, so an owner that exists and
               keeps its size for the whole listing is in it exactly once; one
               created, recycled or resized meanwhile may be missing or come
               twice (the client keeps its later row). OWNERS with order
               "bytes" answers one page only (no cursor; `next` is nil): the
               `page` owners holding most bytes, then by name, in one pass
               however many owners exist (what `shmarena top` shows).
    CHECK      -> [problem:str]  (empty when healthy)
    SHUTDOWN   -> nil, then the daemon stops
    SEGMENTS   -> [map]   the arena's segments now: index, size, and where
                          to map it (``shm``: a name, or ``path`` and ``offset``),
                          and ``gens``: where its generation table lives (a map
                          of the same kind, plus ``serial``, which changes when
                          the daemon makes the table anew under the same name)

Named buffers and queues (see daemon/exchange.py). Requests that may wait
carry ``wait_s``: the daemon keeps the request and answers it as soon as it
can be met, or with its refusal when ``wait_s`` runs out; a repeat of a kept
request (the client's retry) is dropped, not run again.

    PUBLISH    name:str, handle, sealed:bool -> nil    binds name to an owned block
    UNPUBLISH  name:str                  -> nil
    LOOKUP     name:str, wait_s:num      -> [handle, sealed:bool]; the block is
                                            retained for this session
    NAMES      prefix:str, cursor:str, page:int -> [map], next:str|nil
               by name, paged as OWNERS
    EVENTS     since:int, prefix:str, wait_s:num
               -> [[seq, kind, name, handle] ...], cursor:int, oldest_seq:int
               events numbered `since` or later (-1: none, just the cursor);
               ask from `cursor` next; oldest_seq > since: some were dropped
    QOPEN      name:str, maxsize:int     -> map (name, maxsize, qsize)
    QPUT       name:str, payload:bin, handles:[handle], wait_s:num -> qsize
               the queue holds a reference on every handle's block
    QGET       name:str, to_session:int, wait_s:num -> [payload:bin, [handle]]:
               the message's references pass to session `to_session` (0: this
               one; else another session of the same process), released like
               retains
    QSTAT      name:str                  -> [qsize, maxsize]
    QCLOSE     name:str                  -> nil    this session stops using the queue
    QUOTA      target:str, bytes:int     -> [target, bytes]: set the quota of owner
               `target` ("": the per-session quota); 0 removes it
    LISTEN     session:int, token:int    -> nil: sent from a second socket of a client
               process, which becomes the session's push socket (one per session; from
               the session's own pid and uid only). Pushes: PUSH_NOTICES with flat
               notices and their number (taken: no FILL or SYNC repeats them); PUSH_RECLAIM with the
               bytes wanted (0: the arena is nearly full): give the cache's free
               blocks back (DRAIN events), then PING (daemon/pressure.py)

Queue ops without a round trip per message (daemon/queues.py has the rules):

    QPUTS name, messages:[payload, [handle], ...]  one-way, into reserved or free room
    QRESERVE name, want, wait_s -> [credit, qsize]          QACK name, count  (one-way)
    QTAKE name, max_count, max_bytes, wait_s -> [[payload, [handle], ...], qsize]
    QUNTAKE name, count -> nil

The arena's layout, read-only (for `shmarena map`):

    BLOCKS     max_blocks:int -> map: "segments": per segment {index, size_bytes, complete,
               "blocks": flat [offset, carved size, holder index] in address order,
               "free": flat [offset, size] of the free runs between them} (offsets
               within the segment); "holders": the owner names the indexes point
               at ("(cached)": in a client cache, "(retained)": freed but still
               retained, "(pinned)": freed, not retained, but still viewed by a
               process); "truncated": true when more than max_blocks blocks (at
               most MAX_BLOCKS_REPLY) exist, the listing then stops there

A handle travels as ``[epoch, segment, offset, size, generation]``.
Everywhere else (FILL results, EVENTS, notices) a block is named by its
*address*, ``segment << 40 | offset``: segment 0's addresses are its offsets.

Generations: the daemon numbers its own allocations from 1 up, below
``1 << GEN_SHIFT``. A client cache numbers the blocks it hands out itself, in
the space of its session: ``(session << GEN_SHIFT) | counter``. So handles
made by a cache without a round trip never collide with anybody else's.

EVENTS, the body of POST, one flat list of integers, applied in order:

    ASSIGN    address, size, generation, owner_id   a cached block handed out
    UNASSIGN  address, generation                  ... and given back to the cache
    FREE      epoch, segment, offset, size, generation   free by handle
    DRAIN     address                              a cached block back to the arena
    PIN       address, generation                  this process still has views of
                                                   the block: keep it out of reuse
    UNPIN     address, generation                  ... its last view is gone

PIN and UNPIN (protocol 7 on) make a
*pinned* block: one that stays out of the arena and out of every cache after
its owner freed or recycled it, until the pinning session sends UNPIN or ends.
A PIN of a cached block of the session's own cache takes it out of the cache
(the client keeps it aside: it was recycled through somebody else while this
process viewed it); the UNPIN then gives it back with a notice. Both are
advisory: a PIN of a block that is no longer live under that generation, and
an UNPIN of a block the session does not pin, are ignored, never refused.

The generation table (shm/gens.py): one 64-bit word per minimum block of each
segment, in shared memory the client maps with the segment (HELLO's and
SEGMENTS' ``gens``): 0 never handed out, a generation: live under it, top
bit set: let go (reason and low generation bits). The daemon writes it for
what it hands out and lets go; a client writes the live word of a block its
cache handed out before that block's handle leaves the process (reading
``Buffer.handle``), and the dead word when it frees such a block; `attach`
reads it. Protocol 7 made these writes a client's duty, so a protocol 6
client (which does not write them) is refused at HELLO: its handles would be
refused by every attach.

Notices (pushed to a LISTEN socket, else in FILL, SYNC and RECYCLE replies) are
flat ``address, generation`` pairs: blocks of this session's cache that went
back to it through somebody else (a free by handle, a recycle, the last release
of a retained block).

Evolving the protocol: a new optional argument goes at the end of a request
and gets a default here, so older clients keep working; a new result goes in a
map (maps may gain keys freely; readers ignore keys they do not know). Anything
else (a changed meaning, a removed argument) bumps ``PROTOCOL_VERSION``.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import Any, NamedTuple

import msgpack

from shmarena.errors import InvalidRequest, ProtocolError, ShmArenaError, to_wire
from shmarena.limits import (
    MAX_BATCH,
    MAX_BLOCKS_REPLY,
    MAX_EVENTS,
    MAX_PAYLOAD_BYTES,
    MAX_WAIT_S,
)

PROTOCOL_VERSION = 8  # 8: LISTEN and pushes, the queue ops 39..43; 7: generation tables

GEN_SHIFT = 40

OK = 0
ERR = 1
LATE_ERR = 2
PUSH = 3  # push kinds, the second item of a push frame:
PUSH_NOTICES = 1
PUSH_RECLAIM = 2

ASSIGN = 1
UNASSIGN = 2
FREE_EVENT = 3
DRAIN = 4
PIN = 5
UNPIN = 6
EVENT_LENGTH = {ASSIGN: 5, UNASSIGN: 3, FREE_EVENT: 6, DRAIN: 2, PIN: 3, UNPIN: 3}


class Op(IntEnum):
    """What a request asks for: the first item of every request frame. Numbers
    are part of the protocol: a new op takes a new number, none is ever reused."""

    HELLO = 1
    BYE = 2
    PING = 3
    ALLOC = 10
    ALLOC_MANY = 11
    FREE = 12
    OWNER = 13
    RECYCLE = 14
    RETAIN = 15
    RELEASE = 16
    FILL = 17
    POST = 18
    SYNC = 19
    STATS = 20
    OWNERS = 21
    CLIENTS = 22
    CHECK = 23
    SHUTDOWN = 24
    SEGMENTS = 25
    PUBLISH = 26
    UNPUBLISH = 27
    LOOKUP = 28
    NAMES = 29
    EVENTS = 30
    QOPEN = 31
    QPUT = 32
    QGET = 33
    QSTAT = 34
    QCLOSE = 35
    BLOCKS = 36
    QUOTA = 37
    LISTEN = 38
    QPUTS = 39
    QRESERVE = 40
    QTAKE = 41
    QACK = 42
    QUNTAKE = 43


class Handle(NamedTuple):
    """Names one block of one arena: small, hashable, picklable, and useless
    in another epoch. Pass it to any process of the same host; that process
    calls ``client.attach(handle)`` to see the same bytes."""

    epoch: int
    segment: int
    offset: int
    size: int
    generation: int


# Argument kinds, checked by `parse_request`.
INT = "int"
STR = "str"
OPT_STR = "str or nil"
BOOL = "bool"
INTS = "list of int"
HANDLES = "list of handles"
EVENTS = "flat list of events"
BIN = "bytes"
NUM = "a number of seconds"
HANDLE = "a handle"
LIST = "a list"  # checked item by item by its handler (QPUTS: daemon/queues.py)

# op -> ((argument name, kind, default or REQUIRED), ...). A trailing argument
# with a default may be omitted by older clients.
REQUIRED = object()
_WAIT = ("wait_s", NUM, 0.0)
SCHEMAS: dict[Op, tuple[tuple[str, str, Any], ...]] = {
    Op.HELLO: (
        ("version", INT, REQUIRED),
        ("pid", INT, REQUIRED),
        ("start_ticks", INT, REQUIRED),
        ("label", STR, ""),
        ("resume", INTS, []),
    ),
    Op.BYE: (),
    Op.PING: (),
    Op.ALLOC: (
        ("size", INT, REQUIRED),
        ("owner", OPT_STR, None),
        ("detached", BOOL, False),
        ("wait_s", NUM, 0.0),
        ("site", STR, ""),
    ),
    Op.ALLOC_MANY: (
        ("sizes", INTS, REQUIRED),
        ("owner", OPT_STR, None),
        ("detached", BOOL, False),
        ("site", STR, ""),
    ),
    Op.FREE: (("handles", HANDLES, REQUIRED),),
    Op.OWNER: (("name", STR, REQUIRED), ("detached", BOOL, False), ("quota", INT, -1)),
    Op.RECYCLE: (("name", STR, REQUIRED),),
    Op.RETAIN: (("handles", HANDLES, REQUIRED),),
    Op.RELEASE: (("handles", HANDLES, REQUIRED),),
    Op.FILL: (
        ("fills", INTS, REQUIRED),
        ("mark", INT, 0),
        ("sizes", INTS, []),
        ("owner", OPT_STR, None),
        ("detached", BOOL, False),
    ),
    Op.POST: (("events", EVENTS, REQUIRED),),
    Op.SYNC: (),
    Op.STATS: (("reset_peak", BOOL, False),),
    Op.OWNERS: (("cursor", STR, ""), ("page", INT, 0), ("order", STR, "")),
    Op.CLIENTS: (("cursor", STR, ""), ("page", INT, 0)),
    Op.CHECK: (),
    Op.SHUTDOWN: (),
    Op.SEGMENTS: (),
    Op.PUBLISH: (("name", STR, REQUIRED), ("handle", HANDLE, REQUIRED), ("sealed", BOOL, True)),
    Op.UNPUBLISH: (("name", STR, REQUIRED),),
    Op.LOOKUP: (("name", STR, REQUIRED), ("wait_s", NUM, 0.0)),
    Op.NAMES: (("prefix", STR, ""), ("cursor", STR, ""), ("page", INT, 0)),
    Op.EVENTS: (("since", INT, -1), ("prefix", STR, ""), ("wait_s", NUM, 0.0)),
    Op.QOPEN: (("name", STR, REQUIRED), ("maxsize", INT, 0)),
    Op.QPUT: (
        ("name", STR, REQUIRED),
        ("payload", BIN, REQUIRED),
        ("handles", HANDLES, []),
        ("wait_s", NUM, 0.0),
    ),
    Op.QGET: (("name", STR, REQUIRED), ("to_session", INT, 0), ("wait_s", NUM, 0.0)),
    Op.QSTAT: (("name", STR, REQUIRED),),
    Op.QCLOSE: (("name", STR, REQUIRED),),
    Op.BLOCKS: (("max_blocks", INT, MAX_BLOCKS_REPLY),),
    Op.QUOTA: (("target", STR, REQUIRED), ("bytes", INT, REQUIRED)),
    Op.LISTEN: (("session", INT, REQUIRED), ("token", INT, REQUIRED)),
    Op.QPUTS: (("name", STR, REQUIRED), ("messages", LIST, REQUIRED)),
    Op.QRESERVE: (("name", STR, REQUIRED), ("want", INT, 1), _WAIT),
    Op.QTAKE: (("name", STR, REQUIRED), ("max_count", INT, 1), ("max_bytes", INT, 0), _WAIT),
    Op.QACK: (("name", STR, REQUIRED), ("count", INT, REQUIRED)),
    Op.QUNTAKE: (("name", STR, REQUIRED), ("count", INT, REQUIRED)),
}


# Ops that change state: their replies are kept for retries with the same id.
# The others are safe to run again and may have large replies, so are not kept.
MUTATING_OPS = frozenset(
    {
        Op.ALLOC,
        Op.ALLOC_MANY,
        Op.FREE,
        Op.OWNER,
        Op.RECYCLE,
        Op.RETAIN,
        Op.RELEASE,
        Op.FILL,
        Op.SYNC,  # its reply hands over notices: a repeat must get the same ones
        Op.PUBLISH,
        Op.UNPUBLISH,
        Op.LOOKUP,  # retains the block
        Op.QOPEN,
        Op.QPUT,
        Op.QGET,  # takes a message
        Op.QCLOSE,
        Op.QUOTA,
        *(Op.QRESERVE, Op.QTAKE, Op.QUNTAKE),  # reserve room, take, put back
    }
)
# Ops whose request the daemon may keep until it can be met (`wait_s`).
WAITING_OPS = frozenset({Op.ALLOC, Op.LOOKUP, Op.EVENTS, Op.QPUT, Op.QGET, Op.QRESERVE, Op.QTAKE})
# Ops that get no reply when they succeed; a refusal comes back as LATE_ERR.
ONE_WAY_OPS = frozenset({Op.POST, Op.QPUTS, Op.QACK})
# Requests that change state are numbered 1, 2, 3 ... per session, in the
# order the client sends them; the daemon applies each number once and in
# order (see daemon/admission.py), so a repeat is answered and not run again, and
# frames lost with a crashed daemon are noticed and sent again. Other requests
# carry ids with FREE_ID_BIT set, outside that sequence.
SEQUENCED_OPS = MUTATING_OPS | ONE_WAY_OPS
FREE_ID_BIT = 1 << 62


class Request(NamedTuple):
    """A request frame as `parse_request` checked it: its op, its id, and its
    arguments converted to what the schema says (handles as Handle, ...)."""

    op: Op
    request_id: int
    args: tuple[Any, ...]


def _is_int(value: object) -> bool:
    return type(value) is int


def _all_ints(values: list[Any]) -> bool:
    """Whether every item is exactly an int (bool is not): the types are
    gathered in C, without a Python call per item."""
    return not set(map(type, values)) - _INT_ONLY


_INT_ONLY = {int}


# Whether a value is of a kind; the kinds whose value is converted as well are
# finished in `_check_arg`.
_ACCEPTS: dict[str, Callable[[Any], bool]] = {
    INT: _is_int,
    STR: lambda value: isinstance(value, str),
    OPT_STR: lambda value: value is None or isinstance(value, str),
    BOOL: lambda value: isinstance(value, bool),
    INTS: lambda value: isinstance(value, list) and len(value) <= MAX_BATCH and _all_ints(value),
    HANDLES: lambda value: isinstance(value, list) and len(value) <= MAX_BATCH,
    LIST: lambda value: isinstance(value, list) and len(value) <= MAX_BATCH,
    BIN: lambda value: isinstance(value, bytes) and len(value) <= MAX_PAYLOAD_BYTES,
    NUM: lambda value: type(value) in (int, float) and 0 <= value <= MAX_WAIT_S,
    EVENTS: lambda value: isinstance(value, list) and len(value) <= MAX_EVENTS and _all_ints(value),
}


def _check_arg(op: Op, name: str, kind: str, value: Any) -> Any:
    if kind == HANDLE:
        return parse_handle(op, value)
    if kind == BIN and isinstance(value, bytes) and len(value) > MAX_PAYLOAD_BYTES:
        raise InvalidRequest(
            f"{op.name.lower()}: argument {name!r} has {len(value)} bytes, at most "
            f"{MAX_PAYLOAD_BYTES} are carried in a request; put larger data in a block",
            op=op.name.lower(),
            argument=name,
        )
    if not _ACCEPTS[kind](value):
        raise _wrong_kind(op, name, kind, value)
    if kind == HANDLES:
        return [parse_handle(op, item) for item in value]
    if kind == NUM:
        return float(value)
    if kind == EVENTS:
        return parse_events(value)
    return value


def _wrong_kind(op: Op, name: str, kind: str, value: Any) -> InvalidRequest:
    shown = type(value).__name__
    limit = MAX_EVENTS if kind == EVENTS else MAX_BATCH
    if kind in (INTS, HANDLES, EVENTS) and isinstance(value, list) and len(value) > limit:
        shown = f"a list of {len(value)} items (at most {limit} per request)"
    return InvalidRequest(
        f"{op.name.lower()}: argument {name!r} must be {kind}, got {shown}",
        op=op.name.lower(),
        argument=name,
    )


def parse_handle(op: Op, value: Any) -> Handle:
    """A Handle from its wire form, or InvalidRequest naming what was wrong."""
    if isinstance(value, list) and len(value) == 5 and _all_ints(value):
        return Handle(*value)
    raise InvalidRequest(
        f"{op.name.lower()}: a handle is [epoch, segment, offset, size, generation] "
        f"as five integers, got {value!r:.80}",
        op=op.name.lower(),
    )


def parse_events(flat: list[int]) -> list[tuple[int, ...]]:
    """Split a POST body into events, or InvalidRequest; nothing is applied
    unless the whole body is well formed."""
    events = []
    index, end = 0, len(flat)
    while index < end:
        kind = flat[index]
        length = EVENT_LENGTH.get(kind)
        if length is None or index + length > end:
            what = "unknown event kind" if length is None else "truncated event"
            raise InvalidRequest(
                f"post: {what} {kind} at position {index} of {end}; nothing was applied",
                op="post",
                position=index,
            )
        events.append(tuple(flat[index : index + length]))
        index += length
    return events


def parse_request(message: Any) -> Request:
    """Check a decoded message against SCHEMAS.

    Raises ProtocolError when it is not a request at all (no id to answer)
    and InvalidRequest when the op or its arguments are wrong.
    """
    if not isinstance(message, list) or len(message) < 2:
        raise ProtocolError(
            "a request is an array [op, request_id, args...]; "
            f"got {type(message).__name__} {message!r:.60}"
        )
    op_code, request_id = message[0], message[1]
    if not _is_int(request_id):
        raise ProtocolError(f"request id must be an integer, got {request_id!r:.40}")
    op = _OPS.get(op_code) if _is_int(op_code) else None
    if op is None:
        raise InvalidRequest(f"unknown op {op_code!r:.40}", op=repr(op_code)[:40])
    plan = _PLANS[op]
    given = len(message) - 2
    if given > len(plan):
        raise InvalidRequest(
            f"{op.name.lower()} takes at most {len(plan)} arguments, got {given}",
            op=op.name.lower(),
        )
    args = []
    for index, (name, kind, default, simple) in enumerate(plan):
        if index < given:
            value = message[index + 2]
            if type(value) in simple:  # the common case, without a call
                args.append(value)
            else:
                args.append(_check_arg(op, name, kind, value))
        elif default is REQUIRED:
            raise InvalidRequest(
                f"{op.name.lower()}: missing argument {name!r}", op=op.name.lower()
            )
        else:
            args.append(default)
    return Request(op, request_id, tuple(args))


_OPS = {int(op): op for op in Op}
# Exact types that pass a kind's check as they are; anything else goes
# through `_check_arg` (which also handles the lists).
_SIMPLE: dict[str, tuple[type, ...]] = {
    INT: (int,),
    STR: (str,),
    OPT_STR: (str, type(None)),
    BOOL: (bool,),
}
_PLANS = {
    op: tuple((name, kind, default, _SIMPLE.get(kind, ())) for name, kind, default in schema)
    for op, schema in SCHEMAS.items()
}


def decode(payload: bytes) -> Any:
    """One frame to a Python value, or ProtocolError. Never executes anything:
    msgpack has no code objects, and extension types are refused."""
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=False,
            ext_hook=_refuse_ext,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - msgpack raises many kinds; all mean "not a message"
        raise ProtocolError(f"undecodable frame ({type(exc).__name__}: {exc})"[:200]) from None


def _refuse_ext(code: int, _data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not part of the protocol")


def encode(message: Any) -> bytes:
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


def encoder() -> Any:
    """A reusable `encode` for a hot loop: one Packer, 2-3x cheaper per
    message than `encode` (which builds a Packer each call). Not thread-safe."""
    return msgpack.Packer(use_bin_type=True).pack


def ok_reply(request_id: int, *result: Any) -> list[Any]:
    return [OK, request_id, *result]


def error_reply(request_id: int, error: ShmArenaError) -> list[Any]:
    code, message, details = to_wire(error)
    return [ERR, request_id, code, message, details]
