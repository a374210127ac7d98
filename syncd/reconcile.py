"""The listing reconcile: the remote is the truth (SPEC §3, §4.4, §4.5, §4.12).

One pass over a watch is a merge join of three sorted streams, so memory stays flat whatever
the number of objects (no dict of all keys, no HEAD per object):

- the remote's objects under `<remote prefix>/<watch prefix>/` (S3 lists in UTF-8 binary order;
  the file remote lists in the same order),
- the watch's tombstones under `.../.syncd/tombstones/` (a second listing, `syncd.tombstones`),
- the watch's ledger rows in path order (SQLite's binary collation: the same order).

Each relative path meets its object, its tombstone and its row at once and `decide` turns them
into ledger work, written in batches (one transaction per batch). Nothing is transferred here:
workers do the restores, uploads and local deletions, each retried through the ledger.

The ledger remembers what a listing showed for a key when the host last synced it
(`remote_etag`: the object's ETag, the file remote's size and mtime): an object whose etag is
the row's is unchanged and costs nothing; anything else changed remotely.

Rules (`backup`: this host is the only writer of the prefix; `shared`: several hosts are):

- an object with no row (or whose row is a deletion) and no local file: restored, unless a
  tombstone at least as new hides it (the app deleted it, SPEC §4.5) or the row is a deletion
  of this very version (shared) or any deletion (backup);
- a synced row whose object shows another etag: `backup` re-uploads (after a HEAD comparing the
  content, `probe`); `shared` replaces the local copy when it is unchanged since its last sync
  (op `get` with `overwrite`, checked again just before the rename);
- a synced row whose object is gone: `backup` (and `shared` under `keep`) uploads it again;
  `shared` under `mirror`/`trash` deletes the local copy when it is unchanged since its last sync
  (op `unlink`). Those deletions are held until the listing ends, then `syncd.guard` judges
  them: a listing that found no object at all deletes nothing (the files are uploaded again),
  and more than `max_deletes` pause them until `syncd retry --deletes`. A listing also judges
  again the local deletions that remote deletion events paused (`cancel_held`);
- a local change not uploaded yet (a row with op `put`) always wins: it is uploaded;
- rows touched since the listing started, or leased by a worker, are left to the next listing
  (the listing may predate what they know);
- an object newer than its tombstone wins, and the stale tombstone is removed;
- keys that would escape the watch root are refused and reported (SPEC §4.4); syncd's own keys
  (`.syncd/`, `.trash/`, `.syncd-check/`) are never files.

One remote change at a time (an S3 event) goes through the same `decide`: `syncd.changes`.
"""

from __future__ import annotations

import logging
import os
import stat as st_mod
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from syncd import refusals, tombstones
from syncd.config import Config, WatchConfig
from syncd.guard import HELD, PAUSED, DeleteGuard
from syncd.keys import UnsafeKey, is_reserved, join_key, rel_from_key
from syncd.ledger import Ledger, Row
from syncd.names import shown
from syncd.patterns import Filter, matches_any
from syncd.remote.base import INVALID, ObjectInfo, Remote, RemoteError
from syncd.retry import ONESHOT_ATTEMPTS, backoff, is_transient

log = logging.getLogger(__name__)
BATCH = 500


@dataclass
class Options:
    """What one listing may do. `sync` (resync, run) applies every rule above; without it
    (`syncd restore`) only restores are queued, as the command asks."""

    sync: bool = True
    restore: bool = True
    dry_run: bool = False
    globs: tuple[str, ...] = ()
    include_tombstones: bool = False  # `syncd restore`: files the app deleted come back too
    overwrite: bool = False  # `syncd restore --overwrite`


@dataclass
class Result:
    objects: int = 0  # objects of the watch in the listing (syncd's own keys not counted)
    restores: int = 0
    replaces: int = 0
    uploads: int = 0
    local_deletes: int = 0
    adopted: int = 0  # rows that learnt their object's etag (ledgers from before schema 3)
    tombstones_lifted: int = 0
    complete: bool = False  # False: stopped before the end (not a listing of the whole watch)
    dry_uploads: set[str] = field(default_factory=set)  # a dry run's uploads (`--verify` skips them)
    refused: list[tuple[str, str]] = field(default_factory=list)


