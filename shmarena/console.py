"""The one place the command line makes its rich Console: how wide tables
are drawn, and what happens when the reader of stdout goes away.

On a terminal, or with $COLUMNS set, rich draws at that width as it always
has. Piped to a file, `grep` or `head` with $COLUMNS unset, rich would assume
80 columns and wrap or cut owner names (the very names `recycle` needs); there
the console is as wide as the content needs instead.

A closed pipe (`shmarena owners | head -1`) raises BrokenPipeError, which
`shmarena.cli.main` turns into a quiet exit; rich's own reaction (exit 1) is
replaced so every command ends the same way.
"""

from __future__ import annotations

import os

from rich.console import Console

# Wide enough for any row the admin commands print; rich draws a table at
# the width its content needs, never wider, so nothing is padded to this.
UNBOUNDED_WIDTH = 1 << 16


class _PipeConsole(Console):
    """A Console that leaves a closed stdout to `shmarena.cli.main`."""

    def on_broken_pipe(self) -> None:
        self.quiet = True  # nothing more to write to a reader that is gone
        raise BrokenPipeError


def make_console(soft_wrap: bool = True) -> Console:
    """The console the admin commands and views print with: text as given (no
    colouring of numbers); with `soft_wrap`, lines of text are not wrapped."""
    out = _PipeConsole(highlight=False, soft_wrap=soft_wrap)
    # An empty $COLUMNS counts as unset: rich ignores it too.
    if not out.is_terminal and not os.environ.get("COLUMNS"):
        out.width = UNBOUNDED_WIDTH
    return out
