"""How shmarena starts another Python process running itself (the daemon of
`daemon --detach`, the demo's temporary daemon, the Dask plugin's daemon).

`python -m shmarena` would put the current directory first on `sys.path`, so
a folder named `shmarena` there (the parent of a git clone) would be imported
instead of the package. The child here runs `python -c` with `sys.path[0]`
(the current directory, for -c) replaced by the directory this very process
imported shmarena from, on every supported Python (3.11's -P is not on 3.10).
The child keeps the current directory, so relative paths on its command line
mean what they meant to the user.
"""

from __future__ import annotations

import os
import sys

# argv: -c PACKAGE_ROOT ARGS...; the root replaces sys.path[0] before any import.
_BOOT = (
    "import sys; sys.path[0] = sys.argv.pop(1); sys.argv[0] = 'shmarena'; "
    "from shmarena.cli import main; sys.exit(main(sys.argv[1:]))"
)


def package_root() -> str:
    """The directory that holds the shmarena package this process runs."""
    # this file is PACKAGE_ROOT/shmarena/spawn.py
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shmarena_command(*args: str) -> list[str]:
    """The argv of `shmarena ARGS...` in a new interpreter, immune to the cwd."""
    return [sys.executable, "-c", _BOOT, package_root(), *args]
