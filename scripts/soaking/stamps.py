"""What the soak writes into every buffer and how it is checked, plus the
small helpers its child processes share. Imported by every spawned child:
keep it light."""

from __future__ import annotations

import math
import random
import signal
import struct
from multiprocessing.connection import Connection
from typing import Any

MIN_SIZE = 64
MAX_SIZE = 4 << 20
# The stamp's header: magic, worker id, incarnation, sequence number, size, offset.
HEADER = struct.Struct("<8sIIQQQ")
MAGIC = b"SHMSOAK1"
# The body is a slice of one pseudo-random pattern, the same in every process,
# starting at a shift derived from the header.
PATTERN_SEED = 0x50A1
PATTERN_SHIFTS = 4093
# Worker -> checker: the handle (epoch, segment, offset, size, generation), then
# worker id, incarnation and sequence number. Checker -> worker: a sequence
# number the checker found stale.
HANDOFF = struct.Struct("<QQQQQQQQ")
STALE_ACK = struct.Struct("<Q")

COUNT_KEYS = (
    "allocs",
    "frees",
    "recycles",
    "oom",
    "verified",
    "handoffs",
    "stale_acks",
    "errors",
    "corrupted",
)

_PATTERN: bytes | None = None


def pattern() -> bytes:
    global _PATTERN
    if _PATTERN is None:
        _PATTERN = random.Random(PATTERN_SEED).randbytes(MAX_SIZE + PATTERN_SHIFTS)
    return _PATTERN


def body_shift(wid: int, inc: int, seq: int) -> int:
    return (seq * 7919 + wid * 131 + inc * 17) % PATTERN_SHIFTS


def write_stamp(view: memoryview, wid: int, inc: int, seq: int, offset: int) -> None:
    size = len(view)
    view[: HEADER.size] = HEADER.pack(MAGIC, wid, inc, seq, size, offset)
    shift = body_shift(wid, inc, seq)
    view[HEADER.size :] = memoryview(pattern())[shift : shift + size - HEADER.size]


def stamp_problem(view: memoryview, wid: int, inc: int, seq: int, offset: int) -> str | None:
    """None when `view` holds exactly the stamp written for (wid, inc, seq) at
    `offset`, else what differs (where, expected, found)."""
    size = len(view)
    expected_header = HEADER.pack(MAGIC, wid, inc, seq, size, offset)
    header = bytes(view[: HEADER.size])
    if header != expected_header:
        return (
            f"header of w{wid}.{inc} seq {seq} (offset {offset:#x}, {size} B) differs: "
            f"expected {HEADER.unpack(expected_header)}, found {HEADER.unpack(header)}"
        )
    shift = body_shift(wid, inc, seq)
    if pattern().startswith(view[HEADER.size :], shift):  # a memcmp, no copy
        return None
    expected = pattern()[shift : shift + size - HEADER.size]
    body = bytes(view[HEADER.size :])
    first = next(i for i in range(len(body)) if body[i] != expected[i])
    wrong = sum(1 for a, b in zip(body, expected, strict=True) if a != b)
    return (
        f"body of w{wid}.{inc} seq {seq} (offset {offset:#x}, {size} B) differs at byte "
        f"{HEADER.size + first} (expected {expected[first]:#04x}, found {body[first]:#04x}); "
        f"{wrong} byte(s) wrong"
    )


def log_uniform_size(rng: random.Random) -> int:
    value = math.exp(rng.uniform(math.log(MIN_SIZE), math.log(MAX_SIZE)))
    return max(MIN_SIZE, min(MAX_SIZE, int(value)))


def ignore_sigint() -> None:
    """In child processes: Ctrl-C is the parent's business; it stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def send_quietly(conn: Connection, message: Any) -> bool:
    try:
        conn.send(message)
        return True
    except (OSError, ValueError):
        return False
