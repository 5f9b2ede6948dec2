"""``python -m emdiffuse``: the ``emdiffuse`` command."""

import sys

from emdiffuse.cli import main

if __name__ == "__main__":
    sys.exit(main())
