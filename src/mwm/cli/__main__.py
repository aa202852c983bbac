"""``python -m mwm.cli`` (as torchrun runs it) is the ``mwm`` command."""

import sys

from . import main

sys.exit(main())
