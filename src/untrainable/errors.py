"""The error types that modules at every level raise; this module imports nothing of the package."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and what is allowed."""


class CallableError(Exception):
    """An exception raised inside a callable that a config names by import path (the user's code, not a value).

    `str(self)` is one line naming the field and the callable; `error` is the
    exception itself, whose traceback the command line shows from the
    callable's first frame on.
    """

    def __init__(self, line: str, error: BaseException) -> None:
        super().__init__(line)
        self.error = error

    def __reduce__(self) -> tuple[Any, ...]:  # from a worker process (`run --jobs`), without the traceback
        return (CallableError, (str(self), self.error))


class StudyError(Exception):
    """A tuning study that stopped short (a worker failed or was killed); the message names the study and how to go on."""
