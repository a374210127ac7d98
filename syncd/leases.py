"""Is a file whole? Asked of the kernel: a read lease is refused while anyone writes the file.

A file written into a directory made a moment before is often closed before the directory's
inotify watch exists (PITFALLS §10): no close event comes for it. The watcher walks every new
directory; for each file found there it asks here whether any process still has the file open
for writing. `fcntl(F_SETLEASE, F_RDLCK)` on a read-only descriptor fails with EAGAIN while one
does; granted, it means nobody writes the file now, and for as long as it is held nobody can
open it for writing (such an open waits for the lease's release). The file's size and mtime
taken under the lease are therefore those of a closed file, and the lease is released at once.

Two traps:
- a writer that opens the file while the lease is held makes the kernel signal the holder,
  SIGIO by default, whose default action ends the process. The descriptor's signal is set to
  SIGURG first (F_SETSIG), which is ignored by default and by syncd;
- a lease needs the file's owner or CAP_LEASE (the systemd units grant it: the service user
  is not the owner of the app's files), a Linux kernel with `fs.leases-enable` = 1, and a file
  system that supports leases (not NFS, most FUSE mounts). Where it is refused, the file
  settles (`settle_seconds`), as every file did before.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat as st_mod
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

CAP_LEASE = 28  # linux/capability.h
F_SETSIG = 10  # fcntl.F_SETSIG (Linux); spelled out for Pythons without it
# errors that say this file system (or kernel) has no leases, not that this file is busy
_NO_LEASES = {errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOTTY}
_NOT_ALLOWED = {errno.EACCES, errno.EPERM}


def _cap_lease() -> bool:
    """Does this process hold CAP_LEASE (effective set)?"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_LEASE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def method() -> tuple[bool, str]:
    """(leases can be used, the sentence for the startup log)."""
    if not sys.platform.startswith("linux"):
        return False, "not on Linux"
    try:
        if Path("/proc/sys/fs/leases-enable").read_text().strip() == "0":
            return False, "fs.leases-enable is 0"
    except OSError:
        pass
    if _cap_lease():
        return True, "kernel read leases (F_SETLEASE; CAP_LEASE: files of any owner)"
    return True, (f"kernel read leases (F_SETLEASE) for files owned by uid {os.geteuid()}; files of other "
                  f"owners wait for settle_seconds (no CAP_LEASE)")


class Leases:
    """`whole(path)`: the file's stat when nobody has it open for writing, else None."""

    def __init__(self) -> None:
        self.usable, self.description = method()
        self._lock = threading.Lock()
        self._no_leases: set[int] = set()  # st_dev of file systems that refused a lease
        self._told_not_allowed = False
        self.granted = 0  # files found whole (for tests and the curious)

    def whole(self, path: str | os.PathLike[str], *, follow_symlinks: bool = False) -> os.stat_result | None:
        """The file's stat, taken while no process had it open for writing: it is closed, and
        this is its content. None when a writer has it open, or when the kernel cannot say
        (no leases here, not permitted): the file then waits for its close event or settles."""
        if not self.usable:
            return None
        import fcntl

        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        if not follow_symlinks:
            flags |= os.O_NOFOLLOW
        try:
            fd = os.open(path, flags)  # O_NONBLOCK: no wait on a FIFO put there meanwhile
        except OSError:
            return None  # gone, replaced by a symlink, unreadable: its events or the settle decide
        try:
            st = os.fstat(fd)
            if not st_mod.S_ISREG(st.st_mode) or st.st_dev in self._no_leases:
                return None
            try:
                fcntl.fcntl(fd, F_SETSIG, signal.SIGURG)  # a lease break must not end syncd (SIGIO)
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
            except OSError as e:
                self._refused(e, path, st)
                return None
            try:
                st = os.fstat(fd)  # under the lease: nobody can be writing it
            finally:
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        except OSError:
            return None
        finally:
            os.close(fd)
        with self._lock:
            self.granted += 1
        return st

    def _refused(self, e: OSError, path: str | os.PathLike[str], st: os.stat_result) -> None:
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return  # open for writing: its close event comes (its directory's watch exists now)
        with self._lock:
            if e.errno in _NO_LEASES:
                if st.st_dev in self._no_leases:
                    return
                self._no_leases.add(st.st_dev)
                msg = (f"the file system of {path} has no kernel leases ({e.strerror}): files written into new "
                       f"directories there wait for settle_seconds")
            elif e.errno in _NOT_ALLOWED:
                if self._told_not_allowed:
                    return
                self._told_not_allowed = True
                msg = (f"cannot take a read lease on {path} (owner uid {st.st_uid}, syncd runs as uid "
                       f"{os.geteuid()} without CAP_LEASE): such files written into new directories wait for "
                       f"settle_seconds; grant CAP_LEASE (packaging/systemd)")
            else:
                msg = f"read lease on {path} failed ({e.strerror}); such files wait for settle_seconds"
        log.warning("%s", msg)
