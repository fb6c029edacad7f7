"""Console output: fedrnn's own progress lines go to stderr as ``fedrnn: ...``."""

from __future__ import annotations

import logging
import sys


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each message, not as it was when configured:
    one process may run several commands (tests, sweeps) with stderr swapped between them."""

    @property
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001
        pass


def console_logging() -> logging.Logger:
    """Configure the ``fedrnn`` logger once (idempotent); leaves other loggers alone."""
    logger = logging.getLogger("fedrnn")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("fedrnn: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger
