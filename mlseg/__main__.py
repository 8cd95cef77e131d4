"""``python -m mlseg``: the ``mlseg`` command, where the console script is not on PATH."""

import sys

from mlseg.cli import main

sys.exit(main())
