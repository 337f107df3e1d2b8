"""`python -m tasks.cli`: the `vilbert` command without the console script."""

import sys

from tasks.cli import main

sys.exit(main())
