"""Everything the daemon keeps per client is bounded, against a real daemon:
owner ids, owners, names, queues, queued bytes, and listings in pages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import shmarena
from tests.conftest import Daemon


def session_row(client, session: int) -> dict:
    return next(r for r in client.list_clients() if r["session"] == session)


def test_a_long_session_of_batches_keeps_only_live_owner_ids(daemon: Daemon) -> None:
    """The README's pattern: `with client.owner(f"batch-{i}")` for ever."""
    client = daemon.client()
    for i in range(2000):
        with client.owner(f"batch-{i}") as batch:
            batch.alloc(100)  # from the cache: an ASSIGN naming the owner's id
    client.sync()
    assert session_row(client, client.session)["owner_ids"] == 1  # its own owner
    assert client.stats()["owners"] == 0  # every batch was recycled
    assert client.check() == []


def test_an_owner_used_again_after_its_recycle_takes_its_blocks(daemon: Daemon) -> None:
    client = daemon.client()
    batch = client.owner("reused")
    batch.alloc(100)
    assert batch.recycle().blocks == 1
    batch.alloc(200)  # the old id was forgotten: the owner is opened again
    batch.alloc(300)
    client.sync()
    rows = {r["name"]: r for r in client.list_owners()}
    assert rows["reused"]["blocks"] == 2
    assert session_row(client, client.session)["owner_ids"] == 2
    assert client.check() == []


def test_queued_in_band_bytes_stop_at_the_limit_with_a_clear_error(daemon: Daemon) -> None:
    """The finding: puts of ~64 KB took the daemon's heap to 2 GiB, unseen."""
    client = daemon.client()
    queue = shmarena.Queue(client=client)
    payload = b"x" * 64_000  # pickled in-band: no block
    limits = client.stats()["limits"]
    bound = limits["queued_payload_bytes_per_queue"]
    puts = 0
    with pytest.raises(shmarena.LimitReached) as refused:
        for _ in range(bound // len(payload) + 1):
            queue.put(payload)
            puts += 1
    assert refused.value.details["limit"] == "queued_payload_bytes_per_queue"
    assert refused.value.details["value"] == bound
    assert "queued_payload_bytes_per_queue" in str(refused.value)
    assert bound // (len(payload) + 200) <= puts < bound // len(payload)
    stats = client.stats()
    assert bound - 70_000 < stats["queued_payload_bytes"] <= bound
    assert stats["queues"][0]["qsize"] == puts and stats["used_bytes"] == 0
    assert queue.get() == payload  # a get makes room for one more
    queue.put(payload)
    queue.close()
    assert client.stats()["queued_payload_bytes"] == 0
    assert client.check() == []


def test_a_listing_longer_than_a_page_arrives_whole(daemon: Daemon) -> None:
    """More owners than one reply carries: the client and `shmarena owners`
    page through them and show every one, in the listing's order."""
    client = daemon.client()
    count = client.stats()["limits"]["listing_rows"] + 50
    client.alloc(4096)  # the session's own owner, with bytes: sorts after the detached
    for i in range(count):
        client.owner(f"leak-{i:05}", detached=True)
    rows = client.list_owners()
    assert len(rows) == count + 1
    assert [r["name"] for r in rows[:-1]] == [f"leak-{i:05}" for i in range(count)]
    assert rows[-1]["name"] == f"session-{client.session}"
    listed = json.loads(daemon.cli("owners", "--json", check=True).stdout)
    assert [r["name"] for r in listed] == [r["name"] for r in rows]
    wide = {**daemon.env, "COLUMNS": "200"}  # a table row per line, names whole
    shown = subprocess.run(
        [sys.executable, "-m", "shmarena", "owners"], env=wide, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    assert sum(" leak-" in line for line in shown.stdout.splitlines()) == count
    small = daemon.client()
    small.listing_page = 7  # the same paging at a small page: sessions, names too
    assert [r["name"] for r in small.list_owners()] == [r["name"] for r in rows]
    assert {r["session"] for r in small.list_clients()} == {client.session, small.session}
    handles = [client.alloc(4096) for _ in range(10)]
    for i, buf in enumerate(handles):
        client.publish(f"n-{i}", buf)
    assert [r["name"] for r in small.names("n-")] == sorted(f"n-{i}" for i in range(10))
    assert client.check() == []
