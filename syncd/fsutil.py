"""Small file-system helpers: hashing, directory fsync, atomic no-clobber publish."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

CHUNK = 1024 * 1024
# A file up to this size is read into memory whole: hashed and sent from one buffer (per
# worker), and sent without `Expect: 100-continue`.
SMALL_FILE = 1024 * 1024


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Lowercase hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_small(path: str | os.PathLike[str], limit: int) -> bytes | None:
    """A file's bytes when it holds at most `limit` of them, else None (stream it instead).

    Small uploads are read once: hashed and sent from the same buffer, so what is sent is
    exactly what was hashed, and the body needs no `Expect: 100-continue` round trip."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return data if len(data) <= limit else None


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in `path` durable (no-op on Windows, which cannot open directories)."""
    if sys.platform == "win32":  # pragma: no cover
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str | os.PathLike[str], final: str | os.PathLike[str], *, overwrite: bool) -> None:
    """Move a finished temp file to its final name.

    Without `overwrite` the move never replaces an existing file, even one that appears while
    we download (raises FileExistsError): a hard link is atomic and fails if the name exists.
    """
    if overwrite:
        os.replace(tmp, final)
    elif sys.platform == "win32":  # pragma: no cover - os.rename refuses an existing target there
        os.rename(tmp, final)
    else:
        try:
            os.link(tmp, final)
        except OSError as e:
            if isinstance(e, FileExistsError):
                raise
            # file systems without hard links (some FUSE/SMB mounts): check, then rename
            if os.path.lexists(final):
                raise FileExistsError(final) from e
            os.rename(tmp, final)
            return
        os.unlink(tmp)
    fsync_dir(Path(final).parent)
