"""python -m forgelab: the same command line as the `forgelab` console script."""
import sys

from .commands import main

sys.exit(main())
