"""Every fenced code block of README.md and docs/*.md, checked by its kind.

One test per block, named FILE:LINE (the line of its opening fence). The
fence's info string says what the block is; any other (or none) fails, and
so does an indented code block (four spaces in), which has no kind:

- ```python  run as a script by this interpreter in a fresh process, cwd a
  temp dir, SHMARENA_NAME and SHMARENA_RUNTIME_DIR naming the file's daemon
  (one per file, 256M, started before its first block). Must exit 0 within
  60 s. Blocks of a file run in order: a block may rely on what an earlier
  one left in the daemon, never on its Python variables. After the file's
  last block the daemon's `check()` must be clean.
- ```console  a shell session: each `$ ` line (a trailing `\\` continues it,
  and a here-document's lines up to its terminator are its input) runs by
  `bash -c` in the same dir and environment, where `shmarena` and
  `python` are this checkout's. It must exit 0, or N when the line ends in
  `# exit N`. The lines after it are its output, compared loosely: numbers
  are N and whitespace runs one space; each shown line must be one of the
  real lines (stdout and stderr), in order. A subset is fine; a line `...`
  stands for lines left out, `...` inside a line for any text (a path).
  The file's daemon, whatever its real name, reads as 'default'.
- ```sh  commands shown, not run (root, systemd, docker, hardware). Every
  `shmarena ...` command (after `sudo` or in a `docker run` too) must parse
  with the real parser; a `python`/`pip`/
  `.venv/bin/...` line must name a file, module or extra that exists; any
  other command must be in the allowlist (SH_PROGRAMS in blocks.py).
- ```yaml  must load (yaml.safe_load). A Prometheus rule file (`groups:`)
  needs `alert` and `expr` in every rule, and every `shmarena_*` metric in
  an `expr` must be served by a live daemon's /metrics.
- ```text  output, diagrams, synopses: not run. A synopsis line (starting
  `shmarena `, indented lines continue it) may use only commands and
  --flags that exist.

Directives, in an HTML comment on the line just before a fence (keep them
few): `<!-- docs: needs=dask -->` skips the block when that module is not
installed (never in CI, where the test extras are), `<!-- docs: timeout=120 -->`
gives it more time. Anywhere in a file, `<!-- docs: daemon=none -->` starts
no daemon for it: its blocks start their own (`shmarena daemon --detach`),
the environment still names a unique daemon in a fresh 0700 runtime dir, and
whatever daemon is left there at the end is stopped. Nothing else skips.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

import shmarena
from shmarena import testing
from tests.conftest import Daemon
from tests.docs import blocks, running
from tests.docs.blocks import REPO, Block, DocFile

FILE_DAEMON_SIZE = "256M"


def doc_files() -> list[DocFile]:
    paths = [
        os.path.join(REPO, "README.md"),
        *sorted(glob.glob(os.path.join(REPO, "docs", "*.md"))),
    ]
    return [blocks.parse_markdown(path) for path in paths]


FILES = {doc.path: doc for doc in doc_files()}
BLOCKS = [block for doc in FILES.values() for block in doc.blocks]


@dataclass
class FileRun:
    """The sandbox (and daemon) of one markdown file while its blocks run."""

    doc: DocFile
    sandbox: running.Sandbox
    daemon: Daemon | None = None

    def finish(self) -> list[str]:
        """After the file's last block: the daemon's check, then stop it and
        anything a block left running; return what went wrong."""
        problems: list[str] = []
        try:
            if self.daemon is not None:
                problems += self.check_daemon(self.daemon)
                self.daemon.stop()
                self.daemon.assert_clean()
        finally:
            left = running.stop_daemons_in(self.sandbox.run_dir)
            if self.daemon is not None:
                left += self.daemon.remove_leftovers()
            self.sandbox.remove()
        if left:
            problems.append(f"{self.doc.path}: a daemon left these behind: {left}")
        return problems

    def check_daemon(self, daemon: Daemon) -> list[str]:
        """The file's daemon, still running, passes its own check()."""
        try:
            with shmarena.connect(daemon.name, runtime_dir=daemon.run_dir) as probe:
                broken = probe.check()
        except shmarena.DaemonUnavailable as error:
            return [
                f"{self.doc.path}: the file's daemon is gone after the last block ({error}); "
                "a page whose blocks start and stop their own says <!-- docs: daemon=none -->"
            ]
        if broken:
            return [f"{self.doc.path}: the daemon's check() after the last block: {broken}"]
        return []


