"""Leak hunting against a real daemon: an injected leak (a detached owner
never recycled, allocated at a labelled site) is found by `shmarena owners
--older-than` with its site, and SHMARENA_TRACK_SITES=1 labels allocations
with their caller."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import Daemon, wait_for

# The leak: a process allocates into a detached owner at the site "decoder"
# and exits without recycling it. Its age is what the filter looks at.
LEAKER = """
import shmarena
c = shmarena.connect()
leak = c.owner("frames-leaked", detached=True)
for _ in range(3):
    leak.alloc(1 << 20, site="decoder")
leak.alloc(4096, site="thumbnail")
c.close()
"""


def test_an_injected_leak_is_found_with_its_site(daemon: Daemon) -> None:
    leaker = daemon.python(LEAKER)
    assert leaker.wait(timeout=60) == 0
    client = daemon.client()
    wait_for(
        lambda: any(r["age_s"] >= 3.0 for r in client.list_owners()),
        what="the leak to be three seconds old",
    )
    young = client.owner("fresh", detached=True)
    young.alloc(8192, site="fresh-site")
    rows = json.loads(daemon.cli("owners", "--older-than", "2s", "--json", check=True).stdout)
    assert all(r["age_s"] >= 2.0 for r in rows)  # the filter keeps only the old ones
    assert "frames-leaked" in [r["name"] for r in rows]
    (leak,) = [r for r in rows if r["name"] == "frames-leaked"]
    assert leak["scope"] == "detached" and leak["alive"] is False
    assert leak["sites"][0] == {"site": "decoder", "blocks": 3, "bytes": 3 << 20}
    assert leak["sites"][1]["site"] == "thumbnail"
    # The table's cells wrap at a pipe's width, so the JSON above is what is checked.
    table = daemon.cli("owners", "--older-than", "2s", "--sort", "bytes", check=True).stdout
    print(f"\nFIGURE: shmarena owners --older-than 2s --sort bytes:\n{table}")
    everyone = json.loads(daemon.cli("owners", "--sort", "bytes", "--json", check=True).stdout)
    assert [r["name"] for r in everyone][0] == "frames-leaked"  # most bytes first
    bad = daemon.cli("owners", "--older-than", "soon")
    assert bad.returncode == 2 and "10m" in bad.stderr
    client.recycle("frames-leaked")
    client.recycle("fresh")


def test_tracked_sites_point_at_the_calling_code(daemon: Daemon) -> None:
    env = {**daemon.env, "SHMARENA_TRACK_SITES": "1"}
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import shmarena\n"
            "c = shmarena.connect()\n"
            "def load_frame():\n"
            "    return c.owner('tracked', detached=True).alloc(65536)\n"
            "load_frame()\n",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    client = daemon.client()
    (row,) = [r for r in client.list_owners() if r["name"] == "tracked"]
    (site,) = row["sites"]
    assert site["site"] == "<string>:4 load_frame" and site["blocks"] == 1
    client.recycle("tracked")
