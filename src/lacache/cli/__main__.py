"""``python -m lacache.cli ...``: the same as the ``lacache`` console script."""

import sys

from .main import main

sys.exit(main())
