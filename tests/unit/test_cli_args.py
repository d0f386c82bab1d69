"""The command line's arguments without a daemon: `shmarena daemon --detach`
starts a child `shmarena daemon` with the options it was given (the child's
command line, parsed again, gives the same options, whichever option is set),
and which owners `recycle --prefix/--older-than` selects from a listing."""

from __future__ import annotations

import argparse

import pytest

from shmarena.cli.admin import _recycle_row, select_owners
from shmarena.cli.daemon import daemon_argv
from shmarena.cli.parser import (
    add_daemon_options,
    build_parser,
    fraction_arg,
    size_arg,
    warn_used_arg,
)
from shmarena.client.owners import Recycled
from shmarena.errors import UnknownOwner

NAME, RUN_DIR = "t-detach", "/tmp/shma-detach"


def daemon_actions() -> list[argparse.Action]:
    """Every option of the `daemon` command but --detach."""
    parser = argparse.ArgumentParser(add_help=False)
    add_daemon_options(parser)
    return [action for action in parser._actions if action.dest != "detach"]


def words_for(action: argparse.Action) -> list[str]:
    """Command-line words that give `action` a value other than its default."""
    flag = action.option_strings[0]
    if action.nargs == 0:
        return [flag]
    if action.choices:
        return [flag, next(c for c in action.choices if c != action.default)]
    if action.default == []:  # repeatable: twice
        return [flag, "alloc", flag, "wake"]
    samples = {size_arg: "64K", fraction_arg: "0.25", float: "0.25", int: "3"}
    text = {**samples, warn_used_arg: "90%"}.get(action.type, "some-text")
    return [flag, text]


def parse(words: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(words)
    args.name, args.run_dir = NAME, RUN_DIR  # as main() resolves them
    return args


def options(args: argparse.Namespace) -> dict[str, object]:
    return {action.dest: getattr(args, action.dest) for action in daemon_actions()}


@pytest.mark.parametrize("action", daemon_actions(), ids=lambda a: a.option_strings[0])
def test_each_option_reaches_the_detached_daemon(action: argparse.Action) -> None:
    given = parse(["daemon", *words_for(action), "--detach"])
    assert getattr(given, action.dest) != action.default
    child = parse(daemon_argv(given))
    assert options(child) == options(given)
    assert not child.detach  # the child runs in the foreground of its own session


def test_all_options_at_once_reach_the_detached_daemon() -> None:
    words = [word for action in daemon_actions() for word in words_for(action)]
    given = parse(["daemon", *words, "--detach"])
    child = parse(daemon_argv(given))
    assert options(child) == options(given)


def test_options_left_at_their_defaults_are_left_out() -> None:
    given = parse(["daemon", "--detach"])
    assert daemon_argv(given) == ["daemon", "--name", NAME, "--runtime-dir", RUN_DIR]


# -- recycle --prefix/--older-than: which owners a listing gives up ----------------


def owner(name: str, age_s: float, session: int = 1, alive: bool = True) -> dict[str, object]:
    return {"name": name, "age_s": age_s, "session": session, "alive": alive, "blocks": 1,
            "bytes": 4096}  # fmt: skip


LISTING = [
    owner("pickle-1", 5.0),
    owner("pickle-2", 500.0),
    owner("batch-1", 500.0),
    owner("session-7", 900.0, session=7),  # a live session's implicit owner
    owner("session-8", 900.0, session=8, alive=False),  # its session has ended
]


def names(rows: list[dict[str, object]]) -> list[object]:
    return [row["name"] for row in rows]


def test_prefix_and_older_than_must_both_hold() -> None:
    assert names(select_owners(LISTING, "pickle-", None)) == ["pickle-1", "pickle-2"]
    assert names(select_owners(LISTING, None, 60)) == ["pickle-2", "batch-1", "session-8"]
    assert names(select_owners(LISTING, "pickle-", 60)) == ["pickle-2"]
    assert names(select_owners(LISTING, "", 0)) == ["pickle-1", "pickle-2", "batch-1", "session-8"]


def test_a_live_sessions_implicit_owner_only_when_the_prefix_names_it() -> None:
    assert "session-7" not in names(select_owners(LISTING, "s", None))
    assert names(select_owners(LISTING, "session", None)) == ["session-7", "session-8"]
    assert names(select_owners(LISTING, "session-7", 0)) == ["session-7"]


class GoneOwners:
    """A client whose every owner was recycled since the listing."""

    def recycle(self, name: str) -> Recycled:
        raise UnknownOwner(f"no owner named {name!r}")


def test_an_owner_gone_since_the_listing_is_skipped() -> None:
    outcome = _recycle_row(GoneOwners(), owner("pickle-1", 5.0), dry_run=False)  # type: ignore[arg-type]
    assert outcome == {"name": "pickle-1", "status": "skipped", "blocks": 0, "bytes": 0}
