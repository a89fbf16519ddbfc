"""Errors that a user can fix: the CLI prints them as one line and exits non-zero, no traceback."""


class UserError(Exception):
    """Bad input from the user (data, config, flags). Raised before anything is written."""


class DataError(UserError):
    """A data file or record that cannot be used; the message names file, line or record, and field."""


class ConfigError(UserError):
    """A run config (YAML or flags) that cannot be used."""

