"""One remote change at a time: the rules the S3 events consumer applies (SPEC §4.12, `syncd.events`).

`apply_remote_change(ledger, cfg, watch, rel, info, seen_at=...)` (with `watch_for_key(cfg, key)`
to find `watch` and `rel`; then wake the workers) applies ONE remote change with the listing's
rules (`reconcile.decide`): `info` is the object as the event describes it (key, size, etag), None
for a deletion; `seen_at` is when it happened (the event's time). Differences from a listing:

- its own uploads are recognised (same etag: nothing to do); a row changed after the event, or
  leased by a worker, is left alone;
- local deletions are due `guard.EVENT_GRACE` seconds later and judged by the mass-deletion
  guard in the transaction that queues them (`guard.DeleteGuard.judge_events`): a burst that
  would remove most of a watch's files pauses until a listing confirms it;
- tombstones are not known (pass `tomb` when the caller knows one; tombstone events themselves
  are ignored: `rel` under `.syncd/` returns None).
"""

from __future__ import annotations

import time
from typing import Any

from syncd.config import Config, WatchConfig
from syncd.guard import EVENT_GRACE, DeleteGuard
from syncd.keys import is_reserved, join_key, rel_from_key
from syncd.ledger import Ledger, Row
from syncd.patterns import Filter
from syncd.reconcile import Result, Work, decide
from syncd.remote.base import ObjectInfo, Remote


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

    Returns what was queued ("restore", "replace", "upload", "unlink", "adopt") or None."""
    if not rel or is_reserved(rel) or not Filter(watch.include, watch.exclude).wants(rel):
        return None
    return _apply(ledger, cfg, watch, rel, info, ledger.get(watch.prefix, rel), seen_at=seen_at, tomb=tomb,
                  remote=remote, guard=guard)


def _apply(ledger: Ledger, cfg: Config, watch: WatchConfig, rel: str, info: ObjectInfo | None, row: Row | None, *,
           seen_at: float, tomb: ObjectInfo | None, remote: Remote | None, guard: DeleteGuard | None) -> str | None:
    guard = guard if guard is not None else DeleteGuard(cfg, ledger)
    res = Result()
    now = time.time()
    work = Work(ledger, watch, join_key(cfg.remote.prefix, watch.prefix), now=now, unlink_due=now + EVENT_GRACE)
    decide(work, watch, rel, info, tomb, row, since=seen_at, res=res)

    def then(db: Any) -> None:
        if res.local_deletes:
            guard.judge_events(db, watch.prefix)

    work.flush(remote, then=then if res.local_deletes else None)
    for kind, n in (("restore", res.restores), ("replace", res.replaces), ("upload", res.uploads),
                    ("unlink", res.local_deletes), ("adopt", res.adopted)):
        if n:
            return kind
    return None
