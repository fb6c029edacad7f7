"""Writing files so that none is ever seen half-written, and secrets that are private from
the moment they exist."""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_MODE = 0o600


def write_atomic(path: str | Path, data: bytes, *, private: bool = False) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it
    over ``path``: readers see the old file or the new one, never a part. ``private``:
    the file is created owner-only (0600), never readable by others even for an instant."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if private:
        # A stale temporary file (a crash, or planted) may be open elsewhere already or be
        # a symlink: it is removed, and the new one is created by this call alone
        # (O_EXCL, no symlink followed), 0600 or narrower from its first instant.
        tmp.unlink(missing_ok=True)
        flags |= os.O_EXCL | os.O_NOFOLLOW
    mode = PRIVATE_MODE if private else 0o666  # both narrowed by the umask, as open()
    fd = os.open(tmp, flags, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind, not a part
        raise


def create_private(path: str | Path) -> bool:
    """Create ``path`` empty with mode 0600 unless it exists; returns whether it was created.

    For files other programs then open and fill (SQLite ledgers): created owner-only by
    ``open(2)`` itself, not chmod-ed after, so no other local user can open it in between.
    """
    try:
        fd = os.open(Path(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    except FileExistsError:
        return False
    os.close(fd)
    return True
