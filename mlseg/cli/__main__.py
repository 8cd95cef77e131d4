import sys

from mlseg.cli import main

sys.exit(main())
