"""Worker threads that claim rows from the ledger and hand them to a handler.

Workers only talk through the ledger: they claim due rows atomically and write the outcome back.
A `Wake` lets producers (the watcher, other workers) cut a worker's idle wait short.

What the app has just closed or deleted goes first (SPEC §4.1; `fresh`, the daemon's pool):
workers claim fresh uploads (due and queued within `FRESH` seconds) and fresh deletions (seen
within it, not tried yet), the newest first, before a catch-up backlog, and one more worker, the
fresh lane, claims only fresh small uploads and fresh deletions: neither waits for a free worker
behind large uploads in flight. A deletion's remote effect (its tombstone, or the object's
removal) is what keeps a lost host's file from coming back, as an upload is what keeps a file.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from syncd.errors import LedgerError
from syncd.lane import PER_WORKER, Lane, lane_size
from syncd.ledger import REMOTE_DELETE_OPS, Ledger, Row
from syncd.retry import backoff

log = logging.getLogger(__name__)
IDLE_MAX = 1.0
CLAIM_ROWS = 16  # small files are claimed several at a time: fewer ledger write transactions
CLAIM_BYTES = 1024 * 1024  # ... as long as they add up to no more than this
STOP_TIMEOUT = 10.0  # SPEC §4.10: in-flight transfers finish or are aborted within 10 s
FRESH = 60.0  # seconds an upload counts as fresh once it is due (and since its change was seen)
FRESH_LANE_OPS = ("put", *REMOTE_DELETE_OPS)  # what the fresh lane takes (uploads up to CLAIM_BYTES)


class Wake:
    """A wake-up that is never lost: `wait_after(seen)` returns at once if `set()` was called
    since `seen = wake.seen()`. (A shared Event is: a worker woken first clears it just before
    another, between its last look at the queue and its wait, starts waiting: that one slept a
    full IDLE_MAX at the end of every drain it lost this race in.)"""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0

    def set(self) -> None:
        with self._cond:
            self._count += 1
            self._cond.notify_all()

    def seen(self) -> int:
        return self._count

    def wait_after(self, seen: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._count != seen, timeout)


class WorkerPool:
    def __init__(self, ledger: Ledger, handler: Callable[[Row], None], workers: int, *,
                 stop: threading.Event | None = None, wake: Wake | None = None,
                 on_done: Callable[[Row], None] | None = None, lease: float = 900.0,
                 fresh: float = 0.0, per_worker: int = PER_WORKER) -> None:
        self.ledger = ledger
        self.fresh = fresh  # > 0: fresh uploads first, and a fresh lane (`start`)
        self.handler = handler
        self.n = workers
        self.stop = stop or threading.Event()
        self.wake = wake or Wake()
        self.on_done = on_done
        self.lease = lease
        self._threads: list[threading.Thread] = []
        self.ops: tuple[str, ...] = ()
        self.drain = False
        self.filling = False  # a drain while rows are still being queued: an empty queue is no end
        self.last_loop = time.monotonic()  # for watchdog pings: proof the loop is alive
        self.error: LedgerError | None = None  # a drain stopped by a ledger failure
        self._halt = threading.Event()
        self._err_lock = threading.Lock()
        self._unreleased: list[int] = []
        self._logged: dict[str, float] = {}
        # a claimed batch of small files is sent `per_worker` at a time (syncd.lane): latency,
        # not `workers`, bounds them
        self.lane = Lane(lane_size(workers, per_worker), on_exit=ledger.close_thread, width=per_worker)

    def _loop(self, fresh_lane: bool = False) -> None:
        attempt = 0
        try:
            while not self.stop.is_set() and not self._halt.is_set():
                try:
                    if self._unreleased:
                        self._release_unfinished()
                    if not self._turn(fresh_lane):
                        return
                    attempt = 0
                except LedgerError as e:
                    # the ledger cannot be written (full disk, read-only, I/O error, SPEC §4.11)
                    if self.drain:  # one-shot: the work stops; the command says why (exit 2)
                        with self._err_lock:
                            if self.error is None:
                                self.error = e
                        self._halt.set()
                        return
                    attempt += 1
                    self._log_failure(e)
                    self.stop.wait(backoff(attempt))  # `run`: retried until the ledger works again
        finally:
            self.ledger.close_thread()

    def _turn(self, fresh_lane: bool = False) -> bool:
        """Claim and handle one batch, or wait for work; False when a drain is done."""
        ledger = self.ledger
        self.last_loop = time.monotonic()
        seen = self.wake.seen()  # before looking at the queue: no wake-up after it is lost
        ops = tuple(op for op in self.ops if op in FRESH_LANE_OPS) if fresh_lane else self.ops
        now = time.time()
        if not ops:
            rows = []
        elif fresh_lane:  # fresh small uploads and deletions only: free whatever the others carry
            rows = ledger.claim(ops, now, lease=self.lease, limit=CLAIM_ROWS, batch_bytes=CLAIM_BYTES,
                                fresh=self.fresh, fresh_only=True, max_size=CLAIM_BYTES)
        else:
            # a fair share of what is due, up to CLAIM_ROWS: with few rows due, a second one
            # is another worker's to take, not a wait behind this one
            rows = ledger.claim(ops, now, lease=self.lease, limit=CLAIM_ROWS, batch_bytes=CLAIM_BYTES,
                                share=self.n, fresh=self.fresh)
        if rows:
            try:
                self.lane.run(rows, self._one)
            except LedgerError as e:
                # rows never started stay leased too, until the ledger works again
                with self._err_lock:
                    self._unreleased += [r["id"] for r in getattr(e, "lane_unstarted", ())]
                raise
            # idle workers re-check at once: the queue may be drained, or a retry queued
            self.wake.set()
            return True
        if self.drain and not self.filling and ledger.outstanding(ops) == 0:
            return False
        # the fresh lane leaves rows due already to the others: it waits for the next to come due
        nd = (ledger.next_due(ops, after=now) if fresh_lane else ledger.next_due(ops)) if ops else None
        wait = IDLE_MAX if nd is None else min(IDLE_MAX, max(0.01, nd - time.time()))
        self.wake.wait_after(seen, wait)
        return True

    def _release_unfinished(self) -> None:
        with self._err_lock:
            ids, self._unreleased = self._unreleased, []
        try:
            self.ledger.release(ids)
        except LedgerError:
            with self._err_lock:
                self._unreleased += ids
            raise
        log.warning("ledger %s can be written again; %d files are queued again", self.ledger.path, len(ids))

    def _log_failure(self, e: LedgerError) -> None:
        """Once per distinct cause a minute: every worker meets the same full disk."""
        now = time.monotonic()
        with self._err_lock:
            if self._logged.get(str(e), -1e9) > now - 60:
                return
            self._logged[str(e)] = now
        log.error("%s (retrying)", e)

    def unfinished(self) -> list[int]:
        """Rows claimed whose results could not be written (to release once it works)."""
        with self._err_lock:
            return list(self._unreleased)

    def _one(self, row: Row) -> None:
        """One claimed row (the rows of a batch run at once, `syncd.lane`)."""
        try:
            if self.stop.is_set() or self._halt.is_set():  # stopping: not started, so given back
                self._release([row])
                return
            self.handler(row)
        except LedgerError:
            # its result (or its release) could not be written: it stays leased until the
            # ledger works again
            with self._err_lock:
                self._unreleased.append(row["id"])
            raise
        if self.on_done:
            self.on_done(row)

    def _release(self, rows: list[Row]) -> None:
        """Give back claimed rows not started (stopping): queued again as they were."""
        for row in rows:
            self.ledger.finish(row, state="pending" if row["state"] == "uploading" else row["state"])

    def start(self, ops: tuple[str, ...], *, drain: bool = False, filling: bool = False) -> None:
        self.ops = ops
        self.drain = drain
        self.filling = filling
        self._threads = [threading.Thread(target=self._loop, name=f"syncd-worker-{i}", daemon=True)
                         for i in range(self.n)]
        if self.fresh and not drain:
            self._threads.append(threading.Thread(target=self._loop, args=(True,), name="syncd-worker-fresh",
                                                  daemon=True))
        for t in self._threads:
            t.start()

    def set_ops(self, ops: tuple[str, ...]) -> None:
        self.ops = ops
        self.wake.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the workers; True when all ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            return False
        self.lane.close()  # the workers are done: so are their batches
        return True

    def abandon(self, timeout: float = STOP_TIMEOUT) -> None:
        """Take no more rows (what fed the pool failed); those under way finish, the others
        claimed are given back."""
        self._halt.set()
        self.wake.set()
        self.join(timeout)

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def run(self, ops: tuple[str, ...], stop_timeout: float = STOP_TIMEOUT) -> None:
        """Drain: process every row for `ops` until none is queued or in flight.

        No threads (nor their ledger connections) for an empty queue, and no more than rows.
        Stopped (`stop`): in-flight transfers get `stop_timeout` seconds to finish, then are
        left behind (the caller releases their rows). A ledger that cannot be written stops
        the drain: the other workers finish their current file, and LedgerError is raised."""
        queued = self.ledger.outstanding(ops, include_failed=True)
        if queued == 0:
            return
        self.n = min(self.n, queued)
        self.start(ops, drain=True)
        self.finish(stop_timeout)

    def finish(self, stop_timeout: float = STOP_TIMEOUT) -> None:
        """The rest of `run`: drain what is queued, then end. Also ends a drain started
        `filling` (working on rows while more are queued: restores during a listing)."""
        self.filling = False
        self.wake.set()
        while not self.join(timeout=0.5):
            if self.stop.is_set():
                self.join(stop_timeout)
                break
        if self.error is not None:
            self.join(None if not self.stop.is_set() else stop_timeout)
            raise self.error
