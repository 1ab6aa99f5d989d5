"""Operator errors: what a command reports as one line `error: ...` and a non-zero exit code, never a traceback.

Commands raise CommandError for what they find themselves. `explain` turns the errors of the layers below that
an operator can fix (a configuration, a database URL, a database without schema, a missing checkpoint, a model
path, a file) into one; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

# Exit codes: 1 = the operation failed, 2 = the command line or the configuration is wrong.
EXIT_FAILED = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A failure the operator can act on; the message is the whole report."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


def explain(exc: BaseException) -> CommandError | None:
    """The operator-facing form of `exc`, or None when it is not one an operator can fix."""
    from pydantic import ValidationError
    from sqlalchemy.exc import OperationalError

    from daemon.config import ConfigError
    from storage.errors import StorageError

    if isinstance(exc, CommandError):
        return exc
    if isinstance(exc, ConfigError):
        return CommandError(str(exc), EXIT_USAGE)
    if isinstance(exc, ValidationError):
        return CommandError(validation_summary(exc), EXIT_USAGE)
    if isinstance(exc, StorageError):
        return CommandError(str(exc))
    if isinstance(exc, OperationalError):
        return CommandError(f"database: {first_line(exc.orig or exc)}")
    if isinstance(exc, OSError) and exc.filename is not None:
        return CommandError(f"{exc.filename}: {exc.strerror}")
    models = sys.modules.get("pipelines.models")  # only loaded (with torch) by commands that load models
    if models is not None and isinstance(exc, (models.ModelLoadError, models.IncompatibleModelsError)):
        return CommandError(str(exc), EXIT_USAGE)
    return None


def validation_summary(exc) -> str:
    """A pydantic ValidationError on one line: `k: Input should be less than or equal to 16 (got 20); ...`."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or exc.title
        value = error.get("input")
        shown = f" (got {value!r})" if isinstance(value, (str, int, float, bool)) else ""
        parts.append(f"{where}: {error['msg'].removeprefix('Value error, ')}{shown}")
    return "; ".join(parts)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
