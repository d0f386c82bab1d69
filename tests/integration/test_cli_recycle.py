"""`shmarena recycle --prefix/--older-than/--dry-run`, run as a user would,
against a real daemon: only the selected owners go, and the figures show it."""

from __future__ import annotations

import json
from typing import Any

import shmarena
from shmarena.testing import wait_until
from tests.conftest import Daemon


def owner_names(client: shmarena.Client) -> set[str]:
    return {row["name"] for row in client.list_owners()}


def without_ages(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "age_s"} for row in rows]


def age_of(client: shmarena.Client, name: str) -> float:
    (row,) = [row for row in client.list_owners() if row["name"] == name]
    return float(row["age_s"])


def test_prefix_recycles_only_the_matching_owners(daemon: Daemon) -> None:
    client = daemon.client(cache=False)  # used_bytes is then exactly what the owners hold
    client.owner("pickle-1a", detached=True).alloc(8192)
    client.owner("pickle-2b", detached=True).alloc_many([4096, 4096])
    client.owner("batch-1", detached=True).alloc(4096)
    assert client.stats()["used_bytes"] == 20480
    result = daemon.cli("recycle", "--prefix", "pickle-", check=True)
    lines = result.stdout.splitlines()
    assert lines == [
        "recycled 'pickle-1a': 1 blocks, 8 KiB",
        "recycled 'pickle-2b': 2 blocks, 8 KiB",
        "total: 2 owners, 3 blocks, 16 KiB recycled",
    ]
    assert client.stats()["used_bytes"] == 4096
    assert owner_names(client) == {"batch-1"}
    nothing = daemon.cli("recycle", "--prefix", "pickle-", check=True)
    assert (
        nothing.stdout
        == "no owner matches --prefix 'pickle-' (1 owners in all); nothing recycled\n"
    )
    as_json = json.loads(daemon.cli("recycle", "--prefix", "batch", "--json", check=True).stdout)
    assert as_json == [{"name": "batch-1", "status": "recycled", "blocks": 1, "bytes": 4096}]
    assert client.stats()["used_bytes"] == 0


def test_older_than_recycles_only_the_old_owners(daemon: Daemon) -> None:
    client = daemon.client(cache=False)
    client.owner("job-old", detached=True).alloc(4096)
    wait_until(lambda: age_of(client, "job-old") >= 3.0, 30, "job-old 3 s old")
    client.owner("job-young", detached=True).alloc(8192)
    result = daemon.cli("recycle", "--older-than", "3s", check=True)
    assert result.stdout.splitlines() == [
        "recycled 'job-old': 1 blocks, 4 KiB",
        "total: 1 owner, 1 block, 4 KiB recycled",
    ]
    assert owner_names(client) == {"job-young"}
    assert client.stats()["used_bytes"] == 8192
    # Both selectors: both must hold (job-young is too young for 1 day).
    both = daemon.cli("recycle", "--prefix", "job-", "--older-than", "1d", check=True)
    assert both.stdout.startswith("no owner matches --prefix 'job-' --older-than 86400s")
    assert owner_names(client) == {"job-young"}


def test_dry_run_prints_the_owners_and_changes_nothing(daemon: Daemon) -> None:
    client = daemon.client(cache=False)
    client.owner("pickle-x", detached=True).alloc(4096)
    client.owner("pickle-y", detached=True).alloc(4096)
    client.owner("batch-z", detached=True).alloc(4096)
    before = without_ages(client.list_owners())
    result = daemon.cli("recycle", "--prefix", "pickle-", "--dry-run", check=True)
    assert result.stdout.splitlines() == [
        "would recycle 'pickle-x': 1 blocks, 4 KiB",
        "would recycle 'pickle-y': 1 blocks, 4 KiB",
        "total: 2 owners, 2 blocks, 8 KiB would be recycled (dry run: nothing changed)",
    ]
    as_json = json.loads(
        daemon.cli("recycle", "--prefix", "", "--older-than", "0s", "--dry-run", "--json",
                   check=True).stdout
    )  # fmt: skip
    assert {row["name"] for row in as_json} == {"pickle-x", "pickle-y", "batch-z"}
    assert {row["status"] for row in as_json} == {"would recycle"}
    assert without_ages(client.list_owners()) == before
    assert client.stats()["used_bytes"] == 3 * 4096


def test_a_live_sessions_implicit_owner_goes_only_when_the_prefix_names_it(
    daemon: Daemon,
) -> None:
    client = daemon.client(cache=False)
    client.alloc(4096)  # held by the implicit owner session-N of a live session
    client.owner("leak-1", detached=True).alloc(4096)
    implicit = f"session-{client.session}"
    assert owner_names(client) == {implicit, "leak-1"}
    result = daemon.cli("recycle", "--older-than", "0s", check=True)
    assert implicit not in result.stdout and "'leak-1'" in result.stdout
    assert owner_names(client) == {implicit}
    named = daemon.cli("recycle", "--prefix", "session-", check=True)
    assert f"recycled {implicit!r}: 1 blocks, 4 KiB" in named.stdout
    assert client.stats()["used_bytes"] == 0


def test_usage_errors_exit_2_saying_what_to_do(daemon: Daemon) -> None:
    client = daemon.client(cache=False)
    client.owner("keep-me", detached=True).alloc(4096)
    for args, said in (
        ([], "name an OWNER, or select owners with --prefix P and/or --older-than AGE"),
        (["keep-me", "--prefix", "k"], "not both"),
        (["--prefix", ""], '--prefix "" matches every owner: add --older-than AGE'),
        (["--older-than", "soon"], "is not an age"),
    ):
        result = daemon.cli("recycle", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert said in result.stderr, (args, result.stderr)
    assert owner_names(client) == {"keep-me"}
    one = daemon.cli("recycle", "keep-me", "--dry-run", check=True)
    assert one.stdout == "would recycle 'keep-me': 1 blocks, 4 KiB\n"
    assert owner_names(client) == {"keep-me"}
    assert daemon.cli("recycle", "keep-me", check=True).stdout == (
        "recycled 'keep-me': 1 blocks, 4 KiB\n"
    )
