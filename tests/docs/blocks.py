"""The fenced code blocks of a markdown file, and the checks that need no
daemon: a `sh` block's commands against the real parser and the repository,
a `text` block's synopsis flags, a `yaml` block's syntax and a Prometheus rule
file's metric names, and the rule that every block names one of the kinds.

Every check returns a list of problems (empty: the block is fine), each a
sentence naming the block (FILE:LINE) and what to change, so the harness's
own test can call them directly on synthetic markdown. The kinds and the
directives are described in tests/docs/test_docs.py.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from shmarena.cli.parser import build_parser

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KINDS = ("python", "console", "sh", "yaml", "text")
BLOCK_DIRECTIVES = ("needs", "timeout")
FILE_DIRECTIVES = ("daemon",)

# What a `sh` line may start with besides shmarena, python, pip and .venv/bin/...:
# programs a reader runs by hand. A word not here fails, so a typo is caught.
SH_PROGRAMS = frozenset(
    {
        *("cat", "cd", "chgrp", "chmod", "chown", "cp", "curl", "dask", "docker", "echo"),
        *("export", "free", "git", "grep", "groupadd", "head", "install", "journalctl", "jq"),
        *("kill", "ln", "loginctl", "ls", "mkdir", "mount", "mv", "mypy", "numactl", "podman"),
        *("printf", "ps", "pytest", "rm", "ruff", "source", "sudo", "sysctl", "systemctl"),
        *("tail", "tee", "umount", "useradd", "usermod", "id"),
    }
)

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*docs:(?P<body>.*?)-->\s*$")
_LIST_ITEM = re.compile(r"^([-*+]|\d+[.)])\s")
_FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
_SHELL_OPS = frozenset({"|", "||", "&&", ";", "&"})
_REDIRECTS = frozenset({">", ">>", "<", ">&", "<&", "&>", "&>>", "<<<"})


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it opens (1-based line of the fence), its
    info string, its body (the fence's indentation removed) and the
    directives of the `<!-- docs: ... -->` comment on the line before it."""

    path: str  # as shown in test ids: relative to the repository when inside it
    line: int
    info: str
    body: str
    directives: dict[str, str] = field(default_factory=dict)
    problems: tuple[str, ...] = ()  # found while parsing (a fence never closed)
    indented: bool = False  # an indented code block, which has no kind: a failure

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def body_line(self) -> int:
        """The file's line number of the body's first line."""
        return self.line + 1


@dataclass(frozen=True)
class DocFile:
    """A markdown file's blocks, in order, and its file-wide directives."""

    path: str
    blocks: tuple[Block, ...]
    directives: dict[str, str]
    problems: tuple[str, ...]

    @property
    def starts_daemon(self) -> bool:
        """Whether the harness starts a daemon for this file's blocks."""
        return self.directives.get("daemon") != "none"


def shown_path(path: str) -> str:
    """`path` relative to the repository when it lies inside it (test ids)."""
    absolute = os.path.abspath(path)
    if absolute.startswith(REPO + os.sep):
        return os.path.relpath(absolute, REPO)
    return path


def _parse_directive(text: str, where: str) -> tuple[dict[str, str], list[str]]:
    found: dict[str, str] = {}
    problems = []
    for item in re.split(r"[\s,]+(?=\w+=)", text.strip()):
        key, sep, value = item.partition("=")
        if not sep or not value.strip():
            problems.append(f"{where}: directive {item!r} is not KEY=VALUE")
            continue
        if key not in BLOCK_DIRECTIVES + FILE_DIRECTIVES:
            known = ", ".join(BLOCK_DIRECTIVES + FILE_DIRECTIVES)
            problems.append(f"{where}: unknown directive {key!r} (known: {known})")
            continue
        found[key] = value.strip()
    if found.get("daemon", "none") != "none":
        problems.append(f"{where}: daemon={found['daemon']!r}: the only value is 'none'")
    return found, problems


def _dedent(line: str, indent: int) -> str:
    return line[min(indent, len(line) - len(line.lstrip(" "))) :]


