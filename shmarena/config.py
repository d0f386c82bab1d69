"""Defaults, size parsing and naming rules. Pure: values in, values out.

The runtime directory is resolved from an environment mapping and a uid that
the caller passes in, so this module never reads the process environment
itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

DEFAULT_NAME = "default"
DEFAULT_SIZE_BYTES = 1 << 30
DEFAULT_MIN_BLOCK_BYTES = 4096
SMALLEST_MIN_BLOCK_BYTES = 64
DEFAULT_TIMEOUT_S = 5.0
# An unanswered request is sent again (same id) after this long. Replies are
# not lost on a live ipc connection; a resend matters when the daemon was
# restarted or is running with --debug-drop-replies.
DEFAULT_RETRY_S = 1.0
# A session whose process cannot be watched with a pidfd is ended when it has
# sent nothing for this long; its client heartbeats at a third of it.
DEFAULT_LEASE_S = 10.0

ENV_NAME = "SHMARENA_NAME"
ENV_RUNTIME_DIR = "SHMARENA_RUNTIME_DIR"
SHM_PREFIX = "shmarena-"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}


def parse_size(text: str | int) -> int:
    """Bytes from "1G", "512M", "4K", "4KiB", "65536". Units are binary (1K = 1024).

    Raises ValueError naming the text when it is not a size.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size must not be negative, got {text}")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(
            f"not a size: {text!r}; write a number of bytes with an optional unit, "
            "like 65536, 4K, 512M or 1G"
        )
    number, unit, _ = match.groups()
    value = float(number) * (1 << _UNITS[unit.upper()])
    if value != int(value):
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def format_size(size_bytes: int) -> str:
    """Human size with binary units: 512 B, 4 KiB, 1.5 MiB, 1 GiB."""
    value = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.1f} {unit}".replace(".0 ", " ")
        value /= 1024
    raise AssertionError("unreachable")


def format_age(seconds: float) -> str:
    """An age for tables: 42s, 3m07s, 5h02m."""
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "-"


def check_name(name: str) -> str:
    """The daemon name, validated: it becomes a file name and a shm name."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"invalid daemon name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def resolve_name(name: str | None, env: Mapping[str, str]) -> str:
    """The daemon name: the explicit one, else $SHMARENA_NAME, else "default"."""
    return check_name(name or env.get(ENV_NAME) or DEFAULT_NAME)


def runtime_dir(env: Mapping[str, str], uid: int) -> str:
    """$SHMARENA_RUNTIME_DIR, else $XDG_RUNTIME_DIR/shmarena, else /tmp/shmarena-<uid>."""
    explicit = env.get(ENV_RUNTIME_DIR)
    if explicit:
        return explicit.rstrip("/") or "/"
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg:
        return xdg.rstrip("/") + "/shmarena"
    return f"/tmp/shmarena-{uid}"


def socket_path(run_dir: str, name: str) -> str:
    return f"{run_dir}/{name}.sock"


def lock_path(run_dir: str, name: str) -> str:
    return f"{run_dir}/{name}.lock"


def shm_name(name: str, segment: int = 0) -> str:
    """The POSIX shm name of a segment: /shmarena-NAME, then /shmarena-NAME.1, ..."""
    base = f"/{SHM_PREFIX}{name}"
    return base if segment == 0 else f"{base}.{segment}"


def check_min_block(min_block_bytes: int) -> int:
    if min_block_bytes < SMALLEST_MIN_BLOCK_BYTES or min_block_bytes & (min_block_bytes - 1):
        raise ValueError(
            f"--min-block must be a power of two of at least {SMALLEST_MIN_BLOCK_BYTES} bytes, "
            f"got {min_block_bytes}"
        )
    return min_block_bytes


def check_arena_size(size_bytes: int, min_block_bytes: int) -> int:
    if size_bytes < min_block_bytes or size_bytes % min_block_bytes:
        raise ValueError(
            f"--size must be a positive multiple of the minimum block "
            f"({format_size(min_block_bytes)}), got {size_bytes} bytes"
        )
    return size_bytes
