"""Errors that a user can fix: the CLI prints them as one line and exits non-zero, no traceback."""

from pathlib import Path


class UserError(Exception):
    """Bad input from the user (data, config, flags). Raised before anything is written."""


class DataError(UserError):
    """A data file or record that cannot be used; the message names file, line or record, and field."""


class ConfigError(UserError):
    """A run config (YAML or flags) that cannot be used."""


def refuse_output_over_inputs(output: Path, inputs: dict[str, list], flag: str) -> None:
    """An output (file or folder) is never one of the inputs ({what: paths}), never holds one and never lies inside
    one: writing or emptying it, or the next run reading it, would take the user's files."""
    resolved = Path(output).resolve()
    for what, paths in inputs.items():
        for path in filter(None, paths):
            given = Path(path).resolve()
            if not given.exists():  # a hub id, a built-in name
                continue
            if given == resolved:
                where = "folder" if given.is_dir() else "file"
                raise ConfigError(f"{output}: is the {what}'s {where}; choose another {flag}")
            if resolved in given.parents:
                raise ConfigError(f"{output}: holds the {what} ({path}); choose another {flag}")
            if given in resolved.parents:
                raise ConfigError(f"{output}: lies inside the {what} ({path}); choose another {flag}")
