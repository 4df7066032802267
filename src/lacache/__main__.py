"""``python -m lacache ...``: the ``lacache`` command, for launchers that start a module rather than a script
(``torchrun -m lacache eval ...``, ``accelerate launch -m lacache eval ...``).

This is an entry point, like the console script, not part of the library: it is the one module
outside :mod:`lacache.cli` that may import the command line.
"""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