def remote_files(remote: Remote, base: str, watch: WatchConfig, globs: Iterable[str],
                 refused: list[tuple[str, str]], counted: list[int] | None = None, *, filtered: bool = True,
                 report: Callable[[str, str], None] | None = None,
                 objects: Iterable[ObjectInfo] | None = None, check_order: bool = False
                 ) -> Iterator[tuple[str, ObjectInfo]]:
    """(ledger path, object) for every object of a watch that a restore may write, in order.

    Keys that would escape the root are refused (logged, appended to `refused`); syncd's own
    objects (trash, check probes, tombstones), folder markers and excluded or unmatched names
    are skipped. `counted[0]` counts the objects that are files of the watch (reserved keys and
    folder markers excluded), for the empty-listing guard. `filtered=False` leaves the include /
    exclude patterns to the caller (a listing checks them only for objects without a row).
    `report(key, why)` logs a refused key (default: an error line each time). `objects`: the
    listing of `base + "/"` when the caller makes it (e.g. `resumable`). `check_order`: raise
    when a key does not sort after the one before (a merge join needs the order).
    """
    filt = Filter(watch.include, watch.exclude)
    globs = tuple(globs)
    last = ""
    for obj in remote.list(base + "/" if base else "") if objects is None else objects:
        if check_order and obj.key <= last:
            # a merge join over an unsorted stream would take present objects for missing ones
            raise RemoteError(INVALID, f"the remote listed {obj.key!r} after {last!r}: not in key order",
                              code="ListingOrder", action="s3:ListBucket")
        last = obj.key
        if obj.key.endswith("/"):
            continue  # "folder" marker objects made by consoles
        try:
            rel = rel_from_key(obj.key, base)
        except UnsafeKey as e:
            if report is not None:
                report(obj.key, str(e))
            else:
                log.error("refusing remote key %r: %s", obj.key, e)
            refused.append((obj.key, f"unsafe key: {e}"))
            refusals.count(refusals.UNSAFE_KEY)
            continue
        if is_reserved(rel):
            continue
        if counted is not None:
            counted[0] += 1
        if filtered and (not filt.wants(rel) or (globs and not matches_any(globs, rel))):
            continue
        yield rel, obj


_COLS = ("id", "path", "state", "op", "size", "mtime_ns", "remote_sha256", "remote_etag", "probe", "tomb",
         "overwrite", "lease_until", "updated_at", "gen")


def resumable(remote: Remote, prefix: str, *, forever: bool, stop: threading.Event,
              on_retry: Callable[[BaseException], None] | None = None) -> Iterator[ObjectInfo]:
    """`remote.list(prefix)`, where a transient failure (a 503, a reset mid-page) retries that
    page (`start_after` the last key seen) under the retry policy, instead of starting the whole
    listing over: a million-object listing is not lost to one bad page, and a listing made of
    several streams (objects, tombstones) gets through whenever each request does. One-shot:
    `ONESHOT_ATTEMPTS` failures in a row give up (the error is raised); `forever`: until stopped.
    `on_retry(exc)` hears of every failure that is retried (none is silent)."""
    last = ""
    failures = 0
    while True:
        try:
            for obj in remote.list(prefix, start_after=last) if last else remote.list(prefix):
                failures = 0
                last = obj.key
                yield obj
            return
        except RemoteError as e:
            failures += 1
            if not is_transient(e) or stop.is_set() or (not forever and failures >= ONESHOT_ATTEMPTS):
                raise
            log.debug("listing %s failed (%s); retrying after %s", prefix, e, last or "the start")
            if on_retry is not None:
                on_retry(e)
            stop.wait(backoff(failures))


def _rows(ledger: Ledger, watch: str, page: int = 2000) -> Iterator[Row]:
    """The watch's rows in path order (binary collation), in pages; only the columns `decide`
    reads (a whole row as a dict cost more than the listing of a local remote)."""
    cols = ", ".join(_COLS)
    after: str | None = None
    conn = ledger.db.conn
    while True:
        if after is None:
            cur = conn.execute(f"SELECT {cols} FROM files WHERE watch=? ORDER BY path LIMIT ?", [watch, page])
        else:
            cur = conn.execute(f"SELECT {cols} FROM files WHERE watch=? AND path>? ORDER BY path LIMIT ?",
                               [watch, after, page])
        batch = cur.fetchall()
        if not batch:
            return
        for t in batch:
            yield dict(zip(_COLS, t, strict=True))
        after = batch[-1][1]


