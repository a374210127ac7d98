"""Remote tombstones (SPEC §4.5): the remote's memory of files the app deleted under `keep`.

Under `on_delete = "keep"` a deletion seen while running leaves the object where it is and
writes a zero-byte object `<remote prefix>/<watch prefix>/.syncd/tombstones/<relative path>`
(ledger op `tomb`, retried like any remote work). A host whose ledger was lost with its disk
reads the tombstones from its listing (no HEAD per object) and does not bring the file back:

- a tombstone at least as new as the object hides it (`hides`): not restored;
- an object newer than its tombstone wins: the file was written again; the stale tombstone is
  removed by the listing (`lift`);
- uploading the path again removes its tombstone at once (the row's `tomb` flag, `Transfers`).

Times are the store's own modification times from the listing: both objects are written by the
same store's clock (S3's LastModified; the file remote's mtimes, where a tombstone carries the
time of the deletion). A tie counts for the tombstone: the deletion is the later event whenever
both happen within the store's timestamp resolution (S3 lists whole seconds).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from syncd.keys import UnsafeKey, join_key, rel_from_key
from syncd.remote.base import ObjectInfo, Remote

TOMB_DIR = ".syncd/tombstones"
_EMPTY_SHA = hashlib.sha256(b"").hexdigest()


def tomb_base(key_base: str) -> str:
    """Where a watch's tombstones live: `<remote prefix>/<watch prefix>/.syncd/tombstones`."""
    return join_key(key_base, TOMB_DIR)


def tomb_key(key_base: str, rel: str) -> str:
    return join_key(tomb_base(key_base), rel)


def write(remote: Remote, key_base: str, rel: str, now: float | None = None) -> None:
    """Write (or renew) the tombstone of `rel`: zero bytes, dated now."""
    ts = time.time() if now is None else now
    remote.put(tomb_key(key_base, rel), Path("/dev/null"), size=0, sha256=_EMPTY_SHA,
               mtime_ns=int(ts * 1e9), data=b"")


def lift(remote: Remote, key_base: str, rel: str) -> None:
    """Remove the tombstone of `rel` (a missing one is fine)."""
    remote.delete(tomb_key(key_base, rel))


def listing(remote: Remote, key_base: str, objects: Iterable[ObjectInfo] | None = None
            ) -> Iterator[tuple[str, ObjectInfo]]:
    """(relative path, tombstone) for every tombstone of a watch, in path order (the listing's
    order, since every key shares the tombstone prefix). Keys that are not safe paths are
    skipped: they can hide nothing. `objects`: the listing of `tomb_base(key_base) + "/"` when
    the caller makes it (e.g. resumable)."""
    base = tomb_base(key_base)
    for obj in remote.list(base + "/") if objects is None else objects:
        try:
            yield rel_from_key(obj.key, base), obj
        except UnsafeKey:
            continue


def hides(tomb: ObjectInfo | None, obj: ObjectInfo | None) -> bool:
    """Does the tombstone hide the object (the app deleted the file after this version)?"""
    if tomb is None or obj is None:
        return False
    # the store's times (a HEAD's mtime_ns is the file's own, from another host's clock)
    t = tomb.modified_ns if tomb.modified_ns is not None else tomb.mtime_ns
    o = obj.modified_ns if obj.modified_ns is not None else obj.mtime_ns
    if t is None or o is None:
        return True  # no dates to compare: the deletion is what syncd knows of last
    return t >= o
