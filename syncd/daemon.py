"""`syncd run`: the resync startup sequence, then live watching until SIGTERM/SIGINT.

Order: lock the ledger -> start the watcher (events are recorded from the first moment, so
nothing written during the startup is missed) -> wait for the remote -> plan (scan, listing)
-> restore missing -> READY -> workers upload the catch-up and every later change. The
main thread supervises: rescans (periodic, or after a watcher overflow/error), the deletion
cap, readiness and health. Remote problems never end the daemon; they are retried.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from syncd.config import Config
from syncd.engine import RESTORE_OPS, UPLOAD_OPS, Engine
from syncd.errors import RemoteUnavailable
from syncd.ledger import Ledger
from syncd.lock import LedgerLock
from syncd.pool import WorkerPool
from syncd.remote import open_remote
from syncd.remote.base import RemoteError
from syncd.retry import backoff
from syncd.scanner import Scanner
from syncd.service.systemd import Notifier
from syncd.watcher import Watcher

log = logging.getLogger(__name__)
STOP_TIMEOUT = 10.0
TICK = 0.5
DELETE_WINDOW = 60.0
NO_DELETE_OPS = ("put", "get")
ALL_OPS = ("get", *UPLOAD_OPS)


class Daemon:
    def __init__(self, cfg: Config, *, stop: threading.Event | None = None,
                 notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.notifier = notifier or Notifier()
        self.phase = "starting"
        self.ledger: Ledger | None = None
        self.engine: Engine | None = None
        self.watcher: Watcher | None = None
        self.pool: WorkerPool | None = None
        self._rescan_reason: str | None = None
        self._rescan_lock = threading.Lock()
        self._pause_lock = threading.Lock()
        self.tick = time.monotonic()
        self.working = False  # a long startup restore or rescan is progress, not a stuck loop
        self.last_reconcile_ok: bool | None = None
        self.last_reconcile_at: float | None = None
        self.hooks: list[Any] = []  # objects with start(daemon) / stop() (the HTTP endpoint)

    # --- requests from other threads -------------------------------------------------------
    def request_rescan(self, reason: str) -> None:
        with self._rescan_lock:
            if self._rescan_reason is None:
                log.warning("full rescan requested: %s", reason)
                self._rescan_reason = reason

    # --- health (for /healthz and the systemd watchdog) ------------------------------------
    def health(self) -> tuple[bool, str]:
        now = time.time()
        if self.phase == "starting":
            return False, "starting: startup restore running"
        if self.phase == "stopping":
            return False, "stopping"
        if self.watcher is None or not self.watcher.alive():
            return False, "watcher is down"
        if self.watcher.down:
            return False, "; ".join(self.watcher.down.values())
        assert self.ledger is not None and self.engine is not None
        paused = self.ledger.get_meta("deletes_paused")
        if paused:
            return False, f"remote deletions paused ({paused}); release with `syncd retry --deletes`"
        stats = self.engine.stats
        if stats.remote_fail_since and now - stats.remote_fail_since > self.cfg.max_backlog_age:
            return False, (f"remote failing for {now - stats.remote_fail_since:.0f}s: "
                           f"{stats.last_remote_error}")
        oldest = [t for w in self.cfg.watches if (t := self.ledger.oldest_pending(w.prefix)) is not None]
        if oldest and now - min(oldest) > self.cfg.max_backlog_age:
            return False, f"a pending file has waited {now - min(oldest):.0f}s (max_backlog_age)"
        return True, "ok"

    def loop_alive(self) -> bool:
        """For the systemd watchdog: the supervisor loop and the workers are turning."""
        stuck_after = max(60.0, self.notifier.watchdog_usec / 1e6)
        turning = self.working or time.monotonic() - self.tick < stuck_after
        return turning and (self.pool is None or self.pool.alive())

    # --- the run ---------------------------------------------------------------------------
    def run(self) -> int:
        if self.cfg.health_listen:
            from syncd.http import HttpEndpoint

            # bound first: an address in use is a config error (exit 2) before anything starts
            self.hooks.append(HttpEndpoint(self, self.cfg.health_listen))
        if self.cfg.healthcheck_url:
            from syncd.healthcheck import Pinger

            self.hooks.append(Pinger(self.cfg.healthcheck_url))
        lock = LedgerLock(self.cfg.ledger)
        try:
            lock.acquire("run")
        except BaseException:
            for h in self.hooks:
                h.stop()
            raise
        try:
            self.ledger = Ledger(self.cfg.ledger)
            try:
                return self._run()
            finally:
                self.ledger.close()
        finally:
            lock.release()

    def _run(self) -> int:
        assert self.ledger is not None
        cfg, ledger = self.cfg, self.ledger
        remote = open_remote(cfg)
        self.engine = engine = Engine(cfg, ledger, remote, oneshot=False, stop=self.stop)
        engine.transfers.delete_gate = self.deletes_allowed
        ledger.set_meta("ready", "0")
        engine.prepare()
        ledger.recover()
        for h in self.hooks:
            h.start(self)
        self.notifier.start_watchdog(self.loop_alive)
        self.watcher = Watcher(cfg, ledger, request_rescan=self.request_rescan, wake=engine.wake)
        self.watcher.start()
        self.working = True  # waiting for the remote and restoring are progress, not a stuck loop
        try:
            self.notifier.status("waiting for the remote")
            if not self._wait_for_remote(engine):
                return 0
            self.notifier.status("restoring missing files")
            if not self._plan(engine):
                return 0
            n = engine.outstanding(RESTORE_OPS)
            if n:
                log.info("restoring %d missing files", n)
            engine.drain(RESTORE_OPS)
            self.working = False
            self.tick = time.monotonic()
            if self.stop.is_set():
                return 0
            self._reconciled(engine)
            self.phase = "running"
            ledger.set_meta("ready", "1")
            self.notifier.ready(f"watching; backlog {engine.outstanding(UPLOAD_OPS)}")
            log.info("ready: %d files restored; watching %s", engine.stats.restored,
                     ", ".join(str(w.path) for w in cfg.watches))
            self.pool = WorkerPool(ledger, engine.transfers.handle, cfg.workers, stop=self.stop, wake=engine.wake)
            self.pool.start(self._ops())
            self._supervise()
            return 0
        finally:
            self._shutdown(remote)

    def _wait_for_remote(self, engine: Engine) -> bool:
        return self._until_remote_works(engine, engine.probe, "remote not usable")

    def _plan(self, engine: Engine) -> bool:
        """The startup plan; a remote that refuses the listing (denied, credentials) is reported
        and retried like any remote problem: `run` never exits because of the remote."""
        return self._until_remote_works(engine, lambda: engine.plan(restore=True), "startup listing failed")

    def _until_remote_works(self, engine: Engine, step: Callable[[], object], what: str) -> bool:
        """Run `step` until it gets past the remote, reporting each failure and backing off;
        False when stopped first."""
        attempt = 0
        while not self.stop.is_set():
            try:
                step()
            except (RemoteError, RemoteUnavailable) as e:
                attempt += 1
                cause = e.cause if isinstance(e, RemoteError) else str(e)
                engine.stats.remote_failed(cause)
                engine.causes.report(f"{what}: {cause}", engine.remote.name, logging.ERROR)
                self.stop.wait(backoff(attempt))
                continue
            if attempt:
                log.info("remote %s is reachable again", engine.remote.name)
                engine.causes.clear()
            return not self.stop.is_set()
        return False

    def _ops(self) -> tuple[str, ...]:
        assert self.ledger is not None
        return NO_DELETE_OPS if self.ledger.get_meta("deletes_paused") else ALL_OPS

    def _supervise(self) -> None:
        assert self.ledger is not None and self.engine is not None and self.pool is not None
        next_rescan = time.monotonic() + self.cfg.rescan_interval if self.cfg.rescan_interval else None
        next_status = 0.0
        while not self.stop.wait(TICK):
            self.tick = time.monotonic()
            assert self.watcher is not None
            if not self.watcher.alive():
                log.error("watcher stopped; restarting it and rescanning")
                self.watcher.stop()
                self.watcher = Watcher(self.cfg, self.ledger, request_rescan=self.request_rescan,
                                       wake=self.engine.wake)
                self.watcher.start()
                self.request_rescan("watcher restarted")
            with self._rescan_lock:
                reason, self._rescan_reason = self._rescan_reason, None
            if reason is None and next_rescan is not None and time.monotonic() >= next_rescan:
                reason = "periodic"
            if reason is not None:
                self.rescan(reason)
                if next_rescan is not None:
                    next_rescan = time.monotonic() + self.cfg.rescan_interval
            self._check_delete_rate()
            ops = self._ops()
            if ops != self.pool.ops:
                self.pool.set_ops(ops)
            if self.tick >= next_status:
                next_status = self.tick + 5
                self.notifier.status(f"watching; backlog {self.engine.outstanding(UPLOAD_OPS)}")

    def rescan(self, reason: str) -> None:
        """A full comparison of every watch with the ledger; missing files are deletions now."""
        assert self.ledger is not None and self.engine is not None and self.watcher is not None
        log.info("rescan (%s)", reason)
        self.working = True
        try:
            self._rescan()
        finally:
            self.working = False
            self.tick = time.monotonic()

    def _rescan(self) -> None:
        assert self.ledger is not None and self.engine is not None and self.watcher is not None
        ok = True
        for w in self.cfg.watches:
            problem = self.watcher.root_ok(w)
            if problem:
                log.error("%s; skipping its rescan (no deletions)", problem)
                self.watcher.down[w.prefix] = problem
                ok = False
                continue
            self.watcher.down.pop(w.prefix, None)
            try:
                stats = Scanner(self.ledger, w, self.cfg.remote.prefix, settle=self.cfg.settle_seconds,
                                missing="delete").run()
            except OSError as e:
                log.error("rescan of %s failed: %s", w.path, e)
                ok = False
                continue
            remote_deletions = stats.deletions if w.on_delete != "keep" else 0
            if remote_deletions > self.cfg.max_deletes:
                self._pause_deletes(f"{remote_deletions} deletions in one rescan of {w.prefix}")
        self.engine.wake.set()
        self._reconciled(self.engine, ok)

    def deletes_allowed(self) -> bool:
        """Asked by a worker before each remote deletion, so the max_deletes cap holds even when
        workers delete faster than the supervisor ticks (SPEC §4.5)."""
        assert self.ledger is not None
        self._check_delete_rate()
        return not self.ledger.get_meta("deletes_paused")

    def _check_delete_rate(self) -> None:
        """More than max_deletes remote deletions queued or done within 60 s pauses them all.
        Rows queued before the last `syncd retry --deletes` are not counted again."""
        assert self.ledger is not None
        if self.ledger.get_meta("deletes_paused"):
            return
        since = max(time.time() - DELETE_WINDOW, float(self.ledger.get_meta("deletes_released_at") or 0))
        n = self.ledger.query("SELECT count(*) AS n FROM files WHERE state IN ('deleting','deleted') "
                              "AND queued_at>?", [since])[0]["n"]
        if n > self.cfg.max_deletes:
            self._pause_deletes(f"{n} remote deletions queued within {DELETE_WINDOW:.0f}s")

    def _pause_deletes(self, why: str) -> None:
        assert self.ledger is not None
        with self._pause_lock:  # workers may all hit the cap at once: one log line, one reason
            if self.ledger.get_meta("deletes_paused"):
                return
            log.error("pausing remote deletions: %s exceeds max_deletes=%d; check the watch, then run "
                      "`syncd retry --deletes` to release them", why, self.cfg.max_deletes)
            self.ledger.set_meta("deletes_paused", why)

    def _reconciled(self, engine: Engine, ok: bool = True) -> None:
        failed = self.ledger.query("SELECT count(*) AS n FROM files WHERE state='failed'")[0]["n"] if self.ledger \
            else 0
        self.last_reconcile_ok = ok and not failed
        if self.last_reconcile_ok:
            self.last_reconcile_at = time.time()
        for h in self.hooks:
            if hasattr(h, "reconciled"):
                h.reconciled(self.last_reconcile_ok)

    def _shutdown(self, remote) -> None:
        self.phase = "stopping"
        self.stop.set()
        self.notifier.stopping()
        deadline = time.monotonic() + STOP_TIMEOUT
        clean = True
        if self.pool is not None and not self.pool.join(timeout=max(0.0, deadline - time.monotonic() - 1)):
            clean = False
            log.warning("transfers still running at stop; aborting them (they are retried at next start)")
        if self.watcher is not None:
            self.watcher.stop()
        for h in self.hooks:
            h.stop()
        assert self.ledger is not None
        self.ledger.recover()  # no row is left `uploading` (SPEC §4.10)
        self.ledger.set_meta("ready", None)
        self.notifier.close()
        if clean:  # closing waits for in-flight transfers; after a timeout the exit aborts them
            remote.close()
        log.info("stopped")
