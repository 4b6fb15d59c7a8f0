"""``python -m moelora.demo``: see :mod:`moelora.demo`."""

import sys

from .cli import main

sys.exit(main())
