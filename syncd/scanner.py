"""Walks a watch and compares it with the ledger (SPEC §4.7): stat only, never hash.

The walk yields paths in the ledger's order (binary UTF-8 order, the same as SQLite's), so the
comparison is a merge join of two sorted streams: memory stays bounded whatever the tree size.
"""

from __future__ import annotations

import logging
import os
import stat as st_mod
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from syncd import refusals
from syncd.config import WatchConfig
from syncd.keys import RESTORE_TEMP_PREFIX, join_key, key_problem, ledger_name, name_problem
from syncd.ledger import Ledger, Row
from syncd.names import shown
from syncd.patterns import Filter

log = logging.getLogger(__name__)

FILE, BAD_NAME, SKIP_DIR = "file", "bad", "skipdir"
FLUSH_EVERY = 500
# on_plan(kind, watch prefix, ledger path): kind is "upload", "restore" or "delete"
PlanHook = Callable[[str, str, str], None]


@dataclass
class Entry:
    path: str  # ledger path
    kind: str  # FILE | BAD_NAME | SKIP_DIR
    size: int = 0
    mtime_ns: int = 0
    problem: str = ""


@dataclass
class ScanStats:
    files: int = 0
    unchanged: int = 0
    new: int = 0
    changed: int = 0
    to_restore: int = 0
    to_delete: int = 0  # remote deletions already queued in the ledger (drained by a resync)
    deletions: int = 0
    forgotten: int = 0
    bad_names: int = 0
    unreadable_dirs: list[str] = field(default_factory=list)


def walk(root: Path, filt: Filter, follow_symlinks: bool = False, base: str = "",
         temps: list[str] | None = None, ancestors: Iterable[tuple[int, int]] = ()) -> Iterator[Entry]:
    """Regular files under `root` in ledger-path order; excluded directories are pruned.

    `base` is the ledger path of `root` inside its watch ("" for the watch root itself).
    `temps`, when given, collects the paths of restore temp files met on the way.
    `ancestors`: (st_dev, st_ino) of the directories above `root` in the watch, so a symlink
    that loops back to one of them is not followed when walking a subdirectory.
    """
    seen_dirs: set[tuple[int, int]] = set(ancestors)

    def rec(abs_dir: str, rel_dir: str, name_bad: str | None) -> Iterator[Entry]:
        try:
            with os.scandir(abs_dir) as it:
                entries = list(it)
        except OSError as e:
            if rel_dir == base:
                raise  # the watch root itself: the caller reports the watch as down
            log.warning("cannot read directory %s: %s; its files are left as they are",
                        shown(abs_dir), e.strerror)
            yield Entry(path=rel_dir + "/" if rel_dir else "", kind=SKIP_DIR, problem=str(e.strerror))
            return
        items = []
        for de in entries:
            lname = ledger_name(de.name)
            rel = f"{rel_dir}/{lname}" if rel_dir else lname
            try:
                is_link = de.is_symlink()
                if is_link and not follow_symlinks:
                    continue  # symlinks are not followed (SPEC §4.9)
                s = de.stat(follow_symlinks=True) if is_link else de.stat(follow_symlinks=False)
            except OSError:
                continue  # vanished or a dangling link
            if st_mod.S_ISDIR(s.st_mode):
                if filt.dir_excluded(rel):
                    continue
                items.append((rel + "/", rel, de, s, True))
            elif st_mod.S_ISREG(s.st_mode):
                if filt.wants(rel):
                    items.append((rel, rel, de, s, False))
                elif temps is not None and de.name.startswith(RESTORE_TEMP_PREFIX):
                    temps.append(de.path)
            # fifos, sockets and devices are skipped
        items.sort(key=lambda t: t[0])
        for _sort, rel, de, s, is_dir in items:
            problem = name_bad or name_problem(de.name)
            if is_dir:
                ident = (s.st_dev, s.st_ino)
                if ident in seen_dirs:
                    log.warning("symlink loop at %s; not followed again", shown(de.path))
                    continue
                seen_dirs.add(ident)
                yield from rec(de.path, rel, problem)
                seen_dirs.discard(ident)
            elif problem:
                yield Entry(path=rel, kind=BAD_NAME, size=s.st_size, mtime_ns=s.st_mtime_ns, problem=problem)
            else:
                yield Entry(path=rel, kind=FILE, size=s.st_size, mtime_ns=s.st_mtime_ns)

    st = os.stat(root)
    if (st.st_dev, st.st_ino) in seen_dirs:
        log.warning("symlink loop at %s; not followed", shown(root))
        return
    seen_dirs.add((st.st_dev, st.st_ino))
    yield from rec(str(root), base, None)


