"""`python -m instructune.cli COMMAND ...`, the same as the `instructune` command."""

from instructune.cli import entry

entry()
