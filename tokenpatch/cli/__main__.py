"""``python -m tokenpatch.cli`` (how ``torchrun -m`` starts the command)."""

import sys

from . import main

sys.exit(main())
