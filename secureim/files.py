"""One private atomic file write: created 0600, written, fsynced, renamed into place, folder fsynced.

The base layer beside ``errors``: every layer that keeps a file of its own (identities, peer
pins, prekeys, pending server keys, ticket and identity keys) writes it through here, and
``crypto_utils`` re-exports these names, so a key file and its writer stay one piece of code.
"""

from __future__ import annotations

import os
from pathlib import Path

# --- private files: created 0600, written whole or not at all ------------------------
PRIVATE_FILE_MODE = 0o600


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new name in ``folder`` durable (POSIX; a no-op where a folder cannot
    be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private_file(path: Path | str, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` (mode 0600) so that a crash leaves the old file or the new
    one, never a torn or empty one.

    A new file beside ``path`` is created 0600 (``O_EXCL``), written, flushed and fsynced;
    it then takes ``path``'s name and the folder is fsynced, so the new name survives a
    power cut too.  ``exclusive=True`` (key files made once): an existing ``path`` is never
    replaced: the new file is hard-linked into place, which raises FileExistsError if
    another process made it first.  Where the folder's file system has no hard links (vfat,
    some network and container volumes) the file is created in place with ``O_EXCL`` instead,
    as before this helper existed: still never replacing one, still 0600, still fsynced.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    _write_new(tmp, data)
    try:
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # no hard links here (EPERM, ENOTSUP, EMLINK ...): create it in place
                os.unlink(tmp)
                _write_new(path, data)
            else:
                os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_folder(path.parent)


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist; links are not followed) 0600, write it whole, fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), PRIVATE_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        raise
