"""``python -m fogline.cli``: the same entry point as the ``fogline`` console script."""

import sys

from fogline.cli import main

sys.exit(main())
