"""``python -m statetrainer``: see ``statetrainer.cli``."""

import sys

from .cli import main

sys.exit(main())
