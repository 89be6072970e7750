"""``python -m moe_dist <command> ...``: the ``moe`` command (see ``moe_dist/commands.py``)."""

import sys

from .commands import main

sys.exit(main())
