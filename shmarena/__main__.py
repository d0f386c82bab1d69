"""python -m shmarena: the same as the `shmarena` command."""

import sys

from shmarena.cli import main

if __name__ == "__main__":
    sys.exit(main())
