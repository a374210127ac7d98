"""What a worker does with one claimed ledger row: upload, restore, or delete remotely; write a
remote tombstone (`tomb`); delete a local file whose object was deleted remotely (`unlink`).

Every outcome goes back to the ledger through `Ledger.finish`, which only applies it when the
row did not change meanwhile; errors are classified by `syncd.retry` in one place (`handle`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat as st_mod
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client import Histogram

from syncd import fsutil, tombstones
from syncd.closes import Closes
from syncd.config import Config, WatchConfig
from syncd.errors import LedgerError
from syncd.fsutil import SMALL_FILE
from syncd.keys import UnsafeKey, join_key
from syncd.ledger import Ledger, Row
from syncd.logs import CauseLog
from syncd.names import shown
from syncd.remote.base import INTEGRITY, LOCAL, NOT_FOUND, Remote, RemoteError, Stopped
from syncd.restore import CANNOT_RESTORE, Unplaceable, fetch, safe_target
from syncd.retry import decide, may_have_landed

log = logging.getLogger(__name__)
MAX_LISTED_FAILURES = 1000
# a rename's deletion waits this long at most for the upload of the new path to copy from its key
# (a backlog may hold that upload back; then the copy falls back to a full upload)
RENAME_WAIT = 60.0
RENAME_POLL = 0.25
# the loss window's buckets: a closed file lands in the first ones, a settled one around
# settle_seconds (2 s by default), a backlog further up
DELAY_BUCKETS = (0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0, 2.5, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


def delay_histogram() -> Histogram:
    """`syncd_upload_delay_seconds` (SPEC §6), not registered anywhere: the endpoint's collector
    yields it with the run's other figures."""
    return Histogram("syncd_upload_delay_seconds", "From a file's last change seen to its object being "
                     "durable: the window in which losing the host loses the file", buckets=DELAY_BUCKETS,
                     registry=None)


@dataclass
class Stats:
    """Counters of one run (for the summary line and metrics); safe to share between workers."""

    uploaded: int = 0
    upload_bytes: int = 0
    copied: int = 0
    restored: int = 0
    already_remote: int = 0
    deleted: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    last_success: float | None = None  # last transfer that worked (any direction)
    remote_fail_since: float | None = None  # first of the current run of remote-side failures
    last_remote_error: str = ""
    fail_reasons: Counter = field(default_factory=Counter)  # error kind -> failed attempts
    upload_delay: Histogram = field(default_factory=delay_histogram, repr=False)
    # restored | replaced | deleted: local changes made because of the remote (SPEC §6)
    remote_changes: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # told (cause, since) when the remote starts failing or its cause changes, (None, None) when
    # it works again: the daemon records it for `status` (SPEC §3: failures are visible)
    on_remote: Callable[[str | None, float | None], None] | None = field(default=None, repr=False)

    def succeeded(self) -> None:
        with self.lock:
            self.last_success = time.time()
        self.remote_ok()

    def remote_ok(self) -> None:
        with self.lock:
            was, self.remote_fail_since = self.remote_fail_since, None
        if was is not None and self.on_remote is not None:
            self.on_remote(None, None)

    def remote_failed(self, cause: str) -> None:
        with self.lock:
            changed = cause != self.last_remote_error or self.remote_fail_since is None
            self.last_remote_error = cause
            if self.remote_fail_since is None:
                self.remote_fail_since = time.time()
            since = self.remote_fail_since
        if changed and self.on_remote is not None:
            self.on_remote(cause, since)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def fail(self, what: str, why: str) -> None:
        with self.lock:
            self.failed += 1
            if len(self.failures) < MAX_LISTED_FAILURES:
                self.failures.append((what, why))


def trash_key(key_base: str, rel: str, now: float) -> str:
    day = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")
    return join_key(key_base, ".trash", day, rel)