def cancel_held(ledger: Ledger, watch: str | None = None, *, paused: bool = True) -> int:
    """Local deletions a listing held and never released (it was interrupted) and, with `paused`,
    those remote deletion events paused (`syncd.guard`): back to synced; the listing about to
    run decides again."""
    where = "op='unlink' AND due_at>=?" + ("" if paused else " AND due_at<?")
    params: list[Any] = [HELD] if paused else [HELD, PAUSED]
    if watch is not None:
        where += " AND watch=?"
        params.append(watch)
    with ledger.write() as w:
        return w.execute(f"UPDATE files SET state='synced', op=NULL, due_at=0, queued_at=NULL, last_error=NULL, "
                         f"gen=gen+1 WHERE {where}", params).rowcount


class Work:
    """Decisions for one batch of paths, written in one transaction. Changes to existing rows
    apply only if the row is unchanged since it was read (`gen`) and not leased: a watcher or
    worker that got there first wins."""

    def __init__(self, ledger: Ledger, watch: WatchConfig, key_base: str, *, now: float,
                 dry_run: bool = False, unlink_due: float | None = None,
                 on_plan: Callable[[str, str, str], None] | None = None) -> None:
        self.on_plan = on_plan  # (kind, watch prefix, path): a dry run names every file
        self.ledger = ledger
        self.watch = watch
        self.key_base = key_base
        self.now = now
        self.dry_run = dry_run
        # when local deletions are due: None holds them until the listing ends (HELD)
        self.unlink_due = unlink_due
        # changes a watcher or worker got to first (the row changed or is leased since it was read)
        self.missed: list[int] = []
        self.inserts: list[Row] = []
        self.changes: list[tuple[Row, dict[str, Any], bool]] = []
        self.lifts: list[str] = []

    def __len__(self) -> int:
        return len(self.inserts) + len(self.changes) + len(self.lifts)

    def _queued(self, **fields: Any) -> dict[str, Any]:
        return {"due_at": self.now, "queued_at": self.now, "updated_at": self.now, "attempts": 0,
                "last_error": None, "error_kind": None, **fields}

    def planned(self, kind: str, rel: str) -> None:
        if self.on_plan is not None:
            self.on_plan(kind, self.watch.prefix, rel)

    def restore(self, rel: str, obj: ObjectInfo, row: Row | None) -> None:
        self.planned("restore", rel)
        fields = self._queued(state="pending", op="get", key=obj.key, size=obj.size, overwrite=0, probe=0)
        if row is None:
            self.inserts.append({"watch": self.watch.prefix, "path": rel, **fields})
        else:  # another version than the row knew: its checksums say nothing of this object
            self.change(row, **fields, sha256=None, remote_sha256=None)

    def replace(self, row: Row, obj: ObjectInfo) -> None:
        # size and mtime_ns stay: the local copy's, which the worker checks before the rename
        self.planned("restore", row["path"])
        self.change(row, **self._queued(state="pending", op="get", key=obj.key, overwrite=1))

    def upload(self, row: Row, *, probe: bool, tomb: bool) -> None:
        self.planned("upload", row["path"])
        self.change(row, **self._queued(state="pending", op="put", probe=int(probe), remote_sha256=None,
                                         remote_etag=None, tomb=int(tomb or row["tomb"])))

    def unlink(self, row: Row) -> None:
        self.planned("delete", row["path"])
        fields = self._queued(state="deleting", op="unlink")
        if self.unlink_due is None:
            fields.update(due_at=HELD, queued_at=None)  # released when the listing ends
        else:
            fields.update(due_at=self.unlink_due)
        self.change(row, **fields)

    def change(self, row: Row, **fields: Any) -> None:
        self.changes.append((row, fields, True))

    def fact(self, row: Row, **fields: Any) -> None:
        """What the listing says about the remote: not a change of the file (no gen bump)."""
        self.changes.append((row, fields, False))

    def lift(self, rel: str) -> None:
        self.lifts.append(rel)

    def flush(self, remote: Remote | None, then: Callable[[Any], object] | None = None) -> None:
        """Write the batch in one transaction; `then(db)` runs in that transaction after it."""
        if not self.dry_run and (self.inserts or self.changes or then is not None):
            with self.ledger.write() as w:
                for r in self.inserts:
                    cols = list(r)
                    # a row the watcher created meanwhile (the file appeared) wins
                    w.execute(f"INSERT INTO files({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)}) "
                              f"ON CONFLICT(watch, path) DO NOTHING", [r[c] for c in cols])
                for row, fields, bump in self.changes:
                    sets = ", ".join(f"{k}=?" for k in fields) + (", gen=gen+1" if bump else "")
                    if not w.execute(f"UPDATE files SET {sets} WHERE id=? AND gen=? AND lease_until IS NULL",
                                     [*fields.values(), row["id"], row["gen"]]).rowcount:
                        self.missed.append(row["id"])
                if then is not None:
                    then(w)
        if not self.dry_run and remote is not None:
            for rel in self.lifts:
                try:
                    tombstones.lift(remote, self.key_base, rel)
                except RemoteError as e:  # the next listing tries again
                    log.warning("could not remove the stale tombstone of %s/%s: %s", self.watch.prefix, shown(rel), e)
        self.inserts.clear()
        self.changes.clear()
        self.lifts.clear()