def parse_markdown(path: str, text: str | None = None) -> DocFile:
    """The fenced blocks of the markdown file at `path` (or of `text`)."""
    if text is None:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    name = shown_path(path)
    lines = text.split("\n")
    blocks: list[Block] = []
    file_directives: dict[str, str] = {}
    file_problems: list[str] = []
    i = 0
    while i < len(lines):
        directive = _DIRECTIVE.match(lines[i])
        if directive:
            found, problems = _parse_directive(directive["body"], f"{name}:{i + 1}")
            file_problems += problems
            file_directives.update((k, v) for k, v in found.items() if k in FILE_DIRECTIVES)
            next_line = lines[i + 1] if i + 1 < len(lines) else ""
            if set(found) & set(BLOCK_DIRECTIVES) and not _FENCE.match(next_line):
                file_problems.append(
                    f"{name}:{i + 1}: {', '.join(sorted(set(found) & set(BLOCK_DIRECTIVES)))} "
                    "applies to the block whose fence is on the next line, and none is"
                )
        match = _FENCE.match(lines[i])
        if not match and _opens_indented_code(lines, i):
            end = _indented_code_end(lines, i)
            body = "\n".join(line[4:] for line in lines[i:end]) + "\n"
            blocks.append(Block(name, i + 1, "", body, indented=True))
            i = end
            continue
        if not match:
            i += 1
            continue
        end = _closing_line(lines, i, match["fence"])
        block = Block(
            name,
            i + 1,
            match["info"].strip(),
            # The fence's indentation (a block inside a list item) is not the code's.
            "\n".join(_dedent(line, len(match["indent"])) for line in lines[i + 1 : end]) + "\n",
            _block_directives(lines[i - 1] if i > 0 else ""),
            () if end < len(lines) else (f"{name}:{i + 1}: the block is never closed",),
        )
        blocks.append(block)
        i = end + 1
    return DocFile(name, tuple(blocks), file_directives, tuple(file_problems))


def _opens_indented_code(lines: list[str], i: int) -> bool:
    """Whether line `i` opens an indented code block: four spaces in, after a
    blank line that follows a line at column 0 other than a list item (an
    indented paragraph of a list item is not code)."""
    if not lines[i].startswith("    ") or not lines[i].strip() or i == 0 or lines[i - 1].strip():
        return False
    before = next((line for line in reversed(lines[: i - 1]) if line.strip()), "")
    return bool(before) and not before[0].isspace() and not _LIST_ITEM.match(before)


def _indented_code_end(lines: list[str], i: int) -> int:
    """The index after the last line of the indented code block at `i`."""
    end = i
    while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
        end += 1
    while not lines[end - 1].strip():
        end -= 1
    return end


def _closing_line(lines: list[str], opening: int, fence: str) -> int:
    """The index of the line that closes the fence (len(lines) if none)."""
    closing = re.compile(rf"^ *{re.escape(fence[0])}{{{len(fence)},}}\s*$")
    end = opening + 1
    while end < len(lines) and not closing.match(lines[end]):
        end += 1
    return end


def _block_directives(line: str) -> dict[str, str]:
    """The block directives of the comment on the line before a fence (its
    problems are the file's, reported once)."""
    before = _DIRECTIVE.match(line)
    if not before:
        return {}
    found, _ = _parse_directive(before["body"], "")
    return {k: v for k, v in found.items() if k in BLOCK_DIRECTIVES}


# -- the kind ------------------------------------------------------------------


def check_kind(block: Block) -> list[str]:
    """A block's info string must be one of the kinds, exactly."""
    if block.indented:
        return [
            f"{block.where}: an indented code block, which the test cannot check: make it a "
            f"fenced block of one kind: ```{' ```'.join(KINDS)} (see tests/docs/test_docs.py)"
        ]
    if block.info in KINDS:
        return []
    found = f"info string {block.info!r}" if block.info else "a bare fence (no info string)"
    return [
        f"{block.where}: {found}; every block must say what it is: "
        f"```{' ```'.join(KINDS)} (see tests/docs/test_docs.py)"
    ]


# -- sh ------------------------------------------------------------------------


def logical_lines(body: str) -> list[tuple[int, str]]:
    """(offset of the first line, text) of each line, `\\` continuations joined."""
    joined: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for offset, raw in enumerate(body.rstrip("\n").split("\n")):
        start, text = pending if pending else (offset, "")
        text += raw
        if text.endswith("\\"):
            pending = (start, text[:-1] + " ")
            continue
        pending = None
        joined.append((start, text))
    if pending:
        joined.append(pending)
    return joined


def shell_words(line: str) -> list[list[str]]:
    """The simple commands of a shell line: words, with comments, redirections
    and leading VAR=value assignments removed, split at | && || ; &."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words = list(lexer)
    commands: list[list[str]] = [[]]
    skip_next = False
    for i, word in enumerate(words):
        if skip_next:
            skip_next = False
        elif word in _SHELL_OPS:
            commands.append([])
        elif word in _REDIRECTS:
            skip_next = True
        elif word.isdigit() and i + 1 < len(words) and words[i + 1] in _REDIRECTS:
            continue  # the 2 of 2>file
        elif not commands[-1] and re.match(r"^[A-Za-z_]\w*=", word):
            continue  # FOO=bar before the command
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def parse_shmarena_args(args: list[str]) -> str | None:
    """None when `shmarena ARGS` parses, else argparse's complaint."""
    parser = build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as stop:
        if stop.code not in (0, None):
            return err.getvalue().strip().splitlines()[-1] if err.getvalue() else str(stop)
    return None


