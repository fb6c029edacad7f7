"""Figures for files: matplotlib without a display, rendered to PNG bytes."""

from __future__ import annotations

import io
import threading
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only; servers have no display).
    Imported on first use: most commands draw nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def import_in_background() -> None:
    """Start importing matplotlib on a daemon thread, for a process that will draw soon and
    waits on others now; ``pyplot()`` then finds it loaded, or waits for the import to end
    (Python's import lock)."""
    threading.Thread(target=pyplot, name="import-matplotlib", daemon=True).start()


def png_bytes(fig: Any) -> bytes:
    """The figure as PNG bytes (for ``write_atomic``); the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    pyplot().close(fig)
    return buffer.getvalue()