def _same_local(watch: WatchConfig, rel: str, row: Row) -> bool | None:
    """Is the local file unchanged since its last sync? None when it is missing."""
    path = watch.path.joinpath(*rel.split("/"))
    try:
        st = os.stat(path) if watch.follow_symlinks else os.lstat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) == (row["size"], row["mtime_ns"])


def _exists(watch: WatchConfig, rel: str) -> bool:
    """Does a local file hold the name? A directory does not count: its restore is queued and
    fails naming it (SPEC §4.14), where skipping it would be a silent success."""
    try:
        return not st_mod.S_ISDIR(os.lstat(watch.path.joinpath(*rel.split("/"))).st_mode)
    except OSError:
        return False


def decide(work: Work, watch: WatchConfig, rel: str, obj: ObjectInfo | None, tomb: ObjectInfo | None,
           row: Row | None, *, since: float, restore: bool = True, res: Result | None = None) -> None:
    """The rules of the module docstring for one path (resync, run, and one event)."""
    res = res if res is not None else Result()
    if row is not None and (row["lease_until"] is not None or (row["updated_at"] or 0) >= since):
        return  # being worked on, or changed after the listing started: the next listing judges
    shared = watch.mode == "shared"
    hidden = tombstones.hides(tomb, obj)
    if tomb is not None and obj is not None and not hidden:
        work.lift(rel)  # the object was written after the deletion: the tombstone is stale
        res.tombstones_lifted += 1
    if obj is not None:
        _present(work, watch, rel, obj, tomb, row, shared=shared, hidden=hidden, restore=restore, res=res)
    elif row is not None:
        _absent(work, watch, rel, tomb, row, shared=shared, res=res)


