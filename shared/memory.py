"""Process-wide allocator setting for DP-SGD's large, short-lived tensors."""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>
_KEEP_BYTES = 256 << 20


def reuse_freed_memory() -> bool:
    """Serve large blocks (up to 256 MiB) from the heap and keep up to 256 MiB of freed
    memory there, instead of a fresh ``mmap`` per block handed back to the OS at ``free``.

    Per-sample gradients are tens of MB per weight (64 x 1024 x 256 floats = 67 MB for the
    LEAF LSTM); Opacus allocates and frees such tensors every step. glibc's default serves
    each block above 32 MB with a fresh ``mmap`` and the kernel zero-fills every page on
    first touch, every step. With these thresholds later steps reuse pages already
    mapped, without raising resident memory (``fedrnn bench dp-step`` shows both). It is
    what the jemalloc/tcmalloc advice in PyTorch's CPU performance guide buys, without
    preloading another allocator. Returns False where it does not apply (not glibc).
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)
                and mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
