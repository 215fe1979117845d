"""``python -m shmctx._inspect``: the same as the ``ctx-inspect`` console script."""

import sys

from . import main

sys.exit(main())
