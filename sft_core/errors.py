"""User-facing errors.

A `UserError` is a mistake the user can fix (a config key, a data row, a path). The CLI prints
its message as one paragraph and exits non-zero without a traceback; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Base class for errors caused by user input, printed without a traceback."""

    exit_code = 2


class ConfigError(UserError):
    """A config key is unknown, has the wrong type or an impossible value."""


class DataError(UserError):
    """A data file is missing or a row cannot be used; the message names file, row and field."""


class ModelError(UserError):
    """The pretrained model cannot be resolved or loaded."""
