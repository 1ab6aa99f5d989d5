"""`python -m daemon.cli` runs the `onlinespec` command line (the tests start the daemon this way)."""

import sys

from daemon.cli import main

sys.exit(main())
