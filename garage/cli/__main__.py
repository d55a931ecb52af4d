"""`python -m garage.cli`, the same as the `garage` command."""

import sys

from . import main

sys.exit(main())
