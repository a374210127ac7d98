"""Bringing one object back to disk safely (SPEC §4.3, §4.4).

temp file in the target directory -> write while hashing -> check against `syncd-sha256` ->
fsync -> set mtime -> record (callback) -> no-clobber publish -> fsync the directory.
A mismatch, a full disk or an interruption never leaves a partial file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat as st_mod
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from syncd.fsutil import give_to_parent_owner, make_dir, publish
from syncd.keys import RESTORE_TEMP_PREFIX, UnsafeKey
from syncd.names import shown
from syncd.remote.base import INTEGRITY, LOCAL, Remote, RemoteError

log = logging.getLogger(__name__)

# Device names, reserved with any extension (the list CPython's ntpath.isreserved uses)
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                     *(f"{dev}{n}" for dev in ("COM", "LPT") for n in "123456789\u00b9\u00b2\u00b3")}


def _read_umask() -> int:
    # Reading the umask means setting it; done once at import, before the workers start.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Restored files get the mode a normal create would give (0666 & ~umask), not mkstemp's 0600:
# under systemd syncd runs as its own user and the app must read what it restores.
_FILE_MODE = 0o666 & ~_read_umask()


@dataclass(frozen=True)
class Restored:
    size: int
    mtime_ns: int
    sha256: str
    verified: bool = True  # checked against syncd-sha256, the ledger's SHA-256 or the store's checksum
    etag: str = ""  # the object's etag as the GET saw it (what a listing shows while unchanged)


_bytes_written = 0  # by all restores of this process: a progress count (a lost += is harmless)


def restored_bytes() -> int:
    """Bytes restores have written so far: moves while a large file arrives (the start's timeout)."""
    return _bytes_written


class _HashingWriter:
    """Hashes what it writes straight to the temp file's descriptor: a buffered file object
    would cost three more system calls per restored file (each a hand-over of the GIL between
    the transfer threads) and a copy; remotes write whole chunks."""

    def __init__(self, fd: int, target: Path) -> None:
        self.fd = fd
        self.target = target
        self.h = hashlib.sha256()
        self.size = 0

    def write(self, b: bytes) -> int:  # the one method of BinaryIO a remote uses
        global _bytes_written
        _bytes_written += len(b)
        self.h.update(b)
        self.size += len(b)
        view = memoryview(b)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as e:  # a local failure (a full disk), not the remote's: said as such
            raise _write_error(self.target, e) from e
        return len(b)


def _write_error(target: Path, e: OSError) -> RemoteError:
    return RemoteError(LOCAL, f"cannot write {target}: {e.strerror}", code=type(e).__name__)


class Unplaceable(UnsafeKey):
    """No file can be created at the target: a directory has its name, or a parent of it is a
    file. S3 lets `c` and `c/d.txt` both be keys, a file system does not (SPEC §4.14: a failure
    that names it, never a success)."""


CANNOT_RESTORE = "CannotRestore"  # the error code of such failures (logs, `status`)


def _is_dir(path: str | os.PathLike[str]) -> bool:
    try:
        return st_mod.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def occupied(target: Path) -> bool:
    """Does something hold the name a restore needs for a file? Raises Unplaceable when it is a
    directory. One look (lstat): with two, a directory made between them (another worker
    restoring a key under this name) would pass the first as absent and the second as a local
    file that wins, and the object would end neither restored nor failed (SPEC §4.14)."""
    try:
        s = os.lstat(target)
    except OSError:
        return False
    if st_mod.S_ISDIR(s.st_mode):
        raise Unplaceable(f"{target} is a directory")
    return True


def windows_name_problem(seg: str) -> str | None:
    """Names Windows cannot create (checked on Windows only, where they would misbehave)."""
    base = seg.split(".", 1)[0].rstrip(" ").upper()  # Windows ignores spaces before the dot: "NUL .txt"
    if base in _WINDOWS_RESERVED:
        return f"{seg!r} is a reserved name on Windows"
    if any(c in seg for c in '<>:"|?*') or any(ord(c) < 32 for c in seg) or seg.endswith((" ", ".")):
        return f"{seg!r} is not a valid Windows file name"
    return None


def safe_target(root: Path, rel: str, *, follow_symlinks: bool = False, create: bool = True) -> Path:
    """The local path for ledger path `rel` under `root`, creating parent directories.

    Refuses (UnsafeKey) anything that would land outside `root`: a symlinked directory on the way
    (unless it resolves inside the root and `follow_symlinks`); and (Unplaceable) a file in the
    way of a directory.
    """
    parts = rel.split("/")
    if sys.platform == "win32":  # pragma: no cover
        for seg in parts:
            problem = windows_name_problem(seg)
            if problem:
                raise UnsafeKey(problem)
    cur = Path(root)
    for seg in parts[:-1]:
        cur = cur / seg
        try:
            s = os.lstat(cur)
        except FileNotFoundError:
            if not create:
                return Path(root).joinpath(*parts)
            try:
                make_dir(cur)
                continue
            except FileExistsError:  # another worker made it meanwhile: check what it is
                s = os.lstat(cur)
        if st_mod.S_ISLNK(s.st_mode):
            real, real_root = os.path.realpath(cur), os.path.realpath(root)  # only here: a stat per part
            inside = os.path.commonpath([real_root, real]) == real_root
            if not (follow_symlinks and inside and os.path.isdir(real)):
                raise UnsafeKey(f"{cur} is a symlink; refusing to restore through it")
        elif not st_mod.S_ISDIR(s.st_mode):
            raise Unplaceable(f"a parent of {Path(root).joinpath(*parts)} is a file ({cur})")
    return Path(root).joinpath(*parts)


def fetch(remote: Remote, key: str, target: Path, *, overwrite: bool = False, expect_sha256: str | None = None,
          before_publish: Callable[[Restored], bool] | None = None,
          version_id: str | None = None) -> Restored | None:
    """Download `key` (that version, with `version_id`) to `target` atomically. Returns None
    when `before_publish` declined.

    The bytes are checked against the object's `syncd-sha256`; an object without it (written by
    another tool, or the body of an aborted PUT that a store kept) against `expect_sha256` (what
    the ledger knows was uploaded there), else against the store's checksum; with none of the
    three the file is restored with a warning that it is unverified (SPEC §4.3).

    Raises FileExistsError when `target` exists (or appears meanwhile) and not `overwrite`;
    Unplaceable when a directory has its name (before the download, or found at the rename);
    RemoteError(INTEGRITY) on a checksum mismatch; RemoteError(LOCAL) on local write errors.
    """
    if occupied(target) and not overwrite:
        raise FileExistsError(target)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=RESTORE_TEMP_PREFIX)
    except OSError as e:
        raise RemoteError(LOCAL, f"cannot write in {target.parent}: {e.strerror}", code=type(e).__name__) from e
    with _live_lock:
        _live_temps.add(tmp)
    published = False
    try:
        w = _HashingWriter(fd, target)
        sink = cast(BinaryIO, w)  # remotes only ever call write() on it
        try:
            try:
                fetched = remote.get(key, sink, version_id=version_id) if version_id else remote.get(key, sink)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise _write_error(target, e) from e
        sha = w.h.hexdigest()
        info = fetched.info
        if info.sha256 and info.sha256 != sha:
            raise RemoteError(INTEGRITY, f"{key}: content does not match its syncd-sha256 "
                                         f"({sha[:12]}… != {info.sha256[:12]}…); not restored",
                              code="ChecksumMismatch")
        if not info.sha256 and expect_sha256 and expect_sha256 != sha:
            raise RemoteError(INTEGRITY, f"{key}: content does not match the SHA-256 the ledger recorded "
                                         f"for it ({sha[:12]}… != {expect_sha256[:12]}…) and the object "
                                         f"has no syncd-sha256; not restored", code="ChecksumMismatch")
        if info.size != w.size:
            raise RemoteError(INTEGRITY, f"{key}: got {w.size} bytes, expected {info.size}",
                              code="SizeMismatch")
        verified = bool(info.sha256 or expect_sha256 or fetched.server_verified)
        mtime_ns = info.mtime_ns if info.mtime_ns is not None else os.stat(tmp).st_mtime_ns
        if sys.platform != "win32":  # Windows has ACLs, inherited from the directory
            os.chmod(tmp, _FILE_MODE)
            give_to_parent_owner(tmp)  # run as root: the directory's owner's, as open as it (SPEC §4.13)
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
        result = Restored(size=w.size, mtime_ns=mtime_ns, sha256=sha, verified=verified, etag=info.etag)
        if before_publish is not None and not before_publish(result):
            return None
        try:
            publish(tmp, target, overwrite=overwrite)
        except OSError as e:  # a directory made meanwhile (the restore of a key under this name)
            if _is_dir(target):
                raise Unplaceable(f"{target} is a directory") from e
            raise
        published = True
        if not verified:
            log.warning("restored %s unverified: the object has no syncd-sha256 and no checksum "
                        "syncd could check (written by another tool?)", shown(target))
        return result
    finally:
        with _live_lock:
            _live_temps.discard(tmp)
        if not published:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


# temp files of restores in flight: a stop that cannot wait for them removes them (SPEC §4.10)
_live_temps: set[str] = set()
_live_lock = threading.Lock()


def remove_live_temps() -> int:
    """Remove the temp files of restores still running (a stop gave up waiting for them)."""
    with _live_lock:
        temps = list(_live_temps)
    removed = 0
    for tmp in temps:
        try:
            os.unlink(tmp)
            removed += 1
        except OSError:
            pass
    return removed
