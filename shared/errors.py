"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class FedrnnError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class ConfigError(FedrnnError):
    """A bad setting or flag."""


class DataError(FedrnnError):
    """A data file that cannot be used; names the file and, where known, line or column."""

    def __init__(self, path: object, problem: str, *, line: int | None = None,
                 column: str | None = None) -> None:
        where = str(path)
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {problem}")
