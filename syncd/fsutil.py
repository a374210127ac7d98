"""Small file-system helpers: hashing, directory fsync, atomic no-clobber publish, and what
root creates (given to the owner of its directory)."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import sys
import threading
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

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


class SizedBody:
    """A file sent as a request body of exactly `size` bytes (its Content-Length), unchanged.

    A file truncated while it is sent would give fewer bytes than the request announced, and the
    store waits for the rest until the client's read timeout (60 s per attempt: a worker stuck,
    and the file's next content behind it); one that grew would give more, which the store reads
    as the start of the next request. Here a short read raises, and so does the last read when
    the file's size is not `size` or its mtime moved since it was opened: the request is never
    completed, so no store keeps a mixed content, whatever checksum it checks. After that,
    `changed` is true and a rewind (a retry) raises too."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self._size = size
        self._mtime_ns = os.fstat(f.fileno()).st_mtime_ns
        self._left = size
        self.changed = False

    def _changed(self, why: str) -> FileChangedError:
        self.changed = True
        return FileChangedError(f"the file {why} while it was sent")

    def read(self, n: int | None = -1) -> bytes:
        if self.changed:
            raise self._changed("changed")
        want = self._left if n is None or n < 0 else min(n, self._left)
        data = self._f.read(want)
        if len(data) < want:
            raise self._changed("shrank")
        self._left -= len(data)
        if want and not self._left:  # the last bytes: not sent if the file is another one by now
            st = os.fstat(self._f.fileno())
            if (st.st_size, st.st_mtime_ns) != (self._size, self._mtime_ns):
                raise self._changed("changed")
        return data

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if self.changed:
            raise self._changed("changed")
        at = self._f.seek(pos, whence)
        self._left = max(0, self._size - at)
        return at

    def tell(self) -> int:
        return self._f.tell()


class FileChangedError(OSError):
    """A file's content changed while it was being sent (SizedBody)."""


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


# read once: a process does not change its effective uid, and the check is on every file a
# restore makes (no system call at all when not root)
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
_chown_failed: set[str] = set()  # directories whose chown failure was said (once each)
# A directory syncd makes as root is root's between its mkdir and its chown: a worker that copies
# the owner of a directory another worker has just made waits until that one is given away.
_owners = threading.RLock()


def make_dir(path: str | os.PathLike[str]) -> None:
    """mkdir, the new directory given to its parent's owner before any other thread can copy
    its owner (raises FileExistsError as mkdir does)."""
    with _owners:
        os.mkdir(path)
        give_to_parent_owner(path)


def give_to_parent_owner(path: str | os.PathLike[str], parent: str | os.PathLike[str] | None = None) -> None:
    """Run as root, give `path` (a file or directory syncd made) to the owner and group of the
    directory it is in, as open as that directory (a file without its x bits), so that the
    service's user can go on with it and the app's group can use it as it uses the directory
    (SPEC §4.13): an operator's `resync` as root must not leave root's files, with root's
    umask, where the service writes. Only root's own files, and only when the directory's
    owner or group is another; nothing at all when not root. `parent`: the directory a temp file
    is about to be renamed into, when that is not its own."""
    if not AS_ROOT:
        return
    parent = os.path.dirname(os.path.abspath(path)) if parent is None else os.fspath(parent)
    with _owners:  # the parent's owner, once a `make_dir` of it in another thread is through
        try:
            st, pst = os.lstat(path), os.stat(parent)
        except OSError:  # gone meanwhile: nothing to give
            return
    if st.st_uid != 0 or (st.st_uid, st.st_gid) == (pst.st_uid, pst.st_gid) or stat.S_ISLNK(st.st_mode):
        return
    try:
        os.chown(path, pst.st_uid, pst.st_gid)  # before the chmod: chown clears a file's setgid
        os.chmod(path, pst.st_mode & (0o2777 if stat.S_ISDIR(st.st_mode) else 0o666))
    except OSError as e:  # a file system without owners (vfat, some network mounts): said once
        if parent not in _chown_failed:
            _chown_failed.add(parent)
            log.warning("cannot give %s to the owner of %s (uid %d): %s; the service's user may not "
                        "be able to write it", path, parent, pst.st_uid, e.strerror or e)


def make_dirs(path: str | os.PathLike[str]) -> None:
    """`mkdir -p`, each directory it makes given to its parent's owner (`give_to_parent_owner`)."""
    missing = []
    d = Path(path)
    while not d.is_dir() and d != d.parent:
        missing.append(d)
        d = d.parent
    for m in reversed(missing):
        try:
            make_dir(m)
        except FileExistsError:
            if not m.is_dir():
                raise