class Runs:
    """The files being run, one at a time; whatever is open at the end of
    the module (a deselected last block) is finished then."""

    def __init__(self) -> None:
        self.open: dict[str, FileRun] = {}

    def of(self, doc: DocFile) -> FileRun:
        if doc.path not in self.open:
            sandbox = running.Sandbox.make()
            run = FileRun(doc, sandbox)
            self.open[doc.path] = run
            if doc.starts_daemon:
                run.daemon = Daemon(sandbox.name, sandbox.run_dir, FILE_DAEMON_SIZE)
                run.daemon.start()
        return self.open[doc.path]

    def finish(self, doc: DocFile) -> list[str]:
        run = self.open.pop(doc.path, None)
        return run.finish() if run else []


@pytest.fixture(scope="module")
def runs() -> Iterator[Runs]:
    opened = Runs()
    yield opened
    problems = [p for path in list(opened.open) for p in opened.finish(FILES[path])]
    assert not problems, "\n".join(problems)


class Scraper:
    """The metric names of a live daemon's /metrics, scraped on first use
    from a daemon started with --metrics-port 0 (one per module)."""

    def __init__(self) -> None:
        self.daemon: Daemon | None = None
        self.found: set[str] | None = None

    def names(self) -> set[str]:
        if self.found is None:
            from prometheus_client.parser import text_string_to_metric_families

            self.daemon = Daemon(
                testing.unique_name(),
                testing.new_runtime_dir("shmd-"),
                "16M",
                ["--metrics-port", "0"],
            )
            self.daemon.own_run_dir = True
            self.daemon.start()
            port = self.daemon.client().stats()["metrics"]["port"]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
                text = reply.read().decode()
            self.found = set()
            for family in text_string_to_metric_families(text):
                self.found.add(family.name)
                self.found.update(sample.name for sample in family.samples)
        return self.found

    def close(self) -> None:
        if self.daemon is not None:
            try:
                self.daemon.stop()
                self.daemon.assert_clean()
            finally:
                self.daemon.remove_leftovers()


@pytest.fixture(scope="module")
def scraped() -> Iterator[Scraper]:
    scraper = Scraper()
    yield scraper
    scraper.close()


def missing_modules(block: Block) -> str | None:
    """Why the block is skipped: a module its `needs=` names is not installed."""
    needs = block.directives.get("needs", "")
    missing = [m for m in needs.split(",") if m and importlib.util.find_spec(m.strip()) is None]
    if missing:
        return f"{block.where} needs {', '.join(missing)}, which is not installed"
    return None


def check_static(block: Block, scraped: Scraper) -> list[str]:
    """The checks of the kinds that run nothing."""
    if block.info == "sh":
        return blocks.check_sh(block)
    if block.info == "text":
        return blocks.check_text(block)
    if block.info == "yaml":
        return blocks.check_yaml(block, scraped.names)
    return []


@pytest.mark.parametrize("block", BLOCKS, ids=[block.where for block in BLOCKS])
def test_code_block(block: Block, runs: Runs, scraped: Scraper) -> None:
    doc = FILES[block.path]
    problems = list(block.problems) + blocks.check_kind(block)
    if block is doc.blocks[0]:
        problems += doc.problems
    skip = None if problems else missing_modules(block)
    try:
        if not problems and skip is None:
            if block.info in ("python", "console"):
                run = runs.of(doc)
                check = running.run_python if block.info == "python" else running.run_console
                problems += check(block, run.sandbox)
            else:
                problems += check_static(block, scraped)
    finally:
        if block is doc.blocks[-1]:
            problems += runs.finish(doc)
    assert not problems, "\n".join(problems)
    if skip:
        pytest.skip(skip)
