"""Console output: fedrnn's own progress lines go to stderr as ``fedrnn: ...``."""

from __future__ import annotations

import logging
import sys


def console_logging() -> logging.Logger:
    """Configure the ``fedrnn`` logger once (idempotent); leaves other loggers alone."""
    logger = logging.getLogger("fedrnn")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("fedrnn: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    # Opacus calls ``logging.basicConfig`` on import, which would print every Flower line
    # a second time through the root logger; Flower's logger has its own handler.
    logging.getLogger("flwr").propagate = False
    return logger
