"""Entry point: ``python -m benchmarks`` (see benchmarks/cli.py for the options)."""

import sys

from .cli import main

sys.exit(main())
