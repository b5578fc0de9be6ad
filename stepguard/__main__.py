"""``python -m stepguard``."""

import sys

from stepguard.cli import main

sys.exit(main())
