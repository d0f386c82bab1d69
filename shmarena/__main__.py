"""python -m shmarena: the same as the `shmarena` command."""

from __future__ import annotations

import sys

from shmarena.cli import main

if __name__ == "__main__":
    sys.exit(main())
