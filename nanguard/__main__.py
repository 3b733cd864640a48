"""``python -m nanguard`` is the ``nanguard`` console script."""

import sys

from nanguard.cli import main

if __name__ == "__main__":
    sys.exit(main())
