"""``python -m servekit``: the same as the ``servekit`` command."""

import sys

from .cli import main

sys.exit(main())
