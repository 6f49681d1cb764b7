# pyre-strict
"""``python -m distributed_shampoo.checkpoint``: see ``cli.py``."""

import sys

from distributed_shampoo.checkpoint.cli import main

sys.exit(main())
