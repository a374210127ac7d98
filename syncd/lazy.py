"""Restores behind READY (`lazy_restore`, SPEC §2, §6) and restoring one file ahead of the queue.

With `lazy_restore = true` the daemon is READY (sd_notify `READY=1`, ledger meta `ready=1`,
`/healthz` 200) right after the local scan (and, for a ledger that never listed the remote, the
listing that queues the restores). The restore queue (`op = 'get'` rows) then drains behind
READY on its own workers (`LazyRestore`), so the uploads of what the app writes meanwhile never
wait behind it: the daemon's main pool leaves `get` rows to this one while it runs.
`/healthz` answers `ok (restoring N)` until it has drained, N being `LazyRestore.remaining()`.

`restore_now(engine, watch, path)` is the hook for "on-demand requests first" (`/files/`): it
restores one queued file in the caller's thread, ahead of everything queued, with the same
verified, atomic restore (`Transfers.handle` -> `restore.fetch`) that records the row synced, so
the queue skips it afterwards. Concurrent callers, and a worker that has already claimed the
row, share one download: whoever holds the row's lease restores it, the others wait for the
lease to be released.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from syncd.lane import per_worker
from syncd.pool import Wake, WorkerPool

if TYPE_CHECKING:
    from syncd.engine import Engine

log = logging.getLogger(__name__)
RESTORE_OPS = ("get",)
LEASE = 900.0  # as the worker pool's
POLL = 0.02  # seconds between looks at a row another thread is restoring

# restore_now outcomes
PRESENT = "present"  # the file is on disk (it was already, or it appeared meanwhile)
RESTORED = "restored"  # restored now, by this call or by the worker or request it waited for
NOT_QUEUED = "not_queued"  # no restore is queued for it: no row, a tombstone, or nothing remote
FAILED = "failed"  # the restore was tried and did not work: the row says why (last_error)
TIMEOUT = "timeout"  # another thread is still restoring it after `timeout` seconds


def restore_now(engine: Engine, watch: str, path: str, *, timeout: float = 300.0) -> str:
    """Restore the file `path` (ledger path: relative, `/`) of watch prefix `watch` now, ahead of
    the restore queue, in the calling thread; returns one of PRESENT, RESTORED, NOT_QUEUED,
    FAILED or TIMEOUT.

    Only a row queued for restore (`op = 'get'`, state `pending`, due or waiting for a retry) is
    taken, whatever its place in the queue: an unclaimed row is leased first, so no worker
    starts the same download; a row a worker has claimed in its batch but not started yet is
    taken over (the worker skips it when it gets there). A restore already running (a worker's,
    or another caller's) is waited for, up to `timeout`. A `failed` restore is not retried here
    (`syncd retry` does). NOT_QUEUED leaves the decision to the caller: a file the ledger does
    not know may still be in the remote (the listing after READY has not reached it yet) and
    then needs the caller's own lookup.
    """
    w = next((x for x in engine.cfg.watches if x.prefix == watch), None)
    if w is None:
        return NOT_QUEUED
    target = w.path.joinpath(*path.split("/"))
    ledger, transfers = engine.ledger, engine.transfers
    deadline = time.monotonic() + timeout
    waited = False
    while True:
        if os.path.lexists(target):
            return RESTORED if waited else PRESENT
        row = _claim(engine, watch, path)
        if row is None:
            row = ledger.get(watch, path)
            if row is None or row["op"] != "get" or row["state"] not in ("pending", "failed"):
                return NOT_QUEUED
            if row["lease_until"] is None:
                if row["state"] == "failed":
                    return FAILED
                continue  # released between the two looks: claim it
            if row["state"] == "failed" or transfers.restoring(row["id"]):
                row = None  # being restored right now: wait for it
        if row is not None:
            transfers.handle(row)  # never raises; skips a row whose restore started meanwhile
            if not transfers.restoring(row["id"]):  # done (not skipped for someone else's)
                # FAILED: the row says why (last_error); the queue retries it
                return RESTORED if os.path.lexists(target) else FAILED
        if time.monotonic() > deadline:
            return TIMEOUT
        waited = True  # someone else's download is ours too
        time.sleep(POLL)


def _claim(engine: Engine, watch: str, path: str):  # noqa: ANN202 - a ledger Row or None
    """Lease one queued restore, whatever its due time (a retry's backoff included)."""
    now = time.time()
    with engine.ledger.write() as w:
        cur = w.execute(
            "UPDATE files SET lease_until=?, updated_at=? WHERE watch=? AND path=? AND op='get' "
            "AND state='pending' AND lease_until IS NULL RETURNING *", [now + LEASE, now, watch, path])
        cols = [d[0] for d in cur.description]
        got = cur.fetchone()
    return dict(zip(cols, got, strict=True)) if got is not None else None


class LazyRestore:
    """The restore queue drained behind READY, on `workers` threads of its own."""

    def __init__(self, engine: Engine, workers: int, stop: threading.Event) -> None:
        self.engine = engine
        self.stop = stop
        self.pool = WorkerPool(engine.ledger, engine.transfers.handle, max(1, workers), stop=stop, wake=Wake(),
                               per_worker=per_worker(engine.remote))
        self._started = False
        self._reported = False

    def start(self) -> None:
        n = self.remaining()
        if n:
            log.info("restoring %d missing files behind READY (lazy_restore)", n)
        self.pool.n = max(1, min(self.pool.n, n))
        self.pool.start(RESTORE_OPS, drain=True)
        self._started = True

    def running(self) -> bool:
        """True until the queue has drained (its workers end then)."""
        return self._started and self.pool.alive()

    def remaining(self) -> int:
        """Restores queued or in flight (the N of `/healthz` "ok (restoring N)")."""
        return self.engine.ledger.outstanding(RESTORE_OPS)

    def finished(self) -> bool:
        """True once, when the queue has drained (for the startup reconcile's report)."""
        if self._reported or not self._started or self.pool.alive():
            return False
        self._reported = True
        if not self.stop.is_set():
            log.info("lazy restore done: %d files restored", self.engine.stats.restored)
        return True

    def join(self, timeout: float | None = None) -> bool:
        return self.pool.join(timeout)


def oldest_upload(ledger, watch: str) -> float | None:  # noqa: ANN001 - a syncd.ledger.Ledger
    """`Ledger.oldest_pending` without restores: the backlog age `/healthz` checks while the
    restore runs behind READY (a long restore is reported as "restoring N", not as a backlog)."""
    rows = ledger.query("SELECT min(queued_at) AS t FROM files WHERE watch=? AND state IN "
                        "('pending','uploading','deleting') AND op IS NOT 'get'", [watch])
    return rows[0]["t"]
