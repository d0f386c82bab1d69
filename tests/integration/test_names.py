"""Named buffers across real processes: publish, lookup that waits, subscribe,
and `shmarena names`."""

from __future__ import annotations

import json
import subprocess

import pytest

import shmarena
from tests.conftest import Daemon, wait_for

# One daemon for the whole module (tests/conftest.py: shared_daemon).
pytestmark = pytest.mark.shared_daemon


def test_lookup_returns_when_another_process_publishes(daemon: Daemon) -> None:
    c = daemon.client()
    child = daemon.python(
        "import shmarena\n"
        "c = shmarena.connect()\n"
        "buf = c.lookup('late/1', timeout=30)\n"
        "print(bytes(buf.view[:5]).decode(), buf.view.readonly, flush=True)\n",
        stdout=subprocess.PIPE,
    )
    wait_for(lambda: c.stats()["waiting_requests"] == 1, what="the child's lookup to wait")
    buf = c.alloc(4096)
    buf.view[:5] = b"hello"
    c.publish("late/1", buf)
    out, _ = child.communicate(timeout=30)
    assert out.split() == ["hello", "True"]  # it got the bytes, sealed
    assert buf.view.readonly  # sealed for the publisher too
    assert c.stats()["waiting_requests"] == 0


# Publishes names p/<tag>/<i> one by one; frees the odd ones, recycles the rest.
PUBLISHER = """
import sys, shmarena
tag, count = sys.argv[1], int(sys.argv[2])
c = shmarena.connect()
with c.owner(f"pub-{tag}") as owner:
    bufs = [owner.alloc(4096) for _ in range(count)]
    for i, buf in enumerate(bufs):
        c.publish(f"p/{tag}/{i}", buf)
    for buf in bufs[1::2]:
        buf.free()
    c.sync()
"""

# Subscribes, says so, then prints every event until it saw `count` of them.
SUBSCRIBER = """
import sys, shmarena
c = shmarena.connect()
count = int(sys.argv[1])
with c.subscribe("p/") as sub:
    print("ready", flush=True)
    for _ in range(count):
        e = sub.get(timeout=60)
        print(e.seq, e.kind, e.name, flush=True)
"""


def test_a_subscriber_sees_every_publish_and_recycle_of_two_publishers_in_order(
    daemon: Daemon,
) -> None:
    count = 40
    expected = 2 * 2 * count  # each name is published once and vanishes once
    watcher = daemon.python(SUBSCRIBER, str(expected), stdout=subprocess.PIPE)
    assert watcher.stdout is not None and watcher.stdout.readline().strip() == "ready"
    c = daemon.client()
    with c.subscribe("p/") as mine:  # a second subscriber, in this process
        publishers = [daemon.python(PUBLISHER, tag, str(count)) for tag in ("a", "b")]
        for publisher in publishers:
            assert publisher.wait(timeout=60) == 0
        out, _ = watcher.communicate(timeout=60)
        theirs = [line.split() for line in out.splitlines()]
        ours = [[str(e.seq), e.kind, e.name] for e in (mine.get(timeout=10) for _ in theirs)]
    assert watcher.returncode == 0
    assert theirs == ours  # both saw one order: the daemon's
    seqs = [int(seq) for seq, _, _ in theirs]
    assert seqs == list(range(seqs[0], seqs[0] + expected))  # none missed, none twice
    names = {f"p/{tag}/{i}" for tag in ("a", "b") for i in range(count)}
    published = [name for _, kind, name in theirs if kind == "publish"]
    recycled = [name for _, kind, name in theirs if kind == "recycle"]
    assert sorted(published) == sorted(recycled) == sorted(names)
    for tag in ("a", "b"):  # each publisher's own events in the order it made them
        mine_pub = [n for n in published if n.startswith(f"p/{tag}/")]
        assert mine_pub == [f"p/{tag}/{i}" for i in range(count)]
        freed = [n for n in recycled if n.startswith(f"p/{tag}/")][: count // 2]
        assert freed == [f"p/{tag}/{i}" for i in range(1, count, 2)]  # the frees came first
    last = {name: i for i, (_, _, name) in enumerate(theirs)}
    first = {name: i for i, (_, _, name) in reversed(list(enumerate(theirs)))}
    assert all(theirs[first[n]][1] == "publish" and first[n] < last[n] for n in names)
    assert c.names("p/") == []


def test_lookup_gives_up_after_its_timeout_naming_the_name(daemon: Daemon) -> None:
    c = daemon.client()
    with pytest.raises(shmarena.UnknownName, match="nope"):
        c.lookup("nope", timeout=0.3)
    assert c.stats()["waiting_requests"] == 0


def test_names_command_lists_what_is_published(daemon: Daemon) -> None:
    c = daemon.client()
    buf = c.alloc(8192)
    c.publish("cli/one", buf, sealed=False)
    rows = json.loads(daemon.cli("names", "--json", check=True).stdout)
    assert [(r["name"], r["bytes"], r["sealed"]) for r in rows] == [("cli/one", 8192, False)]
    table = daemon.cli("names", "--prefix", "cli/", check=True).stdout
    assert "cli/one" in table and "8 KiB" in table
    assert json.loads(daemon.cli("names", "--prefix", "zzz", "--json", check=True).stdout) == []
    buf.free()
    wait_for(lambda: c.names() == [], what="the name to vanish with its block")
