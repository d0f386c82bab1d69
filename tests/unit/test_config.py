from __future__ import annotations

import pytest

from shmarena.config import (
    check_min_block,
    fit_arena_size,
    format_size,
    parse_size,
    resolve_name,
    rounding_note,
    runtime_dir,
    short_size,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("65536", 65536),
        ("4K", 4096),
        ("4KiB", 4096),
        ("1G", 1 << 30),
        ("1.5M", 3 << 19),
        (512, 512),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1", "1.3B", "4X"])
def test_parse_size_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(4096) == "4 KiB"
    assert format_size(3 << 19) == "1.5 MiB"
    assert format_size(1 << 30) == "1 GiB"


def test_runtime_dir_order() -> None:
    assert runtime_dir({"SHMARENA_RUNTIME_DIR": "/x/"}, 5) == "/x"
    assert runtime_dir({"XDG_RUNTIME_DIR": "/run/user/5"}, 5) == "/run/user/5/shmarena"
    assert runtime_dir({}, 5) == "/tmp/shmarena-5"


def test_names() -> None:
    assert resolve_name(None, {}) == "default"
    assert resolve_name(None, {"SHMARENA_NAME": "x"}) == "x"
    with pytest.raises(ValueError):
        resolve_name("../etc", {})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.3G", 1395864372),  # 1.3 * 2**30 = 1395864371.2: rounded up to a whole byte
        ("0.1K", 103),
        ("1GB", 1 << 30),
        ("1 GiB", 1 << 30),
        ("1gb", 1 << 30),
        ("512mb", 512 << 20),
        ("1_000_000", 1_000_000),
        ("4kib", 4096),
        ("1Gi", 1 << 30),
        ("512B", 512),
        (" 2 g ", 2 << 30),
    ],
)
def test_parse_size_takes_what_people_type(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("1,5G", "did you mean 1.5G?"),
        ("1,000,000", "did you mean 1000000?"),
        ("1e9", "did you mean 1000000000?"),
        ("1X", "unknown unit 'X'; the units are B, K, M, G, T and P"),
        ("12 apples", "unknown unit 'apples'"),
        ("lots", "write a number of bytes with an optional unit"),
        ("1.2.3G", "write a number of bytes with an optional unit"),
        ("-1", "must not be negative"),
        ("1.3B", "not a whole number of bytes: give whole bytes (2), or a unit"),
        ("1__0", "write a number of bytes"),
    ],
)
def test_parse_size_refusals_say_what_to_write(text: str, said: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_size(text)
    assert said in str(refused.value) and repr(text) in str(refused.value)


def test_short_size_is_the_largest_whole_unit() -> None:
    assert [short_size(n) for n in (4096, 8192, 64 << 10, 1 << 30, 1000, 1536)] == [
        "4K", "8K", "64K", "1G", "1000", "1536",
    ]  # fmt: skip


def test_min_block_not_a_power_of_two_names_the_two_nearest() -> None:
    with pytest.raises(
        ValueError, match=r"--min-block 5K \(5120 bytes\) must be a power of two: use 4K or 8K"
    ):
        check_min_block(5 << 10)
    with pytest.raises(ValueError, match="use 64 or 128"):
        check_min_block(100)
    with pytest.raises(ValueError, match="below the smallest block, 64 bytes: use 64"):
        check_min_block(32)
    assert check_min_block(4096) == 4096


def test_arena_size_is_rounded_up_to_whole_minimum_blocks() -> None:
    assert fit_arena_size(parse_size("1.3G"), 4096) == 1395867648
    assert fit_arena_size(1_000_000_000, 4096) == 1_000_001_536
    assert fit_arena_size(64 << 20, 4096) == 64 << 20  # a multiple stays as it is
    assert fit_arena_size(4097, 64) == 4160
    note = rounding_note("--size", parse_size("1.3G"), 1395867648, 4096)
    assert note == (
        "--size 1395864372 bytes (1.3 GiB): using 1395867648 bytes (1.3 GiB), "
        "rounded up to a multiple of the 4 KiB minimum block"
    )


def test_arena_size_below_one_block_names_the_smallest() -> None:
    with pytest.raises(ValueError, match=r"the smallest is --size 4K \(4096 bytes\)"):
        fit_arena_size(100, 4096)
    with pytest.raises(ValueError, match=r"--max-size 0 bytes is below one minimum block"):
        fit_arena_size(0, 4096, "--max-size")
