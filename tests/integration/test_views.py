"""`shmarena top` and `shmarena map` against a real daemon, run as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from shmarena.views import FREE_RGB, MARGIN, STRIP_HEIGHT, holder_rgb, image_size
from tests.conftest import Daemon

MIB = 1 << 20


def fragment(daemon: Daemon, count: int = 64) -> list:
    """Fill the 64 MiB arena with `count` 1 MiB blocks of owner "frames",
    then free every other one by address: used and free alternate."""
    client = daemon.client(cache=False)  # the daemon's exact fit, no cache blocks
    owner = client.owner("frames")
    buffers = sorted((owner.alloc(MIB) for _ in range(count)), key=lambda b: b.handle.offset)
    client.free(buffers[::2])
    client.sync()
    return buffers[1::2]


def test_top_once_shows_the_bar_and_the_owners(daemon: Daemon) -> None:
    client = daemon.client(cache=False)
    big = client.owner("ingest-batch", detached=True)
    kept = [big.alloc(4 * MIB) for _ in range(3)]
    client.owner("small").alloc(MIB)
    result = daemon.cli("top", "--once", check=True)
    out = result.stdout
    assert "usage [" in out and "used 13 MiB" in out, out
    bar = out.split("usage [", 1)[1].split("]", 1)[0]
    assert len(bar) == 50 and bar.count("#") == round(50 * 13 / 64), bar
    assert "ingest-batch" in out and "small" in out and "12 MiB" in out, out
    assert out.index("ingest-batch") < out.index("small")  # by bytes, largest first
    assert "requests" in out and "/s" in out and "round trip" in out, out
    assert "reclaims" in out
    assert len(kept) == 3


def test_top_shows_the_biggest_owners_of_many_and_counts_them_all(daemon: Daemon) -> None:
    """`top` asks for its rows' worth of the biggest owners in one request
    (OWNERS order 'bytes'), not every owner, and still says how many exist."""
    client = daemon.client(cache=False)
    for i in range(30):
        client.owner(f"leak-{i:02}", detached=True)
    big = client.owner("big", detached=False)
    kept = [big.alloc(2 * MIB), client.owner("mid", detached=True).alloc(MIB)]
    assert [r["name"] for r in client.top_owners(2)] == ["big", "mid"]
    everyone = sorted(client.list_owners(), key=lambda r: (-r["bytes"], r["name"]))
    assert [r["name"] for r in client.top_owners(5)] == [r["name"] for r in everyone[:5]]
    out = daemon.cli("top", "--once", "--rows", "3", check=True).stdout
    owners = client.stats()["owners"]
    assert f"top owners by bytes ({owners} in all)" in out, out
    assert out.index("big") < out.index("mid") and "leak-29" not in out, out
    with pytest.raises(ValueError):
        client.top_owners(0)
    assert len(kept) == 2


def test_top_refuses_a_bad_interval(daemon: Daemon) -> None:
    result = daemon.cli("top", "--once", "--interval", "0")
    assert result.returncode == 2 and "--interval" in result.stderr


def test_map_text_shows_a_fragmented_arena(daemon: Daemon) -> None:
    empty = daemon.cli("map", check=True).stdout
    line = next(x for x in empty.splitlines() if x.startswith("seg  0 "))
    assert line.split()[2] == "." * 64, line
    fragment(daemon)
    out = daemon.cli("map", "--width", "64", check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("seg  0 "))
    cells = line.split()[2]
    assert len(cells) == 64, line
    assert cells == ".A" * 32, line  # 1 MiB per cell: free, used, free, used ...
    assert "A frames" in out and ". free" in out, out
    assert "fragmentation 0.969" in out, out  # 1 - 1 MiB largest of 32 MiB free
    assert "free blocks by order" in out


def test_map_png_of_a_fragmented_arena(daemon: Daemon) -> None:
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        empty_path, full_path = os.path.join(tmp, "empty.png"), os.path.join(tmp, "frag.png")
        daemon.cli("map", "--png", empty_path, "--png-width", "512", check=True)
        with Image.open(empty_path) as image:
            assert image.size == image_size(1, 0, 512)
            row = [image.getpixel((MARGIN + x, MARGIN + STRIP_HEIGHT // 2)) for x in range(512)]
        assert set(row) == {FREE_RGB}  # a freshly-empty arena: all free colour
        fragment(daemon)
        result = daemon.cli("map", "--png", full_path, "--png-width", "512", check=True)
        assert "wrote" in result.stdout
        with Image.open(full_path) as image:
            assert image.size == image_size(1, 1, 512)
            y = MARGIN + STRIP_HEIGHT // 2
            row = [image.getpixel((MARGIN + x, y)) for x in range(512)]
            above = image.getpixel((MARGIN + 10, MARGIN - 2))
    assert set(row) == {FREE_RGB, holder_rgb(0)}, set(row)
    changes = sum(a != b for a, b in zip(row, row[1:], strict=False))
    assert changes == 63, changes  # 64 alternating runs of 8 pixels
    assert row[:8] == [FREE_RGB] * 8 and row[8:16] == [holder_rgb(0)] * 8
    assert above == (255, 255, 255)  # the margin stays background


def test_map_width_is_checked(daemon: Daemon) -> None:
    result = daemon.cli("map", "--width", "0")
    assert result.returncode == 2 and "--width" in result.stderr


def test_map_png_without_pillow_names_the_extra(daemon: Daemon) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # A PIL package that fails to import stands in for a missing Pillow.
        os.mkdir(os.path.join(tmp, "PIL"))
        with open(os.path.join(tmp, "PIL", "__init__.py"), "w") as f:
            f.write("raise ImportError('no Pillow here')\n")
        env = daemon.env
        env["PYTHONPATH"] = tmp + os.pathsep + env["PYTHONPATH"]
        target = os.path.join(tmp, "out.png")
        result = subprocess.run(
            [sys.executable, "-m", "shmarena", "map", "--png", target],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result
        assert "pip install 'shmarena[map]'" in result.stderr and target in result.stderr
        assert not os.path.exists(target)