def _present(work: Work, watch: WatchConfig, rel: str, obj: ObjectInfo, tomb: ObjectInfo | None,
             row: Row | None, *, shared: bool, hidden: bool, restore: bool, res: Result) -> None:
    if row is None:
        if hidden or not restore or not watch.restore or _exists(watch, rel):
            return  # deleted by the app; or the file appeared after the scan: the watcher records it
        work.restore(rel, obj, None)
        res.restores += 1
        return
    state, op = row["state"], row["op"]
    if op == "unlink":  # the object is back: the held or paused local deletion no longer holds
        if shared and obj.etag != row["remote_etag"] and _same_local(watch, rel, row) is True:
            work.replace(row, obj)  # another version than the one deleted: it replaces the local copy
            res.replaces += 1
        else:
            work.change(row, state="synced", op=None, due_at=0, queued_at=None, last_error=None)
        return
    if state == "deleted" and op is None:
        # backup: the app deleted it here. shared: another host may have written it again since
        if shared and not hidden and obj.etag != row["remote_etag"] and restore and watch.restore \
                and not _exists(watch, rel):
            work.restore(rel, obj, row)
            res.restores += 1
        return
    if state == "synced" and op is None:
        known = row["remote_etag"]
        if known is not None and obj.etag == known:
            return  # unchanged: the common case costs a string comparison
        if known is None and obj.size == row["size"]:
            work.fact(row, remote_etag=obj.etag)  # synced before this host kept etags: adopt it
            res.adopted += 1
            return
        if _same_local(watch, rel, row) is not True:
            return  # changed or missing locally: the local change wins (the watcher or scan queues it)
        if shared:
            work.replace(row, obj)
            res.replaces += 1
        else:
            work.upload(row, probe=True, tomb=tomb is not None)  # the local copy is the truth here
            res.uploads += 1
            if work.dry_run:
                res.dry_uploads.add(row["path"])
        return
    if op == "put":
        facts: dict[str, Any] = {}
        if not row["probe"] and row["remote_sha256"] is None:
            facts["probe"] = 1  # the object may hold this content already: compared, not re-sent
        if tomb is not None and not row["tomb"]:
            facts["tomb"] = 1  # the upload lifts the tombstone
        if facts:
            work.fact(row, **facts)


def _absent(work: Work, watch: WatchConfig, rel: str, tomb: ObjectInfo | None, row: Row, *,
            shared: bool, res: Result) -> None:
    state, op = row["state"], row["op"]
    if state == "deleted" and op is None:
        if row["remote_etag"] is not None:
            work.fact(row, remote_etag=None)
        return
    if op == "get" and state in ("pending", "failed"):
        if row["overwrite"]:  # the changed object is gone too: judged again as a synced file
            work.change(row, state="synced", op=None, overwrite=0)
        elif shared:  # deleted remotely and missing here: nothing left to do
            work.change(row, state="deleted", op=None, remote_etag=None, remote_sha256=None, queued_at=None)
        return
    if op == "put":
        facts: dict[str, Any] = {}
        if row["remote_sha256"] is not None or row["remote_etag"] is not None:
            facts.update(remote_sha256=None, remote_etag=None)  # nothing there: upload in full
        if tomb is not None and not row["tomb"]:
            facts["tomb"] = 1
        if facts:
            work.fact(row, **facts)
        return
    if state != "synced" or op is not None:
        return  # a remote deletion, tombstone or local deletion is on its way
    if _same_local(watch, rel, row) is not True:
        return  # changed or missing locally: the watcher or scan queues it
    if shared and watch.on_delete in ("mirror", "trash"):
        work.unlink(row)
        res.local_deletes += 1
    else:
        work.upload(row, probe=False, tomb=tomb is not None)  # backup: the object vanished
        res.uploads += 1
        if work.dry_run:
            res.dry_uploads.add(row["path"])


def _restore_only(work: Work, watch: WatchConfig, rel: str, obj: ObjectInfo, tomb: ObjectInfo | None,
                  row: Row | None, opts: Options, res: Result) -> None:
    """`syncd restore`: what is missing locally (or everything, `--overwrite`)."""
    if not opts.include_tombstones and (tombstones.hides(tomb, obj) or (
            row is not None and row["state"] in ("deleted", "deleting"))):
        return  # the app deleted it: not restored (SPEC §4.5)
    if _exists(watch, rel) and not opts.overwrite:
        if row is not None and row["op"] == "put" and not row["probe"]:
            work.fact(row, probe=1)  # compare with the remote instead of uploading again
        return
    if not opts.restore or (row is not None and row["op"] == "get" and row["state"] == "pending"):
        return
    work.restore(rel, obj, row)
    res.restores += 1


