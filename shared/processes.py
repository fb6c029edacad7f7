"""Child processes that must not outlive the fedrnn process that started them."""

from __future__ import annotations

import ctypes
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux kill the child when its parent dies, even by
    SIGKILL: a killed ``fedrnn server`` must not leave its SuperLink holding the port, nor
    a killed ``fedrnn client`` its SuperNode. None elsewhere (no such facility)."""
    if not sys.platform.startswith("linux"):
        return None

    def set_parent_death_signal() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return set_parent_death_signal