def _ledger_rows(ledger: Ledger, watch: str) -> Iterator[Row]:
    after = None
    while True:
        page = ledger.page(watch, after)
        if not page:
            return
        yield from page
        after = page[-1]["path"]


class Scanner:
    """Compares one watch with the ledger and queues the differences.

    `missing` says what a file that is in the ledger but not on disk means:
    - "restore": startup (SPEC §4.5: a file missing at start is restored, never deleted remotely);
    - "delete": a rescan while running (the deletion follows `on_delete`);
    - "ignore": leave such rows alone.

    `clean_temps` removes restore temp files (`.syncd-restore-*`) that a killed process left
    behind; only at startup, before this process restores anything (the ledger lock keeps other
    syncd processes out).

    `on_plan` is told every file the decisions would transfer (a dry run names them all).
    """

    def __init__(self, ledger: Ledger, watch: WatchConfig, remote_prefix: str, *, settle: float,
                 missing: str = "restore", retry_failed: bool = False, dry_run: bool = False,
                 now: float | None = None, clean_temps: bool = False, on_plan: PlanHook | None = None) -> None:
        self.ledger = ledger
        self.watch = watch
        self.remote_prefix = remote_prefix
        self.settle = settle
        self.missing = missing
        self.retry_failed = retry_failed
        self.dry_run = dry_run
        self.clean_temps = clean_temps and not dry_run
        self.now = now if now is not None else time.time()
        self.stats = ScanStats()
        self.on_plan = on_plan
        # path -> when it is due, for files their writer closed (upload_on_close, syncd.closes)
        self.due_at: dict[str, float] = {}
        self._upserts: list[Row] = []
        self._forget: list[int] = []

    def key(self, path: str) -> str:
        return join_key(self.remote_prefix, self.watch.prefix, path)

    def run(self) -> ScanStats:
        filt = Filter(self.watch.include, self.watch.exclude)
        rows = _ledger_rows(self.ledger, self.watch.prefix)
        row = next(rows, None)
        skip_prefix: str | None = None
        temps: list[str] | None = [] if self.clean_temps else None
        for entry in walk(self.watch.path, filt, self.watch.follow_symlinks, temps=temps):
            # ledger rows that sort before this entry are not on disk
            while row is not None and row["path"] < entry.path:
                if not (skip_prefix and row["path"].startswith(skip_prefix)):
                    self.on_missing(row)
                row = next(rows, None)
            if entry.kind == SKIP_DIR:
                skip_prefix = entry.path
                self.stats.unreadable_dirs.append(entry.path)
                continue
            self.stats.files += 1
            if row is not None and row["path"] == entry.path:
                self.on_seen(row, entry)
                row = next(rows, None)
            else:
                self.on_new(entry)
            self._maybe_flush()
        while row is not None:
            if not (skip_prefix and row["path"].startswith(skip_prefix)):
                self.on_missing(row)
            row = next(rows, None)
        self.flush()
        for path in temps or ():
            try:
                os.unlink(path)
                log.info("removed %s, left behind by an interrupted restore", shown(path))
            except FileNotFoundError:
                pass
        return self.stats

    # --- decisions ----------------------------------------------------------------------
    def _due(self, mtime_ns: int) -> float:
        """When the file has settled. Settled long ago (a catch-up: written while syncd was
        stopped), that moment: not fresh (`pool.FRESH`: the fresh lane stays free for what the app
        closes next) and the oldest first. An mtime in the future (a skewed clock): now."""
        settled_at = mtime_ns / 1e9 + self.settle
        return settled_at if settled_at < self.now + self.settle + 1 else self.now

    def _plan(self, kind: str, path: str) -> None:
        if self.on_plan is not None:
            self.on_plan(kind, self.watch.prefix, path)

    def _queue_put(self, entry: Entry, **extra: object) -> None:
        """Queue the upload of `entry`. Without `probe` in `extra` the row keeps its own, as it is
        when the decision is written: a lost answer recorded since the row was read stays known
        (the remote may hold an upload, SPEC §4.5)."""
        self._plan("upload", entry.path)
        row = {"watch": self.watch.prefix, "path": entry.path, "size": entry.size,
               "mtime_ns": entry.mtime_ns, "state": "pending", "op": "put", "key": self.key(entry.path),
               "due_at": self.due_at.get(entry.path) or self._due(entry.mtime_ns), "queued_at": self.now,
               "updated_at": self.now, "attempts": 0, "last_error": None, "error_kind": None}
        row.update(extra)
        self._upserts.append(row)

    def on_new(self, entry: Entry, *, known_bad: bool = False) -> None:
        problem = entry.problem if entry.kind == BAD_NAME else key_problem(self.key(entry.path))
        if problem:
            self.stats.bad_names += 1
            self._fail_name(entry, problem, warn=not known_bad)
            return
        self.stats.new += 1
        self._queue_put(entry, probe=0)

    def _fail_name(self, entry: Entry, problem: str, *, warn: bool = True) -> None:
        if warn:  # once per file: not again at each write to a file already failed for its name
            log.warning("cannot sync %s/%s: %s", self.watch.prefix, shown(entry.path), problem)
            if not self.dry_run:
                refusals.count(refusals.NAME)
        self._upserts.append({"watch": self.watch.prefix, "path": entry.path, "size": entry.size,
                              "mtime_ns": entry.mtime_ns, "state": "failed", "op": None, "key": None,
                              "last_error": problem, "error_kind": "name", "updated_at": self.now,
                              "due_at": self.now})

    def on_seen(self, row: Row, entry: Entry) -> None:
        same = row["size"] == entry.size and row["mtime_ns"] == entry.mtime_ns
        state, op = row["state"], row["op"]
        if entry.kind == BAD_NAME or row["error_kind"] == "name":
            if not same:
                self.on_new(entry, known_bad=row["error_kind"] == "name")
            return
        if state == "synced" and same:
            self.stats.unchanged += 1
            return
        if same and (op == "unlink" or (op == "get" and row["overwrite"])):
            # unchanged since its last sync: the queued remote change (a deletion, a newer
            # version from another host) stands (SPEC §4.12)
            self.stats.unchanged += 1
            return
        if state in ("deleted", "deleting") or op in ("get", "delete", "trash", "tomb", "unlink"):
            # the file is (back) on disk: it wins over a queued restore or deletion
            self.stats.changed += 1
            self._queue_put(entry, **({"probe": 1} if op == "get" else {}))
            return
        if state == "synced":
            self.stats.changed += 1
            self._queue_put(entry)
            return
        # already queued for upload (pending / uploading / failed)
        if not same:
            self.stats.changed += 1
            self._queue_put(entry)
        elif state == "failed" and self.retry_failed:
            # a start is a fresh chance for failed files
            self.stats.changed += 1
            self._queue_put(entry)
        elif entry.path in self.due_at and state in ("pending", "uploading"):
            # closed by its writer since it was queued: due now (a new gen, so an upload that
            # started before the close and decided to wait is queued again)
            self.stats.changed += 1
            self._queue_put(entry)
        else:
            self.stats.changed += 1
            if state != "failed":  # still queued: the next drain uploads it
                self._plan("upload", entry.path)

    def on_missing(self, row: Row) -> None:
        state, op = row["state"], row["op"]
        if state == "deleted" or (state == "deleting" and op == "tomb"):
            return
        if state == "deleting" and op == "unlink" and (self.missing != "delete" or row.get("lease_until") is not None):
            return  # a worker deletes it now (a remote deletion), or it was not seen going while running
        # a local deletion from a remote deletion that waits (EVENT_GRACE, or paused by the guard)
        # and that the app did itself: its own deletion, recorded as any other (SPEC §4.5). The
        # object may be back by now (another host's listing uploads it again after a wipe): the
        # waiting deletion is then cancelled, and the app's would be lost with it
        if state == "deleting" and op in ("delete", "trash"):
            self.stats.to_delete += 1  # queued before (a stopped daemon): the next drain sends it
            self._plan("delete", row["path"])
            return
        on_remote = maybe_remote(row) or op == "get"
        if not on_remote:
            if op == "put" or row["error_kind"] == "name":
                self._forget.append(row["id"])  # vanished before it was ever uploaded
                self.stats.forgotten += 1
            return
        if self.missing == "restore":
            if not self.watch.restore:
                return
            self.stats.to_restore += 1
            self._plan("restore", row["path"])
            if op == "get" and state == "pending":
                return
            self._upserts.append({"watch": row["watch"], "path": row["path"], "state": "pending",
                                  "op": "get", "due_at": self.now, "queued_at": self.now,
                                  "updated_at": self.now, "attempts": 0, "last_error": None,
                                  "error_kind": None})
        elif self.missing == "delete":
            if op == "get":
                return  # a restore still queued or failing: the file was never back, not deleted
            self.stats.deletions += 1
            fields = deletion_fields(row, self.watch.on_delete, self.now)
            if fields["state"] == "deleting":
                self._plan("delete", row["path"])
            self._upserts.append(fields)

    # --- writes -------------------------------------------------------------------------
    def _maybe_flush(self) -> None:
        if len(self._upserts) + len(self._forget) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> int:
        """Write the queued decisions; returns how many rows changed."""
        n = len(self._upserts) + len(self._forget)
        if not self.dry_run:
            self.ledger.upsert_many(self._upserts)
            self.ledger.delete_rows(self._forget)
        self._upserts.clear()
        self._forget.clear()
        return n


