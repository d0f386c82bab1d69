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
# A size: a number (digits, '_' between digits, an optional fraction), an
# optional space, then an optional unit: K, M, G, T or P, an optional 'i' and
# an optional 'B' (or a lone B), any case. Every unit is binary: 1K = 1KB =
# 1KiB = 1024, as --size has always read them.
_SIZE_RE = re.compile(
    r"^\s*(\d+(?:_\d+)*)(?:\.(\d+))?\s*(?:([KMGTP])(i?)(B?)|(B?))\s*$", re.IGNORECASE
)
_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}
SIZE_FORMS = (
    "a number of bytes with an optional unit, all binary (1K = 1024): 65536, 1_000_000, "
    "4K, 4KiB, 512MB, 1.5G, 1 GiB"
)


def parse_size(text: str | int) -> int:
    """Bytes from what people type: "65536", "1_000_000", "4K", "4kib", "512mb",
    "1GB", "1 GiB", "1.3G". Units are binary (1K = 1KB = 1KiB = 1024); a
    fraction with a unit is rounded up to a whole byte.

    Raises ValueError naming the text, the accepted forms and, where the
    intent is plain ("1,5G", "1e9", "4X"), the value to write instead.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size must not be negative, got {text}")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(_not_a_size(str(text)))
    digits: str = match.group(1).replace("_", "")
    fraction: str | None = match.group(2)
    shift = _UNITS[(match.group(3) or "").upper()]
    if fraction is None:
        return int(digits) << shift
    # Exact arithmetic (no float): digits.fraction is numerator / scale.
    numerator = int(digits + fraction)
    scale: int = 10 ** len(fraction)
    if not shift:
        raise ValueError(
            f"size {text!r} is not a whole number of bytes: give whole bytes "
            f"({-(-numerator // scale)}), or a unit with the fraction, like {digits}.{fraction}K"
        )
    return -(-(numerator << shift) // scale)  # rounded up to a whole byte


def _not_a_size(text: str) -> str:
    """Why `text` is not a size, with the value meant where that is plain."""
    refusal = f"not a size: {text!r}; write {SIZE_FORMS}"
    stripped = text.strip()
    if stripped.startswith("-"):
        return f"size must not be negative, got {text!r}; write {SIZE_FORMS}"
    guess = _likely_meant(stripped)
    if guess is not None:
        return f"not a size: {text!r}; did you mean {guess}? ({SIZE_FORMS})"
    unit = re.match(r"^\d+(?:_\d+)*(?:\.\d+)?\s*([A-Za-z]+)$", stripped)
    if unit and not _SIZE_RE.match("1" + unit.group(1)):
        return (
            f"not a size: {text!r}: unknown unit {unit.group(1)!r}; the units are B, K, M, G, "
            "T and P, each also as KB or KiB (any case, all binary: 1K = 1024)"
        )
    return refusal


def _likely_meant(text: str) -> str | None:
    """The size `text` was likely meant to be ("1,5G" -> "1.5G", "1,000,000" ->
    "1000000", "1e9" -> "1000000000"), or None when that is not plain."""
    number = re.match(r"^([\d,._eE+]+?)\s*([A-Za-z]*)$", text)
    if not number:
        return None
    figure, unit = number.groups()
    candidates = []
    if re.fullmatch(r"\d{1,3}(,\d{3})+", figure):  # thousands separators
        candidates.append(figure.replace(",", "") + unit)
    elif re.fullmatch(r"\d+,\d+", figure):  # a decimal comma
        candidates.append(figure.replace(",", ".") + unit)
    if re.fullmatch(r"\d+(\.\d+)?[eE]\+?\d{1,2}", figure):  # 1e9, 2.5E6
        value = float(figure)
        if value == int(value):
            candidates.append(f"{int(value)}{unit}")
    for candidate in candidates:
        try:
            parse_size(candidate)
        except ValueError:
            continue
        return candidate
    return None


def short_size(size_bytes: int) -> str:
    """A size as --size takes it, in the largest unit that keeps it whole
    (4K, 64K, 1G); plain bytes when no unit divides it (1000)."""
    for unit, shift in (("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size_bytes and not size_bytes % (1 << shift):
            return f"{size_bytes >> shift}{unit}"
    return str(size_bytes)


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
    """The minimum block, validated: a power of two of at least 64 bytes.
    ValueError names the nearest valid values ("5K: use 4K or 8K")."""
    if min_block_bytes < SMALLEST_MIN_BLOCK_BYTES:
        raise ValueError(
            f"--min-block {min_block_bytes} is below the smallest block, "
            f"{SMALLEST_MIN_BLOCK_BYTES} bytes: use {SMALLEST_MIN_BLOCK_BYTES}"
        )
    if min_block_bytes & (min_block_bytes - 1):
        below = 1 << (min_block_bytes.bit_length() - 1)
        raise ValueError(
            f"--min-block {_with_bytes(min_block_bytes)} must be a power of two: "
            f"use {short_size(below)} or {short_size(below << 1)}"
        )
    return min_block_bytes


def _with_bytes(size_bytes: int) -> str:
    short = short_size(size_bytes)
    return short if short == str(size_bytes) else f"{short} ({size_bytes} bytes)"


def fit_arena_size(size_bytes: int, min_block_bytes: int, option: str = "--size") -> int:
    """The arena size to use for `size_bytes`: rounded up to a multiple of the
    minimum block (the allocator carves whole blocks; the daemon says so when
    it rounds, see `rounding_note`). ValueError below one block, naming the
    smallest valid size."""
    if size_bytes < min_block_bytes:
        raise ValueError(
            f"{option} {size_bytes} bytes is below one minimum block of "
            f"{format_size(min_block_bytes)}: the smallest is {option} "
            f"{short_size(min_block_bytes)} ({min_block_bytes} bytes)"
        )
    return -(-size_bytes // min_block_bytes) * min_block_bytes


def rounding_note(option: str, given_bytes: int, used_bytes: int, min_block_bytes: int) -> str:
    """The line the daemon prints at start when it rounded a size up."""
    return (
        f"{option} {given_bytes} bytes ({format_size(given_bytes)}): using {used_bytes} bytes "
        f"({format_size(used_bytes)}), rounded up to a multiple of the "
        f"{format_size(min_block_bytes)} minimum block"
    )
