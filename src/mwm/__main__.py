"""``python -m mwm`` is the ``mwm`` command."""

import sys

from .cli import main

sys.exit(main())
