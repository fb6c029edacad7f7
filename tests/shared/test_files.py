"""Private files: owner-only from the moment they exist, whatever the umask, never made
private by a chmod after the fact, and not written through a file someone else prepared."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedrnn.shared.certs import write_certificates
from fedrnn.shared.files import PRIVATE_MODE, create_private, write_atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def no_chmod(monkeypatch):
    """Privacy must come from open(2)'s mode: any chmod after creation fails the test."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("a private file was chmod-ed after it was created")

    for name in ("chmod", "fchmod", "lchmod"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse)
    monkeypatch.setattr(Path, "chmod", refuse)


@pytest.fixture
def open_modes(monkeypatch):
    """Every file os.open creates, with the flags and mode it was created with."""
    created: dict[str, tuple[int, int]] = {}
    real_open = os.open

    def recording_open(path, flags, mode=0o777, *args, **kwargs):
        if flags & os.O_CREAT:
            created[os.fspath(path)] = (flags, mode)
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    return created


@pytest.fixture
def open_umask():
    """The widest umask: whatever mode a file gets then is the mode it was created with."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def test_private_write_is_0600_from_creation(tmp_path, no_chmod, open_modes, open_umask):
    secret = tmp_path / "secret.key"
    write_atomic(secret, b"key material", private=True)
    assert _mode(secret) == PRIVATE_MODE and secret.read_bytes() == b"key material"
    [(flags, mode)] = open_modes.values()  # the temporary file renamed over ``secret``
    assert mode == PRIVATE_MODE and flags & os.O_EXCL and flags & os.O_NOFOLLOW
    write_atomic(secret, b"new key", private=True)  # replacing keeps it private
    assert _mode(secret) == PRIVATE_MODE and secret.read_bytes() == b"new key"
    public = tmp_path / "public.crt"
    write_atomic(public, b"certificate")  # the default follows the umask as before
    assert _mode(public) == 0o666


def test_private_write_replaces_a_wider_file_without_widening(tmp_path, no_chmod, open_umask):
    key = tmp_path / "site-1.key"
    key.write_bytes(b"old")
    assert _mode(key) == 0o666
    write_atomic(key, b"secret", private=True)
    assert _mode(key) == PRIVATE_MODE  # a new inode, created 0600, not the old one chmod-ed


def test_a_planted_temporary_file_never_receives_the_secret(tmp_path, open_umask):
    # Someone opened the writer's temporary file name before the write (a stale one left
    # world-readable, or one planted in a shared directory) and holds it open: making it
    # private now would be too late, so the secret must go into a new file.
    key = tmp_path / "server.key"
    tmp = tmp_path / ".server.key.tmp"
    tmp.write_bytes(b"")
    tmp.chmod(0o644)
    with tmp.open("rb") as reader:
        write_atomic(key, b"secret", private=True)
        assert reader.read() == b""
    assert key.read_bytes() == b"secret" and _mode(key) == PRIVATE_MODE

    # A symlink at the temporary name is not followed: its target is left alone.
    decoy = tmp_path / "readable-by-all"
    decoy.write_bytes(b"decoy")
    tmp.symlink_to(decoy)
    write_atomic(key, b"secret 2", private=True)
    assert decoy.read_bytes() == b"decoy" and key.read_bytes() == b"secret 2"
    assert not key.is_symlink() and _mode(key) == PRIVATE_MODE


def test_create_private_is_0600_from_creation(tmp_path, no_chmod, open_modes, open_umask):
    ledger = tmp_path / "site.sqlite"
    assert create_private(ledger) and not create_private(ledger)
    assert _mode(ledger) == PRIVATE_MODE
    assert open_modes[str(ledger)][1] == PRIVATE_MODE


def test_certificate_keys_are_private_from_creation(tmp_path, no_chmod, open_modes,
                                                    open_umask):
    written = write_certificates(tmp_path, clients=2)
    for path in written:
        if path.suffix == ".key":
            assert _mode(path) == PRIVATE_MODE, path.name
            flags, mode = open_modes[str(path.with_name(f".{path.name}.tmp"))]
            assert mode == PRIVATE_MODE and flags & os.O_EXCL, path.name
        else:  # certificates and public keys are meant to be copied around
            assert _mode(path) == 0o666, path.name
    assert {p.name for p in written if _mode(p) == PRIVATE_MODE} == {
        "ca.key", "server.key", "site-1.key", "site-2.key"}


def test_a_file_a_user_asked_for_is_written_whole_or_ends_in_one_error(tmp_path, monkeypatch):
    from fedrnn.shared.cli import write_output
    from fedrnn.shared.errors import ConfigError

    (tmp_path / "out.csv").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        write_output(tmp_path / "out.csv", b"rows")
    with pytest.raises(ConfigError, match="does not exist"):
        write_output(tmp_path / "missing" / "out.csv", b"rows")
    target = tmp_path / "old.csv"
    target.write_bytes(b"old")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(ConfigError, match="cannot write .No space left on device"):
        write_output(target, b"new rows")
    assert target.read_bytes() == b"old"  # the old file stands, and no part is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.csv", "out.csv"]