class Transfers:
    def __init__(self, cfg: Config, ledger: Ledger, remote: Remote, stats: Stats, causes: CauseLog, *,
                 oneshot: bool, overwrite: bool = False, closes: Closes | None = None) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.remote = remote
        self.stats = stats
        self.causes = causes
        self.oneshot = oneshot
        self.overwrite = overwrite
        self.copy_limit = int(cfg.remote.multipart_threshold_mb * 1024 * 1024)
        # the daemon's max_deletes cap, asked before each remote deletion (None: no cap)
        self.delete_gate: Callable[[], bool] | None = None
        self._watches = {w.prefix: w for w in cfg.watches}
        # files their writer closed (the watcher records them): uploaded without settling
        self.closes = closes if closes is not None else Closes()
        # ids of rows whose restore runs right now, in a worker or an on-demand request
        # (syncd.lazy.restore_now): one download per row
        self._restoring: set[int] = set()
        self._restoring_lock = threading.Lock()

    def handle(self, row: Row) -> None:
        """Do the row's work; raises only LedgerError (the ledger cannot record any outcome)."""
        watch = self._watches.get(row["watch"])
        if watch is None:  # a watch removed from the config: leave its rows alone
            self.ledger.finish(row, state="pending" if row["state"] == "uploading" else row["state"],
                               due_at=time.time() + 3600)
            return
        op = row["op"]
        try:
            if op == "put":
                self._put(row, watch)
            elif op == "get":
                self._get(row, watch)
            elif op in ("delete", "trash"):
                self._delete(row, watch, op)
            elif op == "tomb":
                self._tomb(row, watch)
            elif op == "unlink":
                self._unlink(row, watch)
            else:
                self.ledger.finish(row)
        except Stopped:  # a stop aborted it: not a failure; queued again as it was (SPEC §4.10)
            self.ledger.finish(row, state="pending" if row["state"] == "uploading" else row["state"])
        except RemoteError as e:
            self._failed(row, e)
        except LedgerError:
            raise  # not this file's failure: the ledger's, which stops the work (SPEC §4.11)
        except Unplaceable as e:
            # a directory has the file's name, or a file the directory's (SPEC §4.14): failed with
            # the reason and still a restore, tried again at the cap (the obstacle may go), which
            # a rescan does not take for a local deletion
            self._failed(row, RemoteError(LOCAL, str(e), code=CANNOT_RESTORE), set_op="get")
        except UnsafeKey as e:
            self._failed(row, RemoteError(LOCAL, str(e), code="UnsafeKey"), requeue=False)
        except OSError as e:
            self._failed(row, RemoteError(LOCAL, f"{e.strerror or e}: {e.filename or row['path']}",
                                          code=type(e).__name__))
        except Exception as e:  # noqa: BLE001 - a bug must not kill the worker; it is recorded
            log.exception("internal error on %s/%s", row["watch"], shown(row["path"]))
            self._failed(row, RemoteError(LOCAL, f"internal error: {type(e).__name__}: {e}", code="Internal"))

    # --- failures -------------------------------------------------------------------------
    def _failed(self, row: Row, err: RemoteError, requeue: bool = True, set_op: str | None = None) -> None:
        """`set_op`: the row's op from now on (a success recorded just before the failure is undone)."""
        now = time.time()
        attempts = row["attempts"] + 1
        op = row["op"]
        if op == "put" and err.kind == INTEGRITY:
            # the file changed while it was read: let it settle again
            self.ledger.finish(row, state="pending", attempts=attempts, due_at=now + self.cfg.settle_seconds,
                               last_error=err.cause, error_kind=err.kind)
            return
        d = decide(err, attempts, oneshot=self.oneshot, op=op)
        state = d.state
        if state == "pending" and op in ("delete", "trash", "tomb", "unlink"):
            state = "deleting"
        fields = {"state": state, "attempts": attempts, "last_error": err.cause, "error_kind": err.kind,
                  "due_at": now + d.delay}
        if not (d.requeue and requeue):
            fields["op"] = None
        elif set_op is not None:
            fields["op"] = set_op
        if op == "put" and may_have_landed(err):
            # a lost answer is not a failed upload: the object may be there. The row is not
            # forgotten if the file goes (its deletion reaches the remote) and the retry asks
            # first (HEAD); kept by `finish` even when the row changed meanwhile
            fields["probe"] = 1
        self.ledger.finish(row, **fields)
        with self.stats.lock:
            self.stats.fail_reasons[err.kind] += 1
        if err.kind not in (LOCAL, INTEGRITY, NOT_FOUND):
            self.stats.remote_failed(err.cause)
        self.causes.report(err.cause, f"{row['watch']}/{row['path']}", subjects=self._subjects(row))
        if state == "failed":
            self.stats.fail(f"{row['watch']}/{row['path']}", err.cause)

    def _subjects(self, row: Row) -> tuple[str, ...]:
        """How this row's file may be named in an error (key, local path, its directory): left
        out of the cause that groups log lines (SPEC §4.6: once per cause, not once per file)."""
        watch = self._watches.get(row["watch"])
        out = [row["key"] or "", row["path"]]
        if watch is not None:
            local = watch.path.joinpath(*row["path"].split("/"))
            out += [str(local), str(local.parent)]
        return tuple(out)

    # --- upload ---------------------------------------------------------------------------
    def _put(self, row: Row, watch: WatchConfig) -> None:
        path = watch.path.joinpath(*row["path"].split("/"))
        now = time.time()
        try:
            st = os.stat(path) if watch.follow_symlinks else os.lstat(path)
        except FileNotFoundError:
            self._vanished(row)
            return
        if not st_mod.S_ISREG(st.st_mode):
            self._vanished(row)
            return
        settle = self.cfg.settle_seconds
        changed = (st.st_size, st.st_mtime_ns) != (row["size"], row["mtime_ns"])
        settles_at = st.st_mtime_ns / 1e9 + settle
        if watch.upload_on_close and self.closes.closed(watch.prefix, row["path"], st.st_size, st.st_mtime_ns):
            # its writer closed it and nothing wrote to it since: whole now (SPEC §4.1), once
            # its mtime's clock tick is surely over (syncd.closes)
            ready = Closes.ready_at(st.st_mtime_ns)
            if now < ready:
                self.ledger.finish(row, state="pending", size=st.st_size, mtime_ns=st.st_mtime_ns, due_at=ready)
                return
        elif changed or now < settles_at < now + settle + 1:
            # not settled: wait until it has been unchanged for settle_seconds (SPEC §4.1)
            self.ledger.finish(row, state="pending", size=st.st_size, mtime_ns=st.st_mtime_ns,
                               due_at=now + settle if changed else settles_at)
            return
        try:
            data = fsutil.read_small(path, SMALL_FILE) if st.st_size <= SMALL_FILE else None
            sha = hashlib.sha256(data).hexdigest() if data is not None else fsutil.sha256_file(path)
        except FileNotFoundError:
            self._vanished(row)
            return
        key = row["key"]
        etag: str | None = row["remote_etag"] if sha == row["remote_sha256"] else None
        if sha != row["remote_sha256"] and row["probe"]:
            etag = self._remote_has(key, sha, st.st_size)
        if sha == row["remote_sha256"] or etag is not None:
            self._synced(row, watch, sha, st, etag)
            self.stats.add(already_remote=1)
            return
        copied = False
        if 0 < st.st_size <= self.copy_limit:  # renames and duplicates: a server-side copy (SPEC §4.8)
            src = self.ledger.find_remote_copy(sha, row["id"])
            if src is not None:
                try:
                    etag = self.remote.copy(src["key"], key, sha256=sha, mtime_ns=st.st_mtime_ns,
                                            expect_sha256=sha)
                    copied = True
                except RemoteError as e:
                    if e.kind not in (NOT_FOUND,):
                        raise
        if not copied:
            try:
                etag = self.remote.put(key, path, size=st.st_size, sha256=sha, mtime_ns=st.st_mtime_ns, data=data)
            except RemoteError as e:
                if e.kind == LOCAL and not os.path.lexists(path):
                    self._vanished(row)  # deleted between hashing and sending: no upload, no error
                    return
                raise
        try:
            after = os.stat(path) if watch.follow_symlinks else os.lstat(path)
            changed = (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            changed = False
        if changed:  # written to while uploading: queue it again; the remote ends with the last content
            self.ledger.finish(row, state="pending", remote_sha256=sha, remote_etag=etag, size=after.st_size,
                               mtime_ns=after.st_mtime_ns, due_at=time.time() + self.cfg.settle_seconds)
        else:
            self._synced(row, watch, sha, st, etag)
        # counted once the ledger has it: /metrics never shows an upload its file counts lack
        self.stats.add(uploaded=1, upload_bytes=st.st_size, copied=int(copied))
        # -v logs every transfer (README: at debug, so a daemon's info log stays one line per event)
        log.debug("uploaded %s/%s (%d bytes%s)", row["watch"], shown(row["path"]), st.st_size,
                  ", server-side copy" if copied else "")

    def _remote_has(self, key: str, sha: str, size: int) -> str | None:
        """The object's etag when it already holds this content, else None.

        The size too: a store that keeps the body of a PUT cut off mid-way (moto's server,
        s3rver) keeps its headers, so the `syncd-sha256` of the whole file on a shorter body."""
        info = self.remote.head(key)
        return info.etag if info is not None and info.sha256 == sha and info.size == size else None

    def _synced(self, row: Row, watch: WatchConfig, sha: str, st: os.stat_result, etag: str | None) -> None:
        if row["tomb"]:  # the path is back: its remote tombstone goes (SPEC §4.5)
            tombstones.lift(self.remote, join_key(self.cfg.remote.prefix, watch.prefix), row["path"])
        now = time.time()
        self.stats.succeeded()
        self.closes.forget(watch.prefix, row["path"], st.st_size, st.st_mtime_ns)
        if self.ledger.finish(row, state="synced", op=None, sha256=sha, remote_sha256=sha, size=st.st_size,
                              mtime_ns=st.st_mtime_ns, synced_at=now, attempts=0, last_error=None,
                              error_kind=None, probe=0, remote_etag=etag, tomb=0, overwrite=0) \
                and row["queued_at"] is not None:
            # the row did not change since its claim: queued_at is when its last change was seen
            self.stats.upload_delay.observe(max(0.0, time.time() - row["queued_at"]))

    def _vanished(self, row: Row) -> None:
        """The file went away before it could be uploaded: no upload, no error (SPEC §4.5)."""
        self.closes.forget(row["watch"], row["path"])
        if row["remote_sha256"] is None and not row["probe"]:
            self.ledger.forget(row)
        else:  # the remote keeps (or may keep, `probe`) a version; a deletion event or rescan decides
            self.ledger.finish(row, state="synced", op=None)

    # --- restore ------------------------------------------------------------------------
    def restoring(self, row_id: int) -> bool:
        """Is this row's restore running right now (in a worker or an on-demand request)?"""
        with self._restoring_lock:
            return row_id in self._restoring

    def _get(self, row: Row, watch: WatchConfig) -> None:
        with self._restoring_lock:
            if row["id"] in self._restoring:
                return  # an on-demand request restores it right now and records the outcome
            self._restoring.add(row["id"])
        try:
            self._restore(row, watch)
        finally:
            with self._restoring_lock:
                self._restoring.discard(row["id"])

    def _restore(self, row: Row, watch: WatchConfig) -> None:
        target = safe_target(watch.path, row["path"], follow_symlinks=watch.follow_symlinks)
        replace = bool(row["overwrite"])
        local_changed = held = False

        def record(res) -> bool:
            nonlocal local_changed
            if replace:
                # a remote change replaces only a local copy unchanged since its last sync (SPEC §4.12)
                try:
                    st = os.stat(target) if watch.follow_symlinks else os.lstat(target)
                    local_changed = (st.st_size, st.st_mtime_ns) != (row["size"], row["mtime_ns"])
                except FileNotFoundError:
                    # deleted here meanwhile: the deletion (the watcher's) stands, nothing comes back
                    return self.ledger.finish(row, state="synced", op=None, overwrite=0) and False
                if local_changed:
                    return False
            # recorded before the rename: the watcher then sees a synced file, not one to upload;
            # not when an on-demand request restored it since the claim (the app may have
            # deleted it since: that deletion stands). The path stays busy until the file is
            # there: a remote change seen in between (a synced row, no file yet) would find
            # nothing to do and be lost; busy, it waits for the path (SPEC §4.12)
            nonlocal held
            held = self.ledger.finish(row, still_op="get", hold=True, state="synced", op=None, size=res.size,
                                      mtime_ns=res.mtime_ns, sha256=res.sha256, remote_sha256=res.sha256,
                                      synced_at=time.time(), attempts=0, last_error=None, error_kind=None,
                                      probe=0, remote_etag=res.etag or None, overwrite=0)
            return held

        try:
            # what the ledger knows was uploaded there checks an object without syncd-sha256
            # (not for a replace: the row's sha256 is the local copy's, not the new object's)
            res = fetch(self.remote, row["key"], target, overwrite=self.overwrite or replace,
                        expect_sha256=None if replace else (row["remote_sha256"] or row["sha256"]),
                        before_publish=record)
        except RemoteError as e:
            if e.kind == NOT_FOUND and row["probe"] and row["remote_sha256"] is None:
                # an upload cut off by a crash that never reached the remote: nothing to restore
                self.ledger.forget(row)
                return
            if e.kind == NOT_FOUND and replace:
                # the changed object is gone too: the local copy stays; the next listing decides
                self.ledger.finish(row, state="synced", op=None, overwrite=0)
                return
            if e.kind == NOT_FOUND and watch.mode == "shared":
                # deleted remotely since the listing (another host): nothing to bring back
                self.ledger.finish(row, state="deleted", op=None, remote_sha256=None, remote_etag=None,
                                   attempts=0, last_error=None, error_kind=None)
                return
            raise
        except FileExistsError:
            now = self.ledger.query("SELECT op FROM files WHERE id=?", [row["id"]])
            if not now or now[0]["op"] != "get":
                # restored by an on-demand request since this worker claimed it: nothing left to
                # do but to let go of the row (asked here, not before every download)
                self.ledger.finish(row)
                return
            # a local file is there (or appeared meanwhile): it wins; compare it with the remote
            self.ledger.update(row["id"], state="pending", op="put", probe=1, due_at=time.time(),
                               lease_until=None)
            return
        if held:  # the file is there: what waited for the path may go (every other way out releases it)
            self.ledger.let_go(row["id"])
        if local_changed:
            # written here meanwhile: the local change wins and is uploaded (over the remote's)
            self.ledger.finish(row, state="pending", op="put", overwrite=0, probe=0, remote_sha256=None,
                               remote_etag=None, due_at=time.time())
            return
        self.stats.succeeded()
        if res is not None:
            self.stats.add(restored=1)
            log.debug("restored %s/%s (%d bytes)", row["watch"], shown(row["path"]), res.size)
            with self.stats.lock:
                self.stats.remote_changes["replaced" if replace else "restored"] += 1

    # --- remote deletion ------------------------------------------------------------------
    def _copy_source(self, row: Row) -> bool:
        """This key may be the copy source of an upload that has not run yet (SPEC §4.8)."""
        if row["remote_sha256"] is None or not row["key"] or not 0 < (row["size"] or 0) <= self.copy_limit:
            return False
        if time.time() - (row["queued_at"] or 0) > RENAME_WAIT:
            return False
        return self.ledger.copy_may_need(row)

    def _delete(self, row: Row, watch: WatchConfig, op: str) -> None:
        if self._copy_source(row):
            # a rename: the new path's upload copies from this key on the server; delete it after
            self.ledger.finish(row, due_at=time.time() + RENAME_POLL)
            return
        if self.delete_gate is not None and not self.delete_gate():
            # paused by max_deletes: the row stays queued until `syncd retry --deletes`
            self.ledger.finish(row, due_at=time.time() + 1)
            return
        key = row["key"]
        if not key:  # nothing of this row ever had a key: nothing remote to delete
            self.ledger.finish(row, state="deleted", op=None, attempts=0, last_error=None, error_kind=None)
            return
        if op == "trash":
            base = join_key(self.cfg.remote.prefix, watch.prefix)
            try:
                self.remote.copy(key, trash_key(base, row["path"], time.time()), sha256=row["remote_sha256"] or "",
                                 mtime_ns=row["mtime_ns"] or 0)
            except RemoteError as e:
                if e.kind != NOT_FOUND:
                    raise
        self.remote.delete(key)  # a key that is not there (a lost answer's upload that never landed): done
        self.ledger.finish(row, state="deleted", op=None, remote_sha256=None, remote_etag=None, probe=0,
                           attempts=0, last_error=None, error_kind=None)
        self.stats.add(deleted=1)
        self.stats.succeeded()
        log.debug("%s %s/%s", "deleted remotely" if op == "delete" else "moved to trash", row["watch"],
                  shown(row["path"]))

    # --- remote tombstone (on_delete = keep) ------------------------------------------------
    def _tomb(self, row: Row, watch: WatchConfig) -> None:
        tombstones.write(self.remote, join_key(self.cfg.remote.prefix, watch.prefix), row["path"])
        self.ledger.finish(row, state="deleted", op=None, attempts=0, last_error=None, error_kind=None)
        self.stats.succeeded()

    # --- local deletion of a file deleted remotely (shared watches) -------------------------
    def _unlink(self, row: Row, watch: WatchConfig) -> None:
        if self.delete_gate is not None and not self.delete_gate():
            # paused by max_deletes: the row stays queued until `syncd retry --deletes`
            self.ledger.finish(row, due_at=time.time() + 1)
            return
        path = watch.path.joinpath(*row["path"].split("/"))
        try:
            st = os.stat(path) if watch.follow_symlinks else os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and (st.st_size, st.st_mtime_ns) != (row["size"], row["mtime_ns"]):
            # changed here since its last sync: the local change wins and is uploaded again
            self.ledger.finish(row, state="pending", op="put", probe=0, remote_sha256=None, remote_etag=None,
                               size=st.st_size, mtime_ns=st.st_mtime_ns, due_at=time.time())
            return
        if st is not None:
            os.unlink(path)  # first: a crash before the ledger write repeats this step, finding nothing
            fsutil.fsync_dir(path.parent)
        if self.ledger.finish(row, state="deleted", op=None, remote_sha256=None, remote_etag=None, attempts=0,
                              last_error=None, error_kind=None) and st is not None:
            with self.stats.lock:
                self.stats.remote_changes["deleted"] += 1
