"""`python -m scoresde ...` runs the command line (see `scoresde.cli`)."""

import sys

from scoresde.cli import main

if __name__ == "__main__":
    sys.exit(main())
