"""Console output: fedrnn's own progress lines go to stderr as ``fedrnn: ...``."""

from __future__ import annotations

import logging
import sys


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the message, not at set-up:
    Flower's ServerApp process and pytest's capture both replace it."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def console_logging() -> logging.Logger:
    """Configure the ``fedrnn`` logger once (idempotent); leaves other loggers alone."""
    logger = logging.getLogger("fedrnn")
    if not logger.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("fedrnn: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    # Opacus calls ``logging.basicConfig`` on import, which would print every Flower line
    # a second time through the root logger; Flower's logger has its own handler.
    logging.getLogger("flwr").propagate = False
    return logger