def _extras() -> set[str]:
    """The extras of pyproject.toml (read with a regex: tomllib is 3.11+)."""
    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("[project.optional-dependencies]", 1)[-1].split("\n[", 1)[0]
    return set(re.findall(r"^([A-Za-z0-9][\w-]*)\s*=", section, re.MULTILINE))


def _check_pip(args: list[str]) -> list[str]:
    problems = []
    for i, arg in enumerate(args):
        if (
            i > 0
            and args[i - 1] in ("-r", "--requirement")
            and not os.path.exists(os.path.join(REPO, arg))
        ):
            problems.append(f"pip: no requirements file {arg!r} in the repository")
        match = re.match(r"^(shmarena|\./?)\[(?P<extras>[^\]]*)\]$", arg)
        if match:
            unknown = {e.strip() for e in match["extras"].split(",")} - _extras()
            if unknown:
                problems.append(
                    f"pip: no extra {sorted(unknown)} in pyproject.toml "
                    f"(there are: {', '.join(sorted(_extras()))})"
                )
    return problems


def _check_python(args: list[str]) -> list[str]:
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] not in ("-m", "-c"):
        i += 2 if args[i] in ("-X", "-W") else 1
    if i >= len(args):
        return []  # the interpreter itself
    if args[i] == "-c":
        try:
            compile(args[i + 1] if i + 1 < len(args) else "", "<python -c>", "exec")
        except SyntaxError as error:
            return [f"python -c: the code does not compile: {error}"]
        return []
    if args[i] == "-m":
        module = args[i + 1] if i + 1 < len(args) else ""
        if module == "shmarena":
            return _check_shmarena(args[i + 2 :])
        if module == "pip":
            return _check_pip(args[i + 2 :])
        try:
            found = bool(module) and importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its package is missing
            found = False
        return [] if found else [f"python -m {module}: no such module installed"]
    if not os.path.exists(os.path.join(REPO, args[i])):
        return [f"python {args[i]}: no such file in the repository"]
    return []


def _check_shmarena(args: list[str]) -> list[str]:
    complaint = parse_shmarena_args(args)
    return [] if complaint is None else [f"shmarena {shlex.join(args)}: {complaint}"]


def _check_embedded_shmarena(args: list[str]) -> list[str]:
    """A shmarena command inside another one's arguments (`docker run IMAGE
    shmarena daemon --size 1G`) must parse too: from `shmarena COMMAND` on."""
    commands = subcommand_parsers()
    for k, word in enumerate(args[:-1]):
        if word == "shmarena" and args[k + 1] in commands and args[k + 1]:
            return _check_shmarena(args[k + 1 :])
    return []


def check_command(words: list[str]) -> list[str]:
    """Problems of one simple command shown in a `sh` block."""
    program, args = words[0], words[1:]
    if program == "sudo":
        while args and args[0].startswith("-"):
            args = args[2:] if args[0] in ("-u", "-g") else args[1:]
        return check_command(args) if args else []
    if "/.venv/bin/" in f"/{program}":
        program = os.path.basename(program)
    if program == "shmarena":
        return _check_shmarena(args)
    if program in ("python", "python3"):
        return _check_python(args)
    if program in ("pip", "pip3"):
        return _check_pip(args)
    if program in SH_PROGRAMS:
        return _check_embedded_shmarena(args)
    return [
        f"{program!r} is neither shmarena, python, pip nor a program of the `sh` allowlist "
        "(SH_PROGRAMS in tests/docs/blocks.py): a typo, or add it there"
    ]


def check_sh(block: Block) -> list[str]:
    """Every command shown exists and, for shmarena, parses."""
    problems = []
    for offset, line in logical_lines(block.body):
        try:
            commands = shell_words(line)
        except ValueError as error:  # an unclosed quote
            problems.append(f"{block.path}:{block.body_line + offset}: {error}: {line}")
            continue
        for words in commands:
            problems += [
                f"{block.path}:{block.body_line + offset}: {p}" for p in check_command(words)
            ]
    return problems


# -- text: CLI synopses --------------------------------------------------------


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    """The `shmarena` parser's subcommands, by name ("" is the top level)."""
    parser = build_parser()
    found = {"": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def synopses(body: str) -> list[tuple[int, str]]:
    """(offset, text) of each synopsis in a text block: a line starting with
    `shmarena ` and the indented lines right after it, which continue it."""
    found: list[tuple[int, str]] = []
    continuing = False
    for offset, line in enumerate(body.split("\n")):
        if line.startswith("shmarena "):
            found.append((offset, line))
            continuing = True
        elif continuing and line[:1].isspace() and line.strip():
            found[-1] = (found[-1][0], found[-1][1] + "\n" + line)
        else:
            continuing = False
    return found


def synopsis_commands(words: list[str], parsers: dict[str, argparse.ArgumentParser]) -> list[str]:
    """The commands a synopsis names: `status`, or `status | stats | owners`."""
    commands: list[str] = []
    i = 0
    while i < len(words) and words[i] in parsers and words[i]:
        commands.append(words[i])
        if i + 1 >= len(words) or words[i + 1] != "|":
            break
        i += 2
    return commands


def check_text(block: Block) -> list[str]:
    """In a CLI synopsis, every command named exists and every --flag exists
    in that command's parser. Other text is not checked."""
    parsers = subcommand_parsers()
    problems = []
    for offset, synopsis in synopses(block.body):
        where = f"{block.path}:{block.body_line + offset}"
        words = synopsis.split()[1:]
        flags = _FLAG.findall(synopsis)
        commands = synopsis_commands(words, parsers)
        if not commands:
            if flags and words and re.match(r"^[a-z][a-z-]*$", words[0]):
                problems.append(f"{where}: no command {words[0]!r} in `shmarena`")
                continue
            commands = [""]
        for command in commands:
            options = parsers[command]._option_string_actions
            unknown = list(dict.fromkeys(f for f in flags if f not in options))
            if unknown:
                problems.append(
                    f"{where}: `{('shmarena ' + command).strip()}` has no {', '.join(unknown)} "
                    f"(it has: {' '.join(sorted(o for o in options if o.startswith('--')))})"
                )
    return problems


# -- yaml ----------------------------------------------------------------------

_METRIC = re.compile(r"\bshmarena_[A-Za-z0-9_:]*")


def load_yaml(body: str) -> Any:
    """yaml.safe_load of `body` (PyYAML is imported here, not at collection)."""
    try:
        import yaml  # here: only yaml blocks need it
    except ImportError:
        raise AssertionError(
            "checking a yaml block needs PyYAML: pip install -e '.[test]' (distributed brings it)"
        ) from None
    return yaml.safe_load(body)


def rule_metric_names(document: Any) -> tuple[list[str], list[str]]:
    """(problems, metric names used) of a Prometheus rule file's document."""
    problems: list[str] = []
    names: list[str] = []
    groups = document.get("groups") if isinstance(document, dict) else None
    if not isinstance(groups, list) or not groups:
        return ["`groups:` must be a list of rule groups"], names
    for g, group in enumerate(groups):
        rules = group.get("rules") if isinstance(group, dict) else None
        if not isinstance(rules, list) or not rules:
            problems.append(f"group {g}: `rules:` must be a non-empty list")
            continue
        for r, rule in enumerate(rules):
            missing = [k for k in ("alert", "expr") if not isinstance(rule, dict) or k not in rule]
            if missing:
                problems.append(f"group {g} rule {r}: no {' and '.join(missing)}")
                continue
            names += _METRIC.findall(str(rule["expr"]))
    return problems, names


def check_yaml(block: Block, scraped: Callable[[], set[str]]) -> list[str]:
    """The block is YAML; a Prometheus rule file (`groups:`) names only
    metrics that `scraped()` (a live daemon's metric names) has."""
    try:
        document = load_yaml(block.body)
    except AssertionError as error:
        return [f"{block.where}: {error}"]
    except Exception as error:  # noqa: BLE001 any parse error is the block's problem
        return [f"{block.where}: not YAML: {error}"]
    if not (isinstance(document, dict) and "groups" in document):
        return []
    problems, names = rule_metric_names(document)
    problems = [f"{block.where}: {p}" for p in problems]
    if names:
        live = scraped()
        unknown = sorted({n for n in names if not _is_metric(n, live)})
        if unknown:
            problems.append(
                f"{block.where}: the rules use {', '.join(unknown)}, which a live daemon's "
                f"/metrics does not have (it has: {', '.join(sorted(live))})"
            )
    return problems


def _is_metric(name: str, live: Iterable[str]) -> bool:
    known = set(live)
    if name in known:
        return True
    # A histogram's series, and a counter's (its family is named without
    # _total, and a labelled one has no sample before its first increment).
    base = re.sub(r"_(bucket|sum|count|total)$", "", name)
    return base in known
