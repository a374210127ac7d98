"""Files their writer has closed (`upload_on_close`, SPEC §4.1): uploaded at once, not after settling.

The watcher records each close-after-write (inotify's IN_CLOSE_WRITE, watchdog's
`FileClosedEvent`, a file renamed into place, or a file found in a new directory that nobody
has open for writing, `syncd.leases`) with the file's size and mtime at that moment:
"closed at this content". A worker then skips the `settle_seconds` wait for that row, but only
while the file still has exactly that size and mtime. Anything written afterwards (by a
descriptor still open, or a rewrite right after the close) changes the mtime, so the file is
back on the normal path: its row's `gen` is bumped by the watcher, the upload in flight (if any)
is queued again by `Transfers._put`'s re-check, and the remote ends with the last content.

One trap: a file's mtime comes from a coarse clock (a kernel tick, up to 10 ms), so a write in
the same tick as the close, with the same size, would not change size or mtime. A closed file is
therefore read no earlier than `GUARD` after its mtime: any later write lands in a later tick.
A whole-second mtime (a file system that keeps seconds only) is not trusted at all; such files
wait for `settle_seconds` as before.

In memory only: after a crash the file simply waits for `settle_seconds`. Bounded: the oldest
facts are dropped first (a dropped fact only costs the settle wait).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

GUARD = 0.025  # seconds after the mtime before a closed file is read (> one kernel tick)
LIMIT = 65536  # remembered closes


class Closes:
    """Thread-safe map (watch, path) -> (size, mtime_ns) of the last close-after-write seen."""

    def __init__(self, limit: int = LIMIT) -> None:
        self._seen: OrderedDict[tuple[str, str], tuple[int, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.limit = limit

    @staticmethod
    def trusted(mtime_ns: int) -> bool:
        """False for a whole-second mtime: the file system may keep seconds only."""
        return mtime_ns % 1_000_000_000 != 0

    @staticmethod
    def ready_at(mtime_ns: int) -> float:
        """When a file closed with this mtime may be read (Unix seconds)."""
        return mtime_ns / 1e9 + GUARD

    def record(self, watch: str, path: str, size: int, mtime_ns: int) -> bool:
        """Remember that the writer closed `path` at this size and mtime; False when the mtime
        cannot be trusted for it (then the file settles as usual)."""
        if not self.trusted(mtime_ns):
            return False
        with self._lock:
            self._seen[(watch, path)] = (size, mtime_ns)
            self._seen.move_to_end((watch, path))
            while len(self._seen) > self.limit:
                self._seen.popitem(last=False)
        return True

    def closed(self, watch: str, path: str, size: int, mtime_ns: int) -> bool:
        """Was the file closed by its writer with exactly this size and mtime?"""
        with self._lock:
            return self._seen.get((watch, path)) == (size, mtime_ns)

    def forget(self, watch: str, path: str, size: int | None = None, mtime_ns: int | None = None) -> None:
        """Drop the fact (only if it is still this size and mtime, when they are given: a newer
        close recorded meanwhile stays)."""
        with self._lock:
            got = self._seen.get((watch, path))
            if got is not None and (size is None or got == (size, mtime_ns)):
                del self._seen[(watch, path)]

    def __len__(self) -> int:
        return len(self._seen)
