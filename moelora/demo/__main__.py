"""``python -m moelora.demo``: see :mod:`moelora.demo`."""

import sys

from moelora.demo.cli import main

sys.exit(main())
