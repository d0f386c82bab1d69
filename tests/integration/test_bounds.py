"""Everything the daemon keeps per client is bounded, against a real daemon:
owner ids, owners, names, queues, queued bytes, and listings in pages."""

from __future__ import annotations

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
