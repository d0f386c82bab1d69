"""The docs harness can fail: synthetic markdown with a broken block of each
kind is reported as a problem by the checking functions of tests/docs, and
good blocks are not. Only the last test starts a daemon (one block leaves it
running, the harness stops it)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.docs import blocks, running
from tests.docs.blocks import Block, DocFile

BROKEN = """\
# A page with one broken block of each kind

```python
import sys
print("about to fail")
sys.exit(3)
```

```console
$ echo hello
goodbye
```

```sh
shmarena owners --oldr-than 10m
```

```
a bare fence
```
"""


def parse(text: str, tmp_path: os.PathLike[str]) -> DocFile:
    path = os.path.join(tmp_path, "page.md")
    with open(path, "w") as f:
        f.write(text)
    doc = blocks.parse_markdown(path)
    assert doc.path == path
    return blocks.parse_markdown("page.md", text)


def block(info: str, body: str, **directives: str) -> Block:
    return Block("page.md", 1, info, body, directives)


@pytest.fixture
def sandbox() -> Iterator[running.Sandbox]:
    made = running.Sandbox.make()
    yield made
    assert running.stop_daemons_in(made.run_dir) == []
    made.remove()


def test_each_broken_block_is_a_failure_naming_its_line(
    tmp_path: os.PathLike[str], sandbox: running.Sandbox
) -> None:
    python, console, sh, bare = parse(BROKEN, tmp_path).blocks

    assert [b.info for b in (python, console, sh, bare)] == ["python", "console", "sh", ""]
    [failed] = running.run_python(python, sandbox)
    assert failed.startswith("page.md:3: the python block exited with 3")
    assert "about to fail" in failed
    [unmatched] = running.run_console(console, sandbox)
    assert unmatched.startswith("page.md:10: `echo hello` did not print the shown line 'goodbye'")
    [unknown_flag] = blocks.check_sh(sh)
    assert unknown_flag.startswith("page.md:15: shmarena owners --oldr-than 10m: ")
    assert "unrecognized arguments: --oldr-than" in unknown_flag
    [bare_fence] = blocks.check_kind(bare)
    assert bare_fence.startswith("page.md:18: a bare fence (no info string)")
    assert blocks.check_kind(block("pycon", "")) != []
    assert [blocks.check_kind(b) for b in (python, console, sh)] == [[], [], []]


def test_console_output_is_compared_loosely_but_in_order(sandbox: running.Sandbox) -> None:
    printing = "$ printf 'used   12.5 MiB of 64 MiB\\nowners: 3\\nnames: 0\\n'\n"
    loose = block("console", printing + "used 1.0 MiB of 2 MiB\n...\nnames: 7\n")
    assert running.run_console(loose, sandbox) == []
    swapped = block("console", printing + "names: 0\nowners: 3\n")
    assert "did not print the shown line 'owners: 3'" in running.run_console(swapped, sandbox)[0]


def test_console_exit_status_is_zero_unless_declared(sandbox: running.Sandbox) -> None:
    declared = block("console", "$ bash -c 'echo refused >&2; exit 3'  # exit 3\nrefused\n")
    assert running.run_console(declared, sandbox) == []
    undeclared = block("console", "$ false\n$ echo never\n")
    assert "`false` exited with 1, the block says 0" in running.run_console(undeclared, sandbox)[0]
    continued = block("console", "$ echo one \\\n  two\none two\n")
    assert running.run_console(continued, sandbox) == []
    heredoc = block(
        "console",
        "$ cat > hello.py <<'EOF'\nprint('hello', 6 * 7)\nEOF\n$ python hello.py\nhello 42\n"
        "$ python -c 'raise SystemExit(5)' <<EOF  # exit 5\nignored\nEOF\n",
    )
    assert running.run_console(heredoc, sandbox) == []
    assert (
        "output before any `$ ` command" in running.run_console(block("console", "x\n"), sandbox)[0]
    )


def test_console_runs_this_checkout_as_shmarena_and_python(sandbox: running.Sandbox) -> None:
    shown = block(
        "console",
        "$ shmarena --version\nshmarena 1.2.3\n"
        "$ python -c 'import shmarena, sys; print(shmarena.__file__)'\n"
        f"{blocks.REPO}/shmarena/__init__.py\n",
    )
    assert running.run_console(shown, sandbox) == []


def test_sh_lines_must_exist_and_parse() -> None:
    good = block(
        "sh",
        "# a comment\n"
        "sudo systemctl enable --now shmarena@default   # the unit\n"
        "pip install 'shmarena[metrics]'\n"
        "SHMARENA_NAME=media shmarena owners --older-than 10m \\\n"
        "    --sort bytes --json | head -1\n"
        "python scripts/bench.py --only dask\n"
        "python -m shmarena status --json 2>/dev/null\n"
        ".venv/bin/python -m pytest -q\n"
        "docker run -d --name shmarena IMAGE shmarena daemon --size 1G\n",
    )
    assert blocks.check_sh(good) == []
    bad = block(
        "sh",
        "shmarenaa status\n"
        "pip install 'shmarena[nope]'\n"
        "python scripts/no_such_script.py\n"
        "python -m no_such_module_here\n"
        "sudo shmarena daemon --size lots\n"
        "docker run --name shmarena IMAGE shmarena daemon --sizee 1G\n",
    )
    problems = blocks.check_sh(bad)
    assert [p.split(":")[1] for p in problems] == ["2", "3", "4", "5", "6", "7"]
    assert "'shmarenaa' is neither shmarena" in problems[0]
    assert "no extra ['nope']" in problems[1]
    assert "no such file" in problems[2] and "no such module" in problems[3]
    assert "--size" in problems[4]
    assert "shmarena daemon --sizee 1G: " in problems[5]


def test_a_synopsis_may_name_only_flags_its_command_has() -> None:
    good = block(
        "text",
        "shmarena daemon [--size 1G] [--detach]\n"
        "                [--metrics-port P]\n"
        "shmarena status | stats | owners  [--json]\n"
        "a diagram line with --anything in it\n",
    )
    assert blocks.check_text(good) == []
    bad = block(
        "text",
        "shmarena daemon [--size 1G]\n    [--sise 1G]\nshmarena status | shutdown [--json]\n"
        "shmarena frobnicate --now\n",
    )
    problems = blocks.check_text(bad)
    assert len(problems) == 3
    assert "`shmarena daemon` has no --sise" in problems[0]
    assert "`shmarena shutdown` has no --json" in problems[1]
    assert "no command 'frobnicate'" in problems[2]


def test_a_prometheus_rule_may_name_only_served_metrics() -> None:
    def served() -> set[str]:
        return {
            "shmarena_used_bytes",
            "shmarena_arena_size_bytes",
            "shmarena_request_duration_seconds",
        }

    rules = (
        "groups:\n- name: shmarena\n  rules:\n"
        "  - alert: ShmarenaFull\n"
        "    expr: shmarena_used_bytes / shmarena_arena_size_bytes > 0.9\n"
        "  - alert: ShmarenaSlow\n"
        "    expr: histogram_quantile(0.99,\n"
        "      rate(shmarena_request_duration_seconds_bucket[5m])) > 0.01\n"
    )
    assert blocks.check_yaml(block("yaml", rules), served) == []
    typo = rules.replace("shmarena_used_bytes", "shmarena_usedbytes")
    assert "shmarena_usedbytes" in blocks.check_yaml(block("yaml", typo), served)[0]
    no_expr = "groups:\n- name: g\n  rules:\n  - alert: A\n"
    assert "no expr" in blocks.check_yaml(block("yaml", no_expr), served)[0]
    assert "not YAML" in blocks.check_yaml(block("yaml", "a: [1, 2\n"), served)[0]
    assert blocks.check_yaml(block("yaml", "services:\n  shmarena: {}\n"), served) == []


def test_directives(tmp_path: os.PathLike[str]) -> None:
    doc = parse(
        "<!-- docs: daemon=none -->\n\n"
        "<!-- docs: needs=dask, timeout=120 -->\n```python\npass\n```\n\n"
        "<!-- docs: skip=yes -->\n```text\nx\n```\n",
        tmp_path,
    )
    assert not doc.starts_daemon
    first, second = doc.blocks
    assert first.directives == {"needs": "dask", "timeout": "120"}
    assert running.timeout_of(first) == 120.0
    assert second.directives == {}
    assert doc.problems == ("page.md:8: unknown directive 'skip' (known: needs, timeout, daemon)",)

    astray = parse(
        "<!-- docs: timeout=5 -->\n\n```python\npass\n```\n```text\nnever closed\n", tmp_path
    )
    assert astray.problems == (
        "page.md:1: timeout applies to the block whose fence is on the next line, and none is",
    )
    assert astray.blocks[0].directives == {}
    assert astray.blocks[1].problems == ("page.md:6: the block is never closed",)


def test_a_daemon_a_block_leaves_running_is_stopped(sandbox: running.Sandbox) -> None:
    detach = block(
        "console",
        "$ shmarena daemon --detach --size 16M\n"
        "shmarena daemon 'default' running, pid 4242, log .../default.log\n",
    )
    assert running.run_console(detach, sandbox) == []
    assert running.daemon_names_in(sandbox.run_dir) == [sandbox.name]
    assert os.path.exists(f"/dev/shm/shmarena-{sandbox.name}")

    assert running.stop_daemons_in(sandbox.run_dir) == []

    assert running.daemon_names_in(sandbox.run_dir) == []
    assert not os.path.exists(f"/dev/shm/shmarena-{sandbox.name}")


def test_a_python_block_that_hangs_fails_at_its_timeout(sandbox: running.Sandbox) -> None:
    hangs = block("python", "import time\ntime.sleep(60)\n", timeout="1")
    [problem] = running.run_python(hangs, sandbox)
    assert problem.startswith("page.md:1: still running after 1 s")


def test_every_markdown_file_of_docs_is_collected() -> None:
    from tests.docs.test_docs import FILES

    pages = {
        f"docs/{f}" for f in os.listdir(os.path.join(blocks.REPO, "docs")) if f.endswith(".md")
    }
    assert set(FILES) == {"README.md"} | pages


WALKTHROUGH = """\
<!-- docs: daemon=none -->

