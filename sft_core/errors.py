"""User-facing errors.

A `UserError` is a mistake the user can fix (a config key, a data row, a path). The CLI prints
its message as one paragraph and exits non-zero without a traceback; anything else is a bug and
keeps its traceback.
"""

import logging
from collections.abc import Iterator


def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc`, then what it was raised from or while handling (`__cause__`, else `__context__`),
    each once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


class UserError(Exception):
    """Base class for errors caused by user input, printed without a traceback."""

    exit_code = 2


class ConfigError(UserError):
    """A config key is unknown, has the wrong type or an impossible value."""


class DataError(UserError):
    """A data file is missing or a row cannot be used; the message names file, row and field."""


class ModelError(UserError):
    """The pretrained model cannot be resolved or loaded."""


class StorageError(UserError):
    """The output storage cannot hold what the run must write (a full disk)."""


def user_error_in(exc: BaseException | None) -> UserError | None:
    """The UserError behind `exc`, also when Ray or Prefect wrapped it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UserError):
            cause = getattr(exc, "cause", None)  # ray's RayTaskError(UserError) keeps the original here
            return cause if isinstance(cause, UserError) else exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


class _HideUserErrorTracebacks(logging.Filter):
    """Orchestrators log every failure with its traceback; for a user's mistake the message is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and user_error_in(record.exc_info[1]) is not None:
            record.exc_info, record.exc_text = None, None
        return True


# Logger-level filters survive logging reconfiguration (dictConfig adds handlers, keeps filters).
_ENGINE_LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine", "prefect.flow_engine")


def hide_user_error_tracebacks(loggers: tuple[str, ...] = _ENGINE_LOGGERS) -> None:
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HideUserErrorTracebacks) for f in logger.filters):
            logger.addFilter(_HideUserErrorTracebacks())
