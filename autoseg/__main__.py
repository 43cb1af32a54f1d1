"""`python -m autoseg ...` runs the same command line as the `autoseg` script (useful where scripts are not on PATH)."""

import sys

from autoseg.cli import main

sys.exit(main())