```console
$ shmarena daemon --detach --size 32M
shmarena daemon 'default' running, pid 4242, log ...
```

```python
import shmarena

with shmarena.connect() as client:
    client.publish("frames/1", client.alloc(4096))
    print(client.stats()["names"])
```

```console
$ shmarena status
...
```
"""


def test_a_file_without_a_harness_daemon_runs_its_own_and_it_is_stopped(
    tmp_path: os.PathLike[str],
) -> None:
    from tests.docs.test_docs import Runs

    doc = parse(WALKTHROUGH, tmp_path)
    assert not doc.starts_daemon
    runs = Runs()
    run = runs.of(doc)
    assert run.daemon is None
    try:
        results = [
            (running.run_console if b.info == "console" else running.run_python)(b, run.sandbox)
            for b in doc.blocks
        ]
        assert results == [[], [], []]
        assert running.daemon_names_in(run.sandbox.run_dir) == [run.sandbox.name]
    finally:
        assert runs.finish(doc) == []  # stopped the daemon the first block left running
    assert not os.path.exists(run.sandbox.run_dir)
    assert not os.path.exists(f"/dev/shm/shmarena-{run.sandbox.name}")


def test_rules_are_checked_against_a_live_scrape() -> None:
    from tests.docs.test_docs import Scraper

    scraper = Scraper()
    try:
        served = scraper.names()
        assert {"shmarena_up", "shmarena_used_bytes", "shmarena_errors"} <= served
        assert scraper.names() is served  # one daemon, scraped once
        rule = "groups:\n- name: g\n  rules:\n  - alert: Full\n    expr: shmarena_used_bytes > 0\n"
        assert blocks.check_yaml(block("yaml", rule), scraper.names) == []
        # No error yet, so no sample of the counter: its family is enough.
        errors = rule.replace("shmarena_used_bytes", 'rate(shmarena_errors_total{code="x"}[5m])')
        assert blocks.check_yaml(block("yaml", errors), scraper.names) == []
        typo = rule.replace("used_bytes", "usde_bytes")
        assert "shmarena_usde_bytes" in blocks.check_yaml(block("yaml", typo), scraper.names)[0]
    finally:
        scraper.close()


def test_an_indented_code_block_fails_but_an_indented_list_paragraph_does_not() -> None:
    doc = blocks.parse_markdown(
        "page.md",
        "Run this:\n\n    shmarena daemon --size 1G\n    shmarena status\n\nThen\n\n"
        "- an item\n\n    its second paragraph, indented\n\n1. another\n\n    more of it\n",
    )
    [indented] = doc.blocks
    assert (indented.line, indented.body) == (3, "shmarena daemon --size 1G\nshmarena status\n")
    [problem] = blocks.check_kind(indented)
    assert problem.startswith("page.md:3: an indented code block")


def test_a_block_that_stops_the_files_daemon_is_told_about_daemon_none(
    tmp_path: os.PathLike[str],
) -> None:
    from tests.docs.test_docs import Runs

    doc = parse("```console\n$ shmarena shutdown\n```\n", tmp_path)
    runs = Runs()
    run = runs.of(doc)
    assert run.daemon is not None
    try:
        assert running.run_console(doc.blocks[0], run.sandbox) == []
    finally:
        [problem] = runs.finish(doc)
    assert "the file's daemon is gone after the last block" in problem
    assert "<!-- docs: daemon=none -->" in problem