def maybe_remote(row: Row) -> bool:
    """The remote holds this path, or may: an upload in flight, or one a crash cut off (`probe`).
    A deletion of such a file must reach the remote too, or its object would be left behind
    with no ledger row (and a file missing at start is restored, SPEC §4.5).

    In flight means leased, not only `uploading`: a change seen during the upload sets the row
    back to `pending` while the worker's PUT still runs, and that PUT can land after the deletion
    is recorded (the deletion row waits for the lease, so it deletes what landed)."""
    return (row["remote_sha256"] is not None or bool(row["probe"]) or row["state"] == "uploading"
            or (row["op"] == "put" and row.get("lease_until") is not None))


def deletion_fields(row: Row, on_delete: str, now: float) -> Row:
    """The row update for a file deleted locally while running (SPEC §4.5)."""
    # the key too: if a worker dropped the row meanwhile (its file vanished), this re-creates it
    base = {"watch": row["watch"], "path": row["path"], "key": row["key"], "updated_at": now, "attempts": 0,
            "last_error": None, "error_kind": None}
    if not maybe_remote(row):
        # queued_at marks remote deletions only: the max_deletes cap counts them
        return {**base, "state": "deleted", "op": None, "queued_at": None}
    if on_delete == "keep":
        # the remote keeps the object and a tombstone of the deletion (SPEC §4.5): not a remote
        # deletion (no queued_at, no cap), but remote work all the same, retried through the ledger
        return {**base, "state": "deleting", "op": "tomb", "tomb": 1, "due_at": now, "queued_at": None}
    return {**base, "state": "deleting", "op": "delete" if on_delete == "mirror" else "trash",
            "due_at": now, "queued_at": now}