class Listing:
    """One listing of one watch, merged with its tombstones and ledger rows."""

    def __init__(self, cfg: Config, ledger: Ledger, remote: Remote, watch: WatchConfig, opts: Options, *,
                 guard: DeleteGuard | None = None,
                 stop: threading.Event | None = None,
                 report_refused: Callable[[str, str], None] | None = None,
                 on_plan: Callable[[str, str, str], None] | None = None, forever: bool = False,
                 on_retry: Callable[[BaseException], None] | None = None,
                 on_flush: Callable[[], None] | None = None) -> None:
        self.on_retry = on_retry
        self.on_flush = on_flush  # work was queued (workers may start on it while the listing goes on)
        self.on_plan = on_plan
        self.forever = forever  # the daemon: a failing page is retried until it works or a stop
        self.cfg = cfg
        self.report_refused = report_refused
        self.stop = stop or threading.Event()
        self.ledger = ledger
        self.remote = remote
        self.watch = watch
        self.opts = opts
        self.guard = guard if guard is not None else DeleteGuard(cfg, ledger)
        self.key_base = join_key(cfg.remote.prefix, watch.prefix)
        self.result = Result()

    def run(self) -> Result:
        w, opts, res = self.watch, self.opts, self.result
        since = time.time()
        if opts.sync and not opts.dry_run:
            cancel_held(self.ledger, w.prefix)
        filt = Filter(w.include, w.exclude)
        counted = [0]
        base = self.key_base
        objects = remote_files(self.remote, base, w, opts.globs, res.refused, counted, filtered=False,
                               report=self.report_refused, check_order=True,
                               objects=resumable(self.remote, base + "/" if base else "", forever=self.forever,
                                                 stop=self.stop, on_retry=self.on_retry))
        tombs = tombstones.listing(self.remote, base, resumable(self.remote, tombstones.tomb_base(base) + "/",
                                                                forever=self.forever, stop=self.stop,
                                                                on_retry=self.on_retry))
        rows = _rows(self.ledger, w.prefix)
        work = Work(self.ledger, w, self.key_base, now=since, dry_run=opts.dry_run, on_plan=self.on_plan)
        o, t, r = next(objects, None), next(tombs, None), next(rows, None)
        while o is not None or r is not None:
            if o is not None and (r is None or o[0] <= r["path"]):
                rel = o[0]
            else:
                assert r is not None
                rel = r["path"]
            obj = o[1] if o is not None and o[0] == rel else None
            row = r if r is not None and r["path"] == rel else None
            if obj is not None:
                o = next(objects, None)
            if row is not None:
                r = next(rows, None)
            while t is not None and t[0] < rel:
                t = next(tombs, None)
            tomb = t[1] if t is not None and t[0] == rel else None
            # patterns are checked off the common path only: a row exists only for a wanted file
            if (row is None or obj is None or opts.globs) and not (
                    filt.wants(rel) and (not opts.globs or matches_any(opts.globs, rel))):
                continue
            if opts.sync:
                decide(work, w, rel, obj, tomb, row, since=since, restore=opts.restore, res=res)
            elif obj is not None:
                _restore_only(work, w, rel, obj, tomb, row, opts, res)
            if len(work) >= BATCH:
                work.flush(self.remote)
                if self.on_flush is not None:
                    self.on_flush()
                if self.stop.is_set():
                    return res  # held deletions are cancelled by the next listing
        work.flush(self.remote)
        res.objects = counted[0]
        if opts.sync:
            self._release_deletes()
        res.complete = True
        return res

    def _release_deletes(self) -> None:
        """The held local deletions, as the guard says: none from an empty listing (uploaded
        again instead), all paused beyond max_deletes, else due now."""
        res, w = self.result, self.watch
        if not res.local_deletes or self.opts.dry_run:
            return
        now = time.time()
        if not self.guard.listing_may_delete(w.prefix, self.key_base or self.remote.name, res.objects,
                                             res.local_deletes):
            with self.ledger.write() as wr:
                wr.execute("UPDATE files SET state='pending', op='put', probe=0, remote_sha256=NULL, "
                           "remote_etag=NULL, due_at=?, queued_at=?, gen=gen+1 "
                           "WHERE watch=? AND op='unlink' AND due_at>=?", [now, now, w.prefix, HELD])
            res.uploads += res.local_deletes
            res.local_deletes = 0
            return
        with self.ledger.write() as wr:
            wr.execute("UPDATE files SET due_at=?, queued_at=? WHERE watch=? AND op='unlink' AND due_at>=?",
                       [now, now, w.prefix, HELD])


