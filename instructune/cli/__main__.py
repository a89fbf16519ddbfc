"""`python -m instructune.cli COMMAND ...`, the same as the `instructune` command."""

import sys

from instructune.cli import main

sys.exit(main())
