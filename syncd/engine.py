"""Reconcile: check remote -> restore missing -> upload what changed (SPEC §3 `run`, `resync`).

`resync` calls `Engine.reconcile` once; the daemon calls the same steps at startup and then
keeps the worker pool running. There is no second implementation. Comparing with the remote is
`Engine.listing`, one pass of `syncd.reconcile` per watch: `resync`, `restore`, the daemon's
listings and the rebuild of a lost ledger all use it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from syncd.closes import Closes
from syncd.config import Config, WatchConfig
from syncd.errors import ConfigError, Interrupted, LedgerError, RemoteUnavailable
from syncd.fsutil import make_dirs
from syncd.guard import DeleteGuard
from syncd.interrupt import unless_stopped
from syncd.keys import join_key
from syncd.lane import per_worker
from syncd.ledger import Ledger, Row
from syncd.logs import CauseLog
from syncd.pool import Wake, WorkerPool
from syncd.reconcile import Listing, Options, Result, cancel_held, remote_files
from syncd.remote import remote_identity
from syncd.remote.base import (
    CREDENTIALS,
    DENIED,
    NO_BUCKET,
    UNREACHABLE,
    Interruptible,
    OpenUploads,
    Remote,
    RemoteError,
)
from syncd.restore import remove_live_temps
from syncd.retry import call as retry_call
from syncd.scanner import PlanHook, Scanner, ScanStats
from syncd.transfers import Stats, Transfers

log = logging.getLogger(__name__)
UPLOAD_OPS = ("put", "delete", "trash", "tomb")
RESTORE_OPS = ("get",)
LOCAL_DELETE_OPS = ("unlink",)  # shared watches: files deleted remotely (SPEC §4.12)
# a multipart upload this old under a shared watch is no other host's upload under way: a day is
# far beyond any one file's upload, and well within a usual lifecycle rule's days
SHARED_STALE_AFTER = 24 * 3600.0
__all__ = ["Engine", "Summary", "remote_files", "unavailable"]


@dataclass
class Summary:
    uploaded: int = 0
    restored: int = 0
    unchanged: int = 0
    failed: int = 0
    would_upload: int = 0
    would_restore: int = 0
    would_delete: int = 0
    dry_run: bool = False
    failures: list[tuple[str, str]] = field(default_factory=list)

    def line(self) -> str:
        if self.dry_run:
            deletes = f"would delete {self.would_delete}, " if self.would_delete else ""
            return (f"dry run: would upload {self.would_upload}, would restore {self.would_restore}, "
                    f"{deletes}unchanged {self.unchanged}, failed {self.failed}")
        return (f"uploaded {self.uploaded}, restored {self.restored}, unchanged {self.unchanged}, "
                f"failed {self.failed}")


def unavailable(remote: Remote, err: RemoteError) -> RemoteUnavailable:
    """The one-line message for a remote that cannot be used at all, with what to do."""
    if remote.name.startswith("file://"):
        return RemoteUnavailable(
            f"remote {remote.name} cannot be used: {err}; check that syncd's user can create and "
            f"write that directory (under systemd, list it in ReadWritePaths=)")
    hint = {
        UNREACHABLE: "check remote.endpoint_url and the network",
        CREDENTIALS: "check the AWS credentials (environment, remote.profile, instance role)",
        NO_BUCKET: "create the bucket or fix remote.url",
        DENIED: "grant the missing permission (see `syncd check` and `syncd iam-policy`)",
    }.get(err.kind, "see `syncd check`")
    return RemoteUnavailable(f"remote {remote.name} cannot be used: {err}; {hint}")


class Engine:
    def __init__(self, cfg: Config, ledger: Ledger, remote: Remote, *, oneshot: bool = True,
                 stop: threading.Event | None = None, overwrite: bool = False,
                 on_progress: Callable[[int], None] | None = None,
                 on_plan: Callable[[str, str], None] | None = None) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.remote = remote
        self.oneshot = oneshot
        self.stop = stop or threading.Event()
        self.stats = Stats()
        self.causes = CauseLog(log)
        self.closes = Closes()  # files their writer closed: the watcher records, workers read
        self.transfers = Transfers(cfg, ledger, remote, self.stats, self.causes, oneshot=oneshot,
                                   overwrite=overwrite, closes=self.closes)
        self.on_progress = on_progress
        self.on_plan = on_plan  # (kind, "watch/path"): told every file a dry run would transfer
        self.plan_kinds = {"upload", "restore", "delete"}
        self.refused: list[tuple[str, str]] = []
        self.scans: dict[str, ScanStats] = {}
        self.reuploads = 0  # synced files whose object `--verify` found missing or different
        self.listings: dict[str, Result] = {}
        self.guard = DeleteGuard(cfg, ledger)  # the mass-deletion guard every deletion asks
        self.wake = Wake()
        self._held: list[int] = []
        self.done = 0  # rows the workers finished (the progress bar's count)
        self._done_lock = threading.Lock()
        self.restoring: WorkerPool | None = None  # restores working while the plan lists
        if isinstance(remote, Interruptible):  # a stop aborts a multipart upload under way
            remote.interrupt_on(self.stop)

    # --- steps ----------------------------------------------------------------------------
    def prepare(self, *, create: bool = True) -> None:
        for w in self.cfg.watches:
            if create:
                # a fresh container starts without its upload directory (SPEC §2)
                try:
                    make_dirs(w.path)
                except OSError as e:  # a setup error, not a crash (a hardened unit's read-only /srv)
                    raise ConfigError(
                        f"watch {w.prefix}: {w.path} is missing and cannot be created: {e.strerror or e}; "
                        f"create it for syncd's user (under systemd before the unit starts: "
                        f"packaging/systemd/README.md)") from e
                self.ledger.ensure_watch(w.prefix, str(w.path))
        if create:
            self.adopt_remote()
        else:  # a dry run changes nothing, but says what the run would see
            old = self.ledger.get_meta("remote")
            if old is not None and old != remote_identity(self.cfg.remote):
                log.warning("the ledger describes remote %s, the config names %s: a real run treats it as a "
                            "new remote and compares every file with it", old, remote_identity(self.cfg.remote))

    def adopt_remote(self) -> None:
        """The ledger describes the configured remote; another one (a changed url or endpoint) is a
        new remote: listed, compared and uploaded to as if the ledger had never seen it."""
        identity = remote_identity(self.cfg.remote)
        changed = self.ledger.describe_remote(identity, {w.prefix: self.key_base(w) for w in self.cfg.watches})
        if changed is not None:
            old, requeued = changed
            log.warning("the ledger described remote %s, the config names %s: a new remote; listing it, "
                        "and comparing %d synced files with it (uploaded where missing or different)",
                        old, identity, requeued)

    def probe(self) -> None:
        """List (one key) under every watch's prefix: what syncd needs, as its IAM policy allows."""
        for w in self.cfg.watches:
            base = self.key_base(w)
            self.remote.probe(base + "/" if base else "")

    def abort_stale_uploads(self) -> None:
        """Abort the multipart uploads a killed syncd left open under the watches (`run`, at
        start). A `backup` watch has no other writer: every upload there is stale but this
        process's own under way (the remote skips them). A `shared` watch's other hosts may be
        uploading there: only uploads older than SHARED_STALE_AFTER are (SPEC §4.10, §4.12)."""
        if isinstance(self.remote, OpenUploads):
            self.remote.abort_stale_uploads({self.key_base(w): SHARED_STALE_AFTER if w.mode == "shared" else 0.0
                                             for w in self.cfg.watches}, ours=self._knows_key)

    def _knows_key(self, key: str) -> bool:
        """A key of a file this host's ledger knows: its upload may be one a kill cut off. Another
        tool's upload under way to a new key (an operator's `aws s3 cp`) is left alone."""
        for w in self.cfg.watches:
            base = self.key_base(w)
            if key.startswith(base + "/" if base else ""):
                return self.ledger.get(w.prefix, key[len(base) + 1 if base else 0:]) is not None
        return False

    def check_remote(self, *, forever: bool = False) -> None:
        """Probe the remote. One-shot: transient errors are retried a few times, then exit 3."""
        try:
            retry_call(self.probe, forever=forever, stop_event=self.stop)
        except RemoteError as e:
            raise unavailable(self.remote, e) from e

    def key_base(self, watch: WatchConfig) -> str:
        return join_key(self.cfg.remote.prefix, watch.prefix)

    def planned(self, kind: str, watch: str, rel: str) -> None:
        """One file the plan would transfer: `kind` is "upload", "restore" or "delete". The scan
        and the remote listing call it for each decision, so a dry run names every file."""
        if self.on_plan is not None and kind in self.plan_kinds:
            self.on_plan(kind, join_key(watch, rel))

    def _plan_hook(self) -> PlanHook | None:
        return self.planned if self.on_plan is not None else None

    def scan(self, watch: WatchConfig, *, missing: str, retry_failed: bool = False,
             dry_run: bool = False) -> ScanStats:
        if not watch.path.is_dir():
            return ScanStats()
        t0 = time.monotonic()
        stats = Scanner(self.ledger, watch, self.cfg.remote.prefix, settle=self.cfg.settle_seconds,
                        missing=missing, retry_failed=retry_failed, dry_run=dry_run, clean_temps=True,
                        on_plan=self._plan_hook()).run()
        self.scans[watch.prefix] = stats
        log.info("scanned %s: %d files (%d new, %d changed, %d unchanged), %d missing to restore, %.2fs",
                 watch.prefix or watch.path, stats.files, stats.new, stats.changed, stats.unchanged,
                 stats.to_restore, time.monotonic() - t0)
        return stats

    def listing(self, watch: WatchConfig, *, sync: bool = True, globs: Iterable[str] = (),
                include_tombstones: bool = False, overwrite: bool = False, dry_run: bool = False,
                restore: bool = True) -> int:
        """Reconcile the watch with a listing of the remote (`syncd.reconcile`). Each page of it
        is retried under the retry policy (`reconcile.resumable`, the one retry layer here): a
        transient error retries that page, not the whole listing, and is reported
        (`listing_failed`). One-shot commands give up after a few failures in a row with exit 3;
        the daemon retries until it is stopped (then returns 0). Returns the restores queued; a
        complete listing is recorded as the watch's last listing (`watches.listed_at`)."""
        mark = len(self.refused)
        opts = Options(sync=sync, restore=restore, dry_run=dry_run, globs=tuple(globs),
                       include_tombstones=include_tombstones, overwrite=overwrite)
        try:
            res = Listing(self.cfg, self.ledger, self.remote, watch, opts,
                          guard=self.guard, stop=self.stop,
                          report_refused=None if self.oneshot else self._report_refused,
                          on_plan=self._plan_hook(), forever=not self.oneshot,
                          on_retry=self.listing_failed, on_flush=self.wake.set).run()
        except RemoteError as e:
            if self.stop.is_set():
                return 0
            raise unavailable(self.remote, e) from e
        self.refused += res.refused
        if not self.oneshot:
            del self.refused[mark:]  # reported (rate-limited) already; a daemon lists again and again
        if not res.complete:
            return res.restores
        self.stats.remote_ok()
        self.listings[watch.prefix] = res
        if sync and not dry_run:
            self.ledger.set_watch(watch.prefix, listed_at=time.time())
        if res.restores or res.replaces or res.uploads or res.local_deletes:
            log.info("listing of %s: %d objects; queued %d restores, %d replaces, %d uploads, %d local "
                     "deletions", watch.prefix or self.remote.name, res.objects, res.restores, res.replaces,
                     res.uploads, res.local_deletes)
        self.wake.set()
        return res.restores

    def listing_failed(self, err: BaseException) -> None:
        """A listing failure about to be retried: logged (once per cause, then counted), and
        the cause kept for /healthz and `status` (SPEC §3: `run` reports what it retries)."""
        cause = err.cause if isinstance(err, RemoteError) else f"{type(err).__name__}: {err}"
        self.stats.remote_failed(cause)
        self.causes.report(f"remote listing failing (retrying): {cause}", self.remote.name)

    def _report_refused(self, key: str, why: str) -> None:
        """The daemon lists again and again: a hostile key is logged once, then counted."""
        self.causes.report(f"refusing remote key {key!r}: {why}", self.remote.name, logging.ERROR)

    def verify(self, watch: WatchConfig, *, dry_run: bool = False) -> int:
        """HEAD every synced object; queue a re-upload for any missing or different one."""
        bad: list[int] = []
        lock = threading.Lock()

        listed = self.listings.get(watch.prefix)
        already = listed.dry_uploads if listed is not None else set()  # named by the listing already

        def check(row: Row) -> None:
            if row["path"] in already:
                return
            info = retry_call(lambda: self.remote.head(row["key"]), forever=not self.oneshot,
                              stop_event=self.stop)
            if info is None or info.sha256 != row["remote_sha256"]:
                with lock:
                    bad.append(row["id"])
                    self.planned("upload", watch.prefix, row["path"])

        try:
            with ThreadPoolExecutor(self.cfg.workers) as ex:
                for _ in ex.map(check, self.ledger.iter_rows(watch.prefix, "state='synced'")):
                    pass
        except RemoteError as e:
            raise unavailable(self.remote, e) from e
        if bad and not dry_run:
            now = time.time()
            with self.ledger.write() as w:
                w.conn.executemany("UPDATE files SET state='pending', op='put', remote_sha256=NULL, probe=0, "
                              "due_at=?, queued_at=?, gen=gen+1 WHERE id=?", [(now, now, i) for i in bad])
        return len(bad)

    def _pool(self) -> WorkerPool:
        def done(_row: Row) -> None:
            with self._done_lock:  # workers finish at once: += is not atomic
                self.done += 1
            if self.on_progress is not None:
                self.on_progress(1)

        return WorkerPool(self.ledger, self.transfers.handle, self.cfg.workers, stop=self.stop, wake=self.wake,
                          on_done=done, per_worker=per_worker(self.remote))

    def drain(self, ops: tuple[str, ...], *, pool: WorkerPool | None = None) -> None:
        """Work through the queue for `ops` (with `pool` when one works on them already). A
        ledger that cannot be written stops it (LedgerError, SPEC §4.11); a one-shot command
        stopped by a signal stops cleanly and raises Interrupted (SPEC §4.10)."""
        if self._held:  # rows a drain stopped by the ledger could not give back (`run` retries)
            self.ledger.release(self._held)
            self._held = []
        started = pool is not None
        pool = pool or self._pool()
        try:
            if started:
                pool.finish()
            else:
                pool.run(ops)
        except LedgerError:
            self._release_claims(pool.unfinished())
            raise
        if not pool.join(0):
            remove_live_temps()  # transfers that did not finish in time: no temp stays behind
        self.check_stop()

    def _release_claims(self, ids: list[int]) -> None:
        """After the ledger failed mid-drain: give back the rows workers still hold, if the
        ledger takes that write (the next start's `recover` does otherwise)."""
        try:
            if self.oneshot:
                self.ledger.recover_after_failure()  # this process holds the lock; its workers ended
            else:
                self.ledger.release(ids)
        except LedgerError:
            log.debug("could not release claimed rows", exc_info=True)
            self._held += ids  # claimed rows are never taken again: released before the next drain

    def check_stop(self, *, dry_run: bool = False) -> None:
        """One-shot commands: after SIGINT/SIGTERM, no row stays claimed or `uploading`, no
        restore temp stays behind, and the command exits 130 (SPEC §3, §4.10)."""
        if not (self.oneshot and self.stop.is_set()):
            return
        if not dry_run:
            self.ledger.recover()
        remove_live_temps()
        left = self.ledger.outstanding(RESTORE_OPS + UPLOAD_OPS)
        raise Interrupted(f"interrupted; {left} files are still queued for the next `syncd resync` or `syncd run`")

    def outstanding(self, ops: tuple[str, ...]) -> int:
        return self.ledger.outstanding(ops)

    # --- the whole startup sequence ---------------------------------------------------------
    def never_listed(self, watch: WatchConfig) -> bool:
        rows = self.ledger.query("SELECT listed_at FROM watches WHERE prefix=?", [watch.prefix])
        return not rows or rows[0]["listed_at"] is None

    def scan_watches(self, *, restore: bool = True, dry_run: bool = False) -> None:
        """The local half of the plan: every watch compared with the ledger; no remote needed."""
        self.prepare(create=not dry_run)
        if not dry_run:
            self.ledger.recover()
            # not those remote deletion events paused: they wait for this watch's listing
            cancel_held(self.ledger, paused=False)
        for w in self.cfg.watches:
            self.scan(w, missing="restore" if restore else "ignore", retry_failed=True, dry_run=dry_run)

    def plan(self, *, restore: bool = True, verify: bool = False, dry_run: bool = False,
             list_remote: bool = True, restore_meanwhile: bool = False) -> int:
        """Compare every watch with the ledger and with a listing of the remote, and queue the
        work. `list_remote=False` (the daemon's fast start) lists only watches whose ledger has
        never listed the remote (a new or lost ledger): the others are listed after READY.
        Returns the restores found in listings."""
        self.scan_watches(restore=restore, dry_run=dry_run)
        if restore_meanwhile and restore and not dry_run:
            # restores need no listing to end: they start on the first rows queued (a listing of a
            # large prefix takes seconds where S3 is far); not before the scans, which remove the
            # temp files of restores a killed process left. `reconcile` ends them.
            self.restoring = self._pool()
            self.restoring.start(RESTORE_OPS, drain=True, filling=True)
        from_listing = 0
        for w in self.cfg.watches:
            if list_remote or self.never_listed(w):
                from_listing += self.listing(w, dry_run=dry_run, restore=restore and w.restore)
                if self.stop.is_set():
                    return from_listing  # not listed to the end: listed again at the next start
            if verify:
                self.reuploads += self.verify(w, dry_run=dry_run)
        return from_listing

    def reconcile(self, *, restore: bool = True, upload: bool = True, verify: bool = False,
                  dry_run: bool = False, on_total: Callable[[int], None] | None = None) -> Summary:
        """The one-shot startup: check remote -> restore missing -> upload what changed."""
        # in a thread: SIGTERM while the first request hangs on a stalled endpoint is honoured
        unless_stopped(self.check_remote, self.stop)
        self.check_stop(dry_run=dry_run)
        if not upload:  # --no-upload: queued uploads and deletions wait for the next run
            self.plan_kinds -= {"upload", "delete"}
        try:
            from_listing = self.plan(restore=restore, verify=verify, dry_run=dry_run, restore_meanwhile=True)
        except BaseException:
            self._abandon_restores()
            raise
        if self.stop.is_set():
            self._abandon_restores()
        self.check_stop(dry_run=dry_run)
        summary = Summary(dry_run=dry_run)
        if dry_run:
            listed = self.listings.values()
            if upload:
                summary.would_upload = (self.reuploads + sum(s.new + s.changed for s in self.scans.values())
                                        + sum(r.uploads for r in listed))
                summary.would_delete = (sum(s.to_delete for s in self.scans.values())
                                        + sum(r.local_deletes for r in listed))
            summary.would_restore = (from_listing + sum(r.replaces for r in listed)
                                     + sum(s.to_restore for s in self.scans.values()))
            return self.summarize(summary)
        if on_total:
            on_total(self.done + self.outstanding(RESTORE_OPS) + (self.outstanding(UPLOAD_OPS) if upload else 0))
        if restore:
            pool, self.restoring = self.restoring, None
            self.drain(RESTORE_OPS, pool=pool)
        if not self.ledger.get_meta("deletes_paused"):
            self.drain(LOCAL_DELETE_OPS)
        if upload:
            self.drain(UPLOAD_OPS)
        return self.summarize(summary)

    def _abandon_restores(self) -> None:
        """The plan failed or was stopped: the restores begun meanwhile end (temps removed)."""
        pool, self.restoring = self.restoring, None
        if pool is not None:
            pool.abandon()
            if pool.alive():
                remove_live_temps()

    def summarize(self, summary: Summary) -> Summary:
        summary.uploaded = self.stats.uploaded
        summary.restored = self.stats.restored
        summary.unchanged = sum(s.unchanged for s in self.scans.values()) + self.stats.already_remote
        failed_rows = self.ledger.query(
            "SELECT watch, path, last_error FROM files WHERE state='failed' ORDER BY updated_at DESC LIMIT 50")
        total_failed = self.ledger.query("SELECT count(*) AS n FROM files WHERE state='failed'")[0]["n"]
        summary.failures = [(f"{r['watch']}/{r['path']}", r["last_error"] or "") for r in failed_rows]
        summary.failures += self.refused[:50]
        summary.failed = total_failed + len(self.refused)
        return summary
