"""``python -m shmheap``: the same command-line tool as the ``shmheap`` script."""

import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
