"""One daemon per ledger: an exclusive lock on `<ledger>.lock`, holding the owner's pid.

`status` reads it without taking it: if the lock cannot be taken, a daemon is running.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from syncd.errors import LedgerError, LedgerUnwritable
from syncd.fsutil import give_to_parent_owner, make_dirs

if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


def lock_path(ledger: Path) -> Path:
    return ledger.with_name(ledger.name + ".lock")


class LedgerLock:
    def __init__(self, ledger: Path) -> None:
        self.path = lock_path(ledger)
        self.fd: int | None = None

    def acquire(self, what: str = "syncd") -> None:
        try:
            make_dirs(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _cannot(self.path, e) from e
        give_to_parent_owner(self.path)  # root's lock file must not lock the service out (SPEC §4.13)
        if not _try_lock(fd):
            os.close(fd)
            pid = read_owner(self.path)
            raise LedgerError(f"another syncd (pid {pid or '?'}) is using the ledger {self.path.with_suffix('')}; "
                              f"stop it first, or use a separate config and ledger")
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {what}\n".encode())
        except OSError as e:
            _unlock(fd)
            os.close(fd)
            raise _cannot(self.path, e) from e
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
                _unlock(self.fd)
            finally:
                os.close(self.fd)
                self.fd = None

    def __enter__(self) -> LedgerLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_owner(path: Path) -> int | None:
    try:
        text = path.read_text().split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


def _cannot(path: Path, e: OSError) -> LedgerError:
    """The one line for a lock file that cannot be created or written (SPEC §4.11: exit 2)."""
    why = e.strerror or str(e)
    denied = isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EPERM)
    if denied and path.exists() and not os.access(path, os.W_OK):
        # the file itself (left read-only, or another user's: root's, by an older syncd)
        uid = os.getuid() if hasattr(os, "getuid") else "?"
        hint = (f"{path} is not writable by this user (uid {uid}); give it to syncd's user (chown) "
                f"or make it writable (chmod u+w)")
    elif denied or e.errno == errno.EROFS:
        hint = (f"make {path.parent} writable by this user (read-only mount or permissions), "
                f"or set [syncd] ledger to a writable path")
    elif e.errno == errno.ENOSPC:
        hint = f"free space on the file system of {path.parent}"
    else:
        hint = f"check {path.parent} and its file system"
    return LedgerUnwritable(f"ledger lock {path} cannot be created or written: {why}; {hint}")


def holder(ledger: Path) -> dict[str, object]:
    """Whether some process holds the ledger's lock, and its pid and role ("run", "resync", ...).

    Opened read-only (flock needs no write access): a user who may only read the ledger can
    run `syncd status`."""
    path = lock_path(ledger)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file (nobody ever ran), or not readable: nobody we can see holds it
        return {"running": False, "pid": None}
    try:
        if _try_lock(fd):
            _unlock(fd)
            return {"running": False, "pid": None}
        try:
            words = os.read(fd, 256).decode(errors="replace").split()
        except OSError:  # Windows: the locked byte cannot be read while it is held
            words = []
    finally:
        os.close(fd)
    pid = int(words[0]) if words and words[0].isdigit() else None
    return {"running": True, "pid": pid, "role": words[1] if len(words) > 1 else None}
