"""One remote change at a time: the rules the S3 events consumer applies (SPEC §4.12, `syncd.events`).

`apply_remote_change(ledger, cfg, watch, rel, info, seen_at=...)` (with `watch_for_key(cfg, key)`
to find `watch` and `rel`; then wake the workers) applies ONE remote change with the listing's
rules (`reconcile.decide`): `info` is the object as the event describes it (key, size, etag), None
for a deletion; `seen_at` is when it happened (the event's time). Differences from a listing:

- a change the row knows already (its own upload's etag, a deletion of a row deleted already)
  costs nothing;
- a path that is busy (a worker holds its row: it is being uploaded or restored) or whose row
  changed since the event happened is never dropped: the row is marked (`recheck`, one
  transaction) and, once free, compared with the remote by `recheck_waiting` (a HEAD: what
  the key holds now, whatever the order the events came in), which the consumer runs after
  each receive. A change that a watcher or worker got to between the read and the write is
  marked the same way. So the last version wins on every host, however fast a path changes;
- local deletions are due `guard.EVENT_GRACE` seconds later and judged by the mass-deletion
  guard in the transaction that queues them (`guard.DeleteGuard.judge_events`): a burst that
  would remove most of a watch's files pauses until a listing confirms it;
- tombstones are not known (pass `tomb` when the caller knows one; tombstone events themselves
  are ignored: `rel` under `.syncd/` returns None).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from syncd.config import Config, WatchConfig
from syncd.guard import EVENT_GRACE, DeleteGuard
from syncd.keys import is_reserved, join_key, rel_from_key
from syncd.ledger import Ledger, Row
from syncd.logs import CauseLog
from syncd.patterns import Filter
from syncd.reconcile import Result, Work, decide
from syncd.remote.base import ObjectInfo, Remote, RemoteError

log = logging.getLogger(__name__)
RECHECK = "recheck"  # what apply_remote_change returns for a change that waits for its path
SWEEP = 100  # paths compared with the remote per turn of the consumer


def watch_for_key(cfg: Config, key: str) -> tuple[WatchConfig, str] | None:
    """The watch a key belongs to and its relative path (None: no watch's); raises UnsafeKey for
    a key that would escape the watch root (to be refused and reported, SPEC §4.4)."""
    for w in cfg.watches:
        base = join_key(cfg.remote.prefix, w.prefix)
        if not base or key.startswith(base + "/"):
            return w, rel_from_key(key, base)
    return None


def apply_remote_change(ledger: Ledger, cfg: Config, watch: WatchConfig, rel: str, info: ObjectInfo | None,
                        *, seen_at: float, tomb: ObjectInfo | None = None, remote: Remote | None = None,
                        guard: DeleteGuard | None = None) -> str | None:
    """Apply one remote change; see the module docstring. Durable in the ledger when it returns.

    Returns what was queued ("restore", "replace", "upload", "unlink", "adopt"), RECHECK when the
    path was busy (it is compared with the remote once free), or None."""
    if not rel or is_reserved(rel) or not Filter(watch.include, watch.exclude).wants(rel):
        return None
    return _apply(ledger, cfg, watch, rel, info, ledger.get(watch.prefix, rel), seen_at=seen_at, tomb=tomb,
                  remote=remote, guard=guard)


def _known(row: Row, info: ObjectInfo | None) -> bool:
    """The row says this already: the change is its own (an upload's or deletion's event) or applied."""
    if info is not None:
        return bool(info.etag) and info.etag == row["remote_etag"] and row["state"] == "synced" and row["op"] is None
    return row["state"] == "deleted" and row["op"] is None and row["remote_etag"] is None


def _mark(db: Any, ids: list[int], seen_at: float) -> None:
    """The rows' paths are compared with the remote once free (no gen bump: a worker's result stands)."""
    db.execute(f"UPDATE files SET recheck=max(coalesce(recheck, 0), ?) WHERE id IN ({','.join('?' for _ in ids)})",
               [seen_at, *ids])


def _apply(ledger: Ledger, cfg: Config, watch: WatchConfig, rel: str, info: ObjectInfo | None, row: Row | None, *,
           seen_at: float, tomb: ObjectInfo | None, remote: Remote | None, guard: DeleteGuard | None,
           rechecked: bool = False) -> str | None:
    """`rechecked`: `info` is what a HEAD said at `seen_at`, for a row marked `recheck` (cleared
    here once the path is judged)."""
    if row is not None and _known(row, info):
        if rechecked:
            with ledger.write() as w:
                w.execute("UPDATE files SET recheck=NULL WHERE id=?", [row["id"]])
        return None
    if row is not None and (row["lease_until"] is not None or (row["updated_at"] or 0) >= seen_at):
        with ledger.write() as w:  # busy, or changed since: compared with the remote once free
            _mark(w, [row["id"]], seen_at)
        return RECHECK
    guard = guard if guard is not None else DeleteGuard(cfg, ledger)
    res = Result()
    now = time.time()
    work = Work(ledger, watch, join_key(cfg.remote.prefix, watch.prefix), now=now, unlink_due=now + EVENT_GRACE)
    decide(work, watch, rel, info, tomb, row, since=seen_at, res=res)

    def then(db: Any) -> None:
        if work.missed:
            _mark(db, work.missed, seen_at)
        elif rechecked and row is not None:
            db.execute("UPDATE files SET recheck=NULL WHERE id=?", [row["id"]])
        if res.local_deletes:
            guard.judge_events(db, watch.prefix)

    work.flush(remote, then=then if (len(work) or rechecked) else None)
    if work.missed:
        return RECHECK
    for kind, n in (("restore", res.restores), ("replace", res.replaces), ("upload", res.uploads),
                    ("unlink", res.local_deletes), ("adopt", res.adopted)):
        if n:
            return kind
    return None


def recheck_waiting(ledger: Ledger, cfg: Config, remote: Remote, guard: DeleteGuard | None = None, *,
                    on_queued: Callable[[], None] | None = None, causes: CauseLog | None = None,
                    limit: int = SWEEP) -> int:
    """Compare with the remote (HEAD) the free paths whose changes waited for them, and apply
    what it says; returns how many paths still wait (busy ones included)."""
    watches = {w.prefix: w for w in cfg.watches}
    for marked in ledger.query("SELECT watch, path, key FROM files WHERE recheck IS NOT NULL "
                               "AND lease_until IS NULL ORDER BY recheck LIMIT ?", [limit]):
        watch = watches.get(marked["watch"])
        if watch is None:  # a watch removed from the config: nothing to compare with
            with ledger.write() as w:
                w.execute("UPDATE files SET recheck=NULL WHERE watch=? AND path=?", [marked["watch"], marked["path"]])
            continue
        seen_at = time.time()
        try:
            info = remote.head(marked["key"] or join_key(cfg.remote.prefix, watch.prefix, marked["path"]))
        except RemoteError as e:  # the remote fails: tried again at the next turn
            (causes or CauseLog(log)).report(f"could not compare a changed path with the remote: {e}",
                                             f"{marked['watch']}/{marked['path']}")
            break
        row = ledger.get(marked["watch"], marked["path"])  # as it is now (the HEAD may have taken a while)
        kind = _apply(ledger, cfg, watch, marked["path"], info, row, seen_at=seen_at, tomb=None, remote=remote,
                      guard=guard, rechecked=True)
        if kind not in (None, RECHECK) and on_queued is not None:
            on_queued()
    return int(ledger.query("SELECT count(*) AS n FROM files WHERE recheck IS NOT NULL")[0]["n"])
