"""`shmarena daemon --detach` starts a child `shmarena daemon` with the options
it was given: the child's command line, parsed again, gives the same options,
whichever option (present or added later) is set."""

from __future__ import annotations

import argparse

import pytest

from shmarena.cli.daemon import daemon_argv
from shmarena.cli.parser import (
    add_daemon_options,
    build_parser,
    fraction_arg,
    size_arg,
    warn_used_arg,
)

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
