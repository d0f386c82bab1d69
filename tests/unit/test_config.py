from __future__ import annotations

import pytest

from shmarena.config import format_size, parse_size, resolve_name, runtime_dir


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
