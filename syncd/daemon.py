"""`syncd run`: the resync startup sequence, then live watching until SIGTERM/SIGINT.

Order: lock the ledger -> start the watcher (events are recorded from the first moment, so
nothing written during the startup is missed) -> wait for the remote (while it fails, the
watches are scanned once: the backlog shows what waits for it) -> plan (scan; a listing
only when the ledger has never listed the remote: a new or lost ledger) -> restore missing ->
READY -> workers upload the catch-up and every later change (with `lazy_restore`, READY comes
before the restore, which drains behind it: `syncd.lazy`). The listing thread lists the remote
right after READY (READY never waits for it when the ledger knows the remote) and then every
`remote_rescan_interval` (SPEC §3). The main thread supervises: rescans (periodic, or after a
watcher overflow/error), the deletion cap (`syncd.guard`), readiness and health. Remote
problems never end the daemon; they are retried.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from syncd.config import Config
from syncd.engine import LOCAL_DELETE_OPS, RESTORE_OPS, UPLOAD_OPS, Engine
from syncd.errors import LedgerError, LedgerUnwritable, RemoteUnavailable
from syncd.interrupt import unless_stopped
from syncd.lane import per_worker
from syncd.lazy import LazyRestore, oldest_upload
from syncd.ledger import Ledger
from syncd.lock import LedgerLock
from syncd.pool import FRESH, WorkerPool
from syncd.remote import open_remote
from syncd.remote.base import RemoteError
from syncd.restore import remove_live_temps, restored_bytes
from syncd.retry import backoff
from syncd.scanner import Scanner
from syncd.service.systemd import Notifier
from syncd.watcher import Watcher

if TYPE_CHECKING:
    from syncd.events import EventConsumer

log = logging.getLogger(__name__)
STOP_TIMEOUT = 10.0
TICK = 0.5
LEDGER_RETRY_MAX = 30.0  # seconds between tries of a ledger that cannot be opened, at most
NO_DELETE_OPS = ("put", "get", "tomb")
ALL_OPS = ("get", *UPLOAD_OPS, *LOCAL_DELETE_OPS)


class Daemon:
    def __init__(self, cfg: Config, *, stop: threading.Event | None = None,
                 notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.notifier = notifier or Notifier()
        self.phase = "starting"
        self.ledger: Ledger | None = None
        self.start_failure: str | None = None  # why the ledger cannot be opened (retried)
        self.engine: Engine | None = None
        self.watcher: Watcher | None = None
        self.pool: WorkerPool | None = None
        self.lazy: LazyRestore | None = None  # lazy_restore: the restore queue behind READY
        self._rescan_reason: str | None = None
        self._rescan_lock = threading.Lock()
        self.tick = time.monotonic()
        self.working = False  # a long startup restore or rescan is progress, not a stuck loop
        self.last_reconcile_ok: bool | None = None
        self.last_reconcile_at: float | None = None
        self.hooks: list[Any] = []  # objects with start(daemon) / stop() (the HTTP endpoint)
        self.waiting_on = ""  # the startup step waiting for the remote ("remote listing failing")
        self._restore = {"total": 0, "done": 0, "failed": 0}  # the startup restore, for STATUS
        self._restore_lock = threading.Lock()
        self._restore_said = 0.0
        self._restoring = False  # the startup restore runs: it must move (the start's timeout)
        self._remote_said = -1e9
        self._ledger_logged: dict[str, float] = {}
        self._next_rescan: float | None = None
        self._next_status = 0.0
        self.lister: threading.Thread | None = None
        self.events: EventConsumer | None = None  # events_queue: S3 notifications through SQS
        self._listed_before_ready: set[str] = set()

    # --- requests from other threads -------------------------------------------------------
    def request_rescan(self, reason: str, *, asked: bool = False) -> None:
        """`asked`: an operator's request (SIGHUP, the page's button) is INFO; any other reason
        is something that went wrong (WARNING), and only that belongs in `journalctl -p warning`."""
        with self._rescan_lock:
            if self._rescan_reason is None:
                log.log(logging.INFO if asked else logging.WARNING, "full rescan requested: %s", reason)
                self._rescan_reason = reason

    # --- health (for /healthz and the systemd watchdog) ------------------------------------
    def health(self) -> tuple[bool, str]:
        now = time.time()
        if self.phase == "stopping":
            return False, "stopping"
        if self.start_failure is not None:
            return False, self.start_failure  # the ledger cannot be opened yet (SPEC §4.11)
        if self.ledger is not None and self.ledger.failure:
            return False, self.ledger.failure  # SPEC §4.11: 503 while the ledger cannot be written
        if self.phase == "starting":
            return False, "starting: " + self._starting()
        if self.watcher is None or not self.watcher.alive():
            return False, "watcher is down"
        if self.watcher.down:
            return False, "; ".join(self.watcher.down.values())
        assert self.ledger is not None and self.engine is not None
        paused = self.engine.guard.health()
        if paused:
            return False, paused
        stats = self.engine.stats
        if stats.remote_fail_since and now - stats.remote_fail_since > self.cfg.max_backlog_age:
            return False, (f"remote failing for {now - stats.remote_fail_since:.0f}s: "
                           f"{stats.last_remote_error}")
        lazy = self.lazy if self.lazy is not None and self.lazy.running() else None
        # a restore behind READY is progress, not a backlog: it shows as "restoring N"
        oldest_of = (lambda p: oldest_upload(self.ledger, p)) if lazy else self.ledger.oldest_pending
        oldest = [t for w in self.cfg.watches if (t := oldest_of(w.prefix)) is not None]
        if oldest and now - min(oldest) > self.cfg.max_backlog_age:
            return False, f"a pending file has waited {now - min(oldest):.0f}s (max_backlog_age)"
        failed = self.restores_failed()
        if failed:
            # 200: syncd works and watches; the files that failed are per-file failures (as in
            # `resync`, exit 1), retried at the cap and listed by `status` (README: Health)
            return True, f"ok ({failed} of {self._restore['total']} startup restores failed; see `syncd status`)"
        if lazy is not None and (n := lazy.remaining()):
            return True, f"ok (restoring {n})"
        if self.events is not None and self.events.error:
            # 200: the periodic listing still converges; a restart would not mend a queue
            return True, f"ok (events queue failing: {self.events.error})"
        return True, "ok"

    def _starting(self) -> str:
        """What the startup waits for, with the cause of a failing remote (SPEC §3: visible)."""
        stats = self.engine.stats if self.engine is not None else None
        if stats is not None and stats.remote_fail_since is not None and self.waiting_on:
            return f"{self.waiting_on}: {stats.last_remote_error}"
        r = self._restore
        if r["total"]:
            return f"restoring {min(r['done'], r['total'])}/{r['total']}"
        return "startup restore running"

    def restores_failed(self) -> int:
        """Startup restores that failed and still are (an operator's fix and retry clears them)."""
        n = self._restore["failed"]
        if not n or self.ledger is None:
            return 0
        return min(n, self.ledger.query("SELECT count(*) AS n FROM files WHERE state='failed'")[0]["n"])

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
        self.notifier.keep_starting(self._startup_progress)  # a finite TimeoutStartSec, pushed back
        lock = LedgerLock(self.cfg.ledger)
        try:
            opened = self._open_ledger(lock)
        except BaseException:
            self._stop_hooks()
            self.notifier.close()
            raise
        if not opened:  # stopped while the ledger could not be written
            self._stop_hooks()
            self.notifier.close()
            return 0
        assert self.ledger is not None
        try:
            try:
                return self._run()
            finally:
                self.ledger.close()
        finally:
            lock.release()

    def _stop_hooks(self) -> None:
        for h in self.hooks:
            h.stop()

    def _open_ledger(self, lock: LedgerLock) -> bool:
        """Take the ledger's lock and open it. One that cannot be written (a full disk, a read-only
        directory or lock file: LedgerUnwritable) is reported, one error line and `/healthz` 503
        with the reason, and tried again until it works (SPEC §4.11: `run` retries); a corrupt
        ledger or one another syncd holds exits 2. False when a stop came first."""
        failures = 0
        while True:
            try:
                lock.acquire("run")
                try:
                    self.ledger = Ledger(self.cfg.ledger, config=self.cfg.path)
                except BaseException:
                    lock.release()
                    raise
                if failures:
                    log.info("ledger %s can be written again; starting", self.cfg.ledger)
                self.start_failure = None
                return True
            except LedgerUnwritable as e:
                failures += 1
                if self.start_failure != str(e):
                    log.error("%s; retrying until it can be written", e)
                self.start_failure = str(e)
                self.notifier.status(f"waiting for the ledger: {e}")
                for h in self.hooks:
                    if getattr(h, "before_ledger", False):
                        h.start(self)  # /healthz answers 503 with the reason meanwhile
            # the ledger is local: trying it again costs nothing, and a fixed disk should not wait long
            if self.stop.wait(min(backoff(failures), LEDGER_RETRY_MAX)):
                return False

    def _run(self) -> int:
        assert self.ledger is not None
        cfg, ledger = self.cfg, self.ledger
        remote = open_remote(cfg)
        self.engine = engine = Engine(cfg, ledger, remote, oneshot=False, stop=self.stop)
        engine.transfers.delete_gate = engine.guard.allowed
        engine.stats.on_remote = self._remote_changed
        ledger.set_meta("ready", "0")
        ledger.set_meta("startup_restore", None)  # of the previous start
        ledger.set_meta("remote_error", None)
        engine.prepare()
        ledger.recover()
        for h in self.hooks:
            h.start(self)
        self.notifier.start_watchdog(self.loop_alive)
        self.watcher = Watcher(cfg, ledger, request_rescan=self.request_rescan, wake=engine.wake,
                               closes=engine.closes)
        self.watcher.start()
        self.working = True  # waiting for the remote and restoring are progress, not a stuck loop
        try:
            self.notifier.status("waiting for the remote")
            if not self._wait_for_remote(engine):
                return 0
            self.notifier.status("restoring missing files")
            if not self._plan(engine):
                return 0
            if cfg.lazy_restore:  # READY now; the restores drain behind it (syncd.lazy)
                self.lazy = LazyRestore(engine, cfg.workers, self.stop)
            elif not self._restore_missing(engine):
                return 0
            self.working = False
            self.tick = time.monotonic()
            if self.stop.is_set():
                return 0
            if self.lazy is None:  # lazy: the startup reconcile ends when its restore has drained
                self._reconciled(engine)
            else:  # before READY, so that /healthz never says plain "ok" while it is to come
                self.lazy.start()
            self.phase = "running"
            ledger.set_meta("ready", "1")
            self.notifier.ready(self._status_line())
            failed = self._restore["failed"]
            log.log(logging.WARNING if failed else logging.INFO,
                    "ready: %d files restored%s; watching %s", engine.stats.restored,
                    f", {failed} failed (see `syncd status`)" if failed else "",
                    ", ".join(str(w.path) for w in cfg.watches))
            # what the app just closed first (SPEC §4.1)
            self.pool = WorkerPool(ledger, engine.transfers.handle, cfg.workers, stop=self.stop, wake=engine.wake,
                                   fresh=FRESH, per_worker=per_worker(engine.remote))
            self.pool.start(self._ops())
            self.lister = threading.Thread(target=self._list_remote, args=(engine,), name="syncd-listing",
                                           daemon=True)
            self.lister.start()
            if cfg.remote.events_queue:  # remote changes within seconds (SPEC §2; syncd.events)
                from syncd import events

                self.events = events.start(cfg, ledger, engine, self.stop)
            self._supervise()
            return 0
        finally:
            self._shutdown(remote)

    def _wait_for_remote(self, engine: Engine) -> bool:
        """Probe until the remote works. After its first failure the watches are scanned once
        (the plan scans again): the backlog `status` and the page show then counts the files
        waiting for the remote, instead of 0 on a first start."""
        scanned = threading.Event()

        def scan_once() -> None:
            if not scanned.is_set():
                scanned.set()
                self._scan_while_waiting(engine)

        return self._until_remote_works(engine, engine.probe, "remote not usable", after_failure=scan_once)

    def _scan_while_waiting(self, engine: Engine) -> None:
        try:
            unless_stopped(engine.scan_watches, self.stop, on_end=self._close_thread)
        except LedgerError as e:
            self._ledger_failed(e)
        except OSError as e:  # the plan's own scan meets it again and says so
            log.warning("scan while the remote fails: %s", e)

    def _plan(self, engine: Engine) -> bool:
        """The startup plan; a remote that refuses the listing (denied, credentials) is reported
        and retried like any remote problem: `run` never exits because of the remote."""
        self._listed_before_ready = {w.prefix for w in self.cfg.watches if engine.never_listed(w)}
        return self._until_remote_works(engine, lambda: engine.plan(restore=True, list_remote=False),
                                        "remote listing failing")

    def _list_remote(self, engine: Engine) -> None:
        """The listing thread: right after READY (watches not listed before it), then every
        `remote_rescan_interval` (0: at start only). A failure is reported (once per cause,
        then counted) and retried with backoff; it never ends the daemon."""
        skip = set(self._listed_before_ready)
        engine.abort_stale_uploads()  # after READY: one request, off the start's path

        def one_round() -> None:
            for w in self.cfg.watches:
                if w.prefix in skip:
                    continue
                engine.listing(w)
                if self.stop.is_set():
                    return
                skip.add(w.prefix)  # listed: not again after a failure of another watch

        try:
            while self._until_remote_works(engine, one_round, "remote listing failed", startup=False):
                skip.clear()
                if not self.cfg.remote_rescan_interval:
                    return
                self.stop.wait(self.cfg.remote_rescan_interval)
        finally:
            self._close_thread()

    def _restore_missing(self, engine: Engine) -> bool:
        """The startup restore, with its progress in STATUS= and /healthz (`restoring 812/2000`)."""
        total = engine.outstanding(RESTORE_OPS)
        if total:
            log.info("restoring %d missing files", total)
        failed_before = engine.stats.failed
        self._restore.update(total=total, done=0, failed=0)
        engine.on_progress = self._restored
        self._restoring = True
        try:
            done = self._until_ledger_works(lambda: engine.drain(RESTORE_OPS))
        finally:
            engine.on_progress = None
            self._restoring = False
        # rows the startup restore left failed (per-file: denied, gone, checksum, local disk)
        self._restore["failed"] = engine.stats.failed - failed_before
        if total:
            self._record_restore(engine)
        return done

    def _restored(self, n: int) -> None:
        """A worker finished a restore (called from worker threads): STATUS at most once a second."""
        with self._restore_lock:
            self._restore["done"] += n
            now = time.monotonic()
            if now - self._restore_said < 1.0:
                return
            self._restore_said = now
            text = f"restoring {min(self._restore['done'], self._restore['total'])}/{self._restore['total']}"
        self.notifier.status(text)

    def _startup_progress(self) -> object:
        """For the start's timeout: being alive is progress while the startup waits for the ledger
        or the remote (retried) and scans; the restore must move (files done, bytes written)."""
        return (self._restore["done"], restored_bytes()) if self._restoring else None

    def _record_restore(self, engine: Engine) -> None:
        r = self._restore
        try:
            self.ledger.set_meta("startup_restore", json.dumps(  # type: ignore[union-attr]
                {"total": r["total"], "restored": engine.stats.restored, "failed": r["failed"], "at": time.time()}))
        except LedgerError as e:
            log.error("%s", e)

    def _status_line(self) -> str:
        """The systemd STATUS= line while watching."""
        assert self.engine is not None
        text = f"watching; backlog {self.engine.outstanding(UPLOAD_OPS)}"
        if self.lazy is not None and self.lazy.running():
            text += f"; restoring {self.lazy.remaining()} behind READY"
        failed = self.restores_failed()
        if failed:
            text += f"; {failed} of {self._restore['total']} startup restores failed (see syncd status)"
        if self.ledger is not None and self.ledger.failure:
            text += "; ledger cannot be written"
        return text

    def _remote_changed(self, cause: str | None, since: float | None) -> None:
        """Keep the remote's current failure in the ledger, for `status` from any process (at
        most every 10 s while it fails: causes name files, and change from one to the next)."""
        now = time.monotonic()
        if cause is not None and now - self._remote_said < 10:
            return
        self._remote_said = now if cause is not None else -1e9
        try:
            assert self.ledger is not None
            self.ledger.set_meta("remote_error", json.dumps({"error": cause, "since": since}) if cause else None)
        except LedgerError:
            pass  # said by /healthz and the log already

    def _until_remote_works(self, engine: Engine, step: Callable[[], object], what: str, *,
                            startup: bool = True, after_failure: Callable[[], None] | None = None) -> bool:
        """Run `step` until it gets past the remote, reporting each failure (once per cause,
        then counted) and backing off; False when stopped first. A `startup` step is what
        /healthz says READY waits for, and a SIGTERM does not wait for its request; a later one
        (the listing thread) survives any error, to try again at the next backoff.
        `after_failure` runs after each reported remote failure."""
        attempt = 0
        if startup:
            self.waiting_on = what
        try:
            while not self.stop.is_set():
                try:
                    if not startup:
                        step()
                    elif not unless_stopped(step, self.stop, on_end=self._close_thread):
                        return False
                except (RemoteError, RemoteUnavailable) as e:
                    # at startup the whole line with its hint; later, the request's own error
                    err = e.__cause__ if isinstance(e, RemoteUnavailable) and not startup else e
                    cause = err.cause if isinstance(err, RemoteError) else str(e)
                    engine.stats.remote_failed(cause)
                    engine.causes.report(f"{what}: {cause}", engine.remote.name, logging.ERROR)
                    if after_failure is not None:
                        after_failure()
                except LedgerError as e:
                    self._ledger_failed(e)
                except Exception:  # noqa: BLE001 - see below
                    if startup:
                        raise
                    log.exception(what)  # a bug: said in full; the thread lives on
                else:
                    if startup or attempt:  # a listing does not vouch for what the workers meet
                        engine.stats.remote_ok()
                    if attempt:
                        log.info("remote %s is reachable again", engine.remote.name)
                        engine.causes.clear()
                    return not self.stop.is_set()
                attempt += 1
                self.stop.wait(backoff(attempt))
            return False
        finally:
            if startup:
                self.waiting_on = ""

    def _close_thread(self) -> None:
        if self.ledger is not None:
            self.ledger.close_thread()

    def _until_ledger_works(self, step: Callable[[], object]) -> bool:
        """Run `step` until the ledger takes its writes (SPEC §4.11: `run` retries); False when
        stopped first."""
        attempt = 0
        while not self.stop.is_set():
            try:
                step()
                return not self.stop.is_set()
            except LedgerError as e:
                attempt += 1
                self._ledger_failed(e)
                self.stop.wait(backoff(attempt))
        return False

    def _ledger_failed(self, e: LedgerError) -> None:
        """One line per cause a minute (the watcher, workers and rescans meet the same disk)."""
        now = time.monotonic()
        if self._ledger_logged.get(str(e), -1e9) > now - 60:
            return
        self._ledger_logged[str(e)] = now
        log.error("%s (retrying; /healthz is 503 until it works)", e)

    def _ops(self) -> tuple[str, ...]:
        assert self.ledger is not None
        ops: tuple[str, ...] = NO_DELETE_OPS if self.ledger.get_meta("deletes_paused") else ALL_OPS
        if self.lazy is not None and self.lazy.running():  # restores are the lazy pool's meanwhile
            ops = tuple(op for op in ops if op not in RESTORE_OPS)
        return ops

    def _supervise(self) -> None:
        assert self.ledger is not None and self.engine is not None and self.pool is not None
        self._next_rescan = time.monotonic() + self.cfg.rescan_interval if self.cfg.rescan_interval else None
        self._next_status = 0.0
        attempt, next_try = 0, 0.0
        while not self.stop.wait(TICK):
            self.tick = time.monotonic()
            try:
                if self.ledger.failure:  # nothing but a check now and then until it is writable
                    if self.tick >= next_try:
                        self._ledger_check()
                    if self.ledger.failure:
                        self._say_status()
                        continue
                self._supervise_tick()
                attempt = 0
            except LedgerError as e:  # SPEC §4.11: reported (/healthz 503, log) and retried
                attempt += 1
                next_try = self.tick + backoff(attempt)
                self._ledger_failed(e)

    def _ledger_check(self) -> None:
        """A small write: when it works again, rescan for what the watcher could not record."""
        assert self.ledger is not None
        self.ledger.set_meta("ledger_checked_at", str(time.time()))
        if not self.ledger.failure:
            log.warning("ledger %s can be written again; rescanning for changes it missed", self.ledger.path)
            self.request_rescan("the ledger could not be written")

    def _supervise_tick(self) -> None:
        assert self.ledger is not None and self.engine is not None and self.pool is not None
        assert self.watcher is not None
        if not self.watcher.alive():
            log.error("watcher stopped; restarting it and rescanning")
            self.watcher.stop()
            self.watcher = Watcher(self.cfg, self.ledger, request_rescan=self.request_rescan,
                                   wake=self.engine.wake, closes=self.engine.closes)
            self.watcher.start()
            self.request_rescan("watcher restarted")
        with self._rescan_lock:
            reason, self._rescan_reason = self._rescan_reason, None
        if reason is None and self._next_rescan is not None and time.monotonic() >= self._next_rescan:
            reason = "periodic"
        if reason is not None:
            try:
                self.rescan(reason)
            except LedgerError:
                with self._rescan_lock:  # done again once the ledger can be written
                    self._rescan_reason = self._rescan_reason or reason
                raise
            if self._next_rescan is not None:
                self._next_rescan = time.monotonic() + self.cfg.rescan_interval
        self.engine.guard.check_rate()
        if self.lazy is not None and self.lazy.finished():
            self._reconciled(self.engine)
        ops = self._ops()
        if ops != self.pool.ops:
            self.pool.set_ops(ops)
        self._say_status()

    def _say_status(self) -> None:
        if self.tick >= self._next_status:
            self._next_status = self.tick + 5
            self.notifier.status(self._status_line())

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
            self.engine.guard.after_rescan(w.prefix, stats.deletions if w.on_delete != "keep" else 0)
        self.engine.wake.set()
        self._reconciled(self.engine, ok)

    def deletes_allowed(self) -> bool:
        """Asked by a worker before each deletion (`syncd.guard`: the max_deletes cap)."""
        assert self.engine is not None
        return self.engine.guard.allowed()

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
        if self.lazy is not None and not self.lazy.join(timeout=max(0.0, deadline - time.monotonic() - 1)):
            clean = False
            log.warning("transfers still running at stop; aborting them (they are retried at next start)")
        if self.lister is not None:
            self.lister.join(timeout=max(0.0, deadline - time.monotonic()))
        if self.events is not None:  # a message it had not applied comes back to the next start
            self.events.join(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
        if self.watcher is not None:
            self.watcher.stop()
        self._stop_hooks()
        assert self.ledger is not None
        try:
            self.ledger.recover_after_failure()  # no row is left `uploading` (SPEC §4.10)
            self.ledger.set_meta("ready", None)
            self.ledger.set_meta("remote_error", None)
        except LedgerError as e:  # the next start's recover releases them
            log.error("%s", e)
        if not clean:
            remove_live_temps()
        self.notifier.close()
        if clean:  # closing waits for in-flight transfers; after a timeout the exit aborts them
            remote.close()
        log.info("stopped")
