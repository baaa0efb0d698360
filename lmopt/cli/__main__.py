"""``python -m lmopt.cli``: the same as the ``lmopt`` command."""

import sys

from . import main

sys.exit(main())
