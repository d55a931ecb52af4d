"""`python -m garage`: the same as the `garage` command."""

import sys

from .cli import main

sys.exit(main())
