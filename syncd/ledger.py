"""The SQLite ledger: the single source of truth and the durable work queue (SPEC §5).

Every row is one file of one watch. `state` is what users see; the queue columns say what work
the row waits for:

- `op`: `put` (upload), `get` (restore), `delete` / `trash` (remote deletion); NULL when none.
- `due_at`: not before this time (settling, backoff).
- `lease_until`: set while a worker holds the row; cleared on finish and at startup.
- `gen`: bumped by every outside change (watcher, scanner, retry). A worker's result is only
  applied if `gen` is unchanged since its claim, so a file that changed during its upload is
  simply queued again (SPEC §4.1) and a deletion seen mid-upload is not lost.
- `remote_sha256`: the content known to be at `key` (NULL: nothing, or unknown).
- `probe`: 1 when the remote may already hold this content (crash during upload, ledger rebuilt
  from a listing): the worker asks the remote (HEAD) before it sends anything.
- `remote_etag`: what a listing shows for `key` (its ETag) when this host last synced it; a
  listing that shows something else means the object changed remotely (`syncd.reconcile`).
- `tomb`: 1 when a remote tombstone may exist for the path (SPEC §4.5): an upload lifts it.
- `overwrite`: 1 on a restore (`op='get'`) that may replace the local file, as long as the
  file still has the row's size and mtime (a remote change in a shared watch, SPEC §4.12).
- further ops: `tomb` (write the remote tombstone, `on_delete = "keep"`) and `unlink` (delete
  the local file because its object was deleted remotely, shared watches).
- `recheck`: set (the change's time) when a remote change (an S3 event) met the path busy: the
  path is compared with the remote once free (`syncd.changes`); a worker's result stands.

Writes use `BEGIN IMMEDIATE` (a deferred read-then-write fails at once in WAL mode, PITFALLS
§6) and `synchronous=FULL` (the ledger drives restores and tombstones), all on one writer
connection; workers' concurrent claims and results share commits (group commit). Reads use one
connection per thread.
"""

from __future__ import annotations

import errno
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from syncd.errors import LedgerCorrupt, LedgerError, LedgerUnwritable
from syncd.fsutil import AS_ROOT, give_to_parent_owner, make_dirs
from syncd.guard import PAUSED

SCHEMA_VERSION = 4
STATES = ("pending", "uploading", "synced", "failed", "deleting", "deleted")
QUEUE_STATES = ("pending", "failed", "deleting")
DELETE_OPS = ("delete", "trash", "tomb", "unlink")  # rows in state 'deleting'
# the app's deletions: until the store has them, a host lost with its ledger brings the file back
REMOTE_DELETE_OPS = ("delete", "trash", "tomb")
# claimed a few at a time: small files, and deletions (one bodiless request each, 0 bytes here)
BATCHED = ("put", "get", *REMOTE_DELETE_OPS)
Row = dict[str, Any]
T = TypeVar("T")


def _migrate_1(db: sqlite_utils.Database) -> None:
    db.table("files").create(
        {
            "id": int, "watch": str, "path": str, "size": int, "mtime_ns": int, "sha256": str,
            "state": str, "op": str, "key": str, "attempts": int, "last_error": str,
            "error_kind": str, "updated_at": float, "synced_at": float, "due_at": float,
            "lease_until": float, "gen": int, "remote_sha256": str, "probe": int, "queued_at": float,
        },
        pk="id",
        not_null={"watch", "path", "state", "attempts", "due_at", "gen", "probe"},
        defaults={"attempts": 0, "due_at": 0.0, "gen": 0, "probe": 0},
    )
    db.table("files").create_index(["watch", "path"], unique=True, index_name="files_watch_path")
    db.execute(
        "CREATE INDEX files_queue ON files(due_at) WHERE state IN ('pending','failed','deleting')"
    )
    db.execute("CREATE INDEX files_remote_sha ON files(remote_sha256) WHERE remote_sha256 IS NOT NULL")
    db.table("watches").create(
        {"prefix": str, "path": str, "listed_at": float, "last_reconcile": float,
         "last_reconcile_ok": int},
        pk="prefix",
    )
    db.table("meta").create({"name": str, "value": str}, pk="name")


def _migrate_2(db: sqlite_utils.Database) -> None:
    # counts by state (outstanding work, failures, queued deletions) without reading every row:
    # a full scan per worker per drain filled one page cache per connection and cost O(N) CPU
    db.execute("CREATE INDEX files_state ON files(state, op)")


def _migrate_3(db: sqlite_utils.Database) -> None:
    # the listing reconcile (remote changes without a HEAD per object), remote tombstones and
    # shared watches' guarded replaces
    db.execute("ALTER TABLE files ADD COLUMN remote_etag TEXT")
    db.execute("ALTER TABLE files ADD COLUMN tomb INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE files ADD COLUMN overwrite INTEGER NOT NULL DEFAULT 0")


def _migrate_4(db: sqlite_utils.Database) -> None:
    # remote changes that met their path busy wait on the row, not in memory (syncd.changes)
    db.execute("ALTER TABLE files ADD COLUMN recheck REAL")
    db.execute("CREATE INDEX files_recheck ON files(recheck) WHERE recheck IS NOT NULL")


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_migrate_1, _migrate_2, _migrate_3, _migrate_4]


def recovery_hint(path: Path, config: Path | None = None) -> str:
    """The command that rebuilds a corrupt ledger, naming the config (absolute): run as printed,
    from any directory and without $SYNCD_CONFIG, it must find the same config and ledger."""
    def q(p: object) -> str:  # a shell word, always quoted: the line reads the same for any path
        return "'" + str(p).replace("'", "'\\''") + "'"

    where = f" --config {q(config)}" if config is not None else ""
    return (f"move it aside and rebuild it from a scan and the remote listing: "
            f"mv {q(path)} {q(f'{path}.corrupt')} && syncd{where} resync")


def is_corrupt(e: BaseException) -> bool:
    """Only SQLite's own verdict makes a ledger corrupt (SQLITE_CORRUPT, SQLITE_NOTADB, or a
    failed integrity check): a full disk or a read-only directory is not, and the recovery for
    corruption (moving the ledger aside) would throw its tombstones away (SPEC §4.11)."""
    code = getattr(e, "sqlite_errorcode", None)
    if code is None:  # raised by syncd itself with quick_check's report
        return isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.OperationalError)
    return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _diagnosis(path: Path, e: BaseException) -> str:
    """What is wrong with the ledger's place, and what to do, for a write or open that failed."""
    code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF
    where = path.parent
    if code == sqlite3.SQLITE_FULL or getattr(e, "errno", None) == errno.ENOSPC:
        return f"the file system of {where} is full; free space there, then run syncd again"
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM) or \
            isinstance(e, PermissionError) or getattr(e, "errno", None) == errno.EROFS:
        for p in (where, path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if p.exists() and not os.access(p, os.W_OK):
                return (f"{p} is not writable by this user (uid {os.getuid() if hasattr(os, 'getuid') else '?'}) "
                        f"or its file system is read-only; fix the permissions or the mount, or set "
                        f"[syncd] ledger to a writable path")
        return "check that its directory is writable and on a mounted, writable file system"
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return "another process keeps it locked; find it (fuser) and stop it"
    if code == sqlite3.SQLITE_IOERR or isinstance(e, OSError):
        return "the disk reported an I/O error (or a size limit): check the disk and its free space (dmesg)"
    return "check the ledger's disk and permissions"


def ledger_failure(path: Path, e: BaseException, doing: str = "written", config: Path | None = None) -> LedgerError:
    """The one-line error for a ledger that cannot be used: corrupt only when SQLite says so."""
    if is_corrupt(e):
        return LedgerCorrupt(f"ledger {path} is corrupt ({e}); {recovery_hint(path, config)}")
    cause = getattr(e, "strerror", None) or str(e)
    return LedgerUnwritable(f"ledger {path} cannot be {doing}: {cause}; {_diagnosis(path, e)}")


# SQLite result codes that say the ledger's file or its place is unusable (not a bug in our SQL)
_FAILURE_CODES = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN,
                  sqlite3.SQLITE_PERM, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_CORRUPT,
                  sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_PROTOCOL}


def is_ledger_failure(e: BaseException) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    return isinstance(e, sqlite3.Error) and code is not None and code & 0xFF in _FAILURE_CODES


def _rollback(db: sqlite_utils.Database) -> None:
    # after SQLITE_FULL or an I/O error SQLite may have rolled the transaction back already
    if db.conn.in_transaction:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass


class _Work:
    """One caller's piece of a group commit."""

    __slots__ = ("fn", "value", "error", "done")

    def __init__(self, fn: Callable[[sqlite_utils.Database], Any]) -> None:
        self.fn = fn
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = False

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value



def put_meta(w: Any, name: str, value: str) -> None:
    """Set meta `name` on `w`, a connection already writing (a transaction under way)."""
    w.execute("INSERT INTO meta(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value=excluded.value",
              [name, value])

class Ledger:
    """Thread-safe handle on the ledger file: each thread reads through its own connection;
    every write goes through one writer connection."""

    def __init__(self, path: str | os.PathLike[str], *, check: bool = True, readonly: bool = False,
                 config: Path | None = None) -> None:
        self.path = Path(path)
        self.config = config  # the config file that names this ledger: its recovery command says it
        # readonly: for `status`, which a user who may only read the ledger can run (no mkdir,
        # no WAL switch, no migration; `immutable` when SQLite cannot make its -shm file)
        self.readonly = readonly
        self._ro_query = "mode=ro"
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        # SQLite has one writer; threads of this process queue here (handed over at once)
        # instead of in SQLite's busy handler, which sleeps 1-100 ms between retries
        self._write_lock = threading.RLock()
        self._wdb: sqlite_utils.Database | None = None
        self._group = threading.Condition()  # group commit: see `_grouped`
        self._group_queue: list[_Work] = []
        self._group_leading = False
        # the last write failure (full disk, read-only, I/O error) until a write works again:
        # the daemon's /healthz reason (SPEC §4.11)
        self.failure: str | None = None
        self.failing_since: float | None = None
        if readonly:
            self._open_readonly()
            return
        try:
            make_dirs(self.path.parent)
            if AS_ROOT and not self.path.exists():
                # SQLite run as root gives its -wal and -shm the database file's owner: the file
                # is made here (empty: a valid database) and given away before SQLite opens it
                self.path.touch()
        except OSError as e:
            raise ledger_failure(self.path, e, "created", self.config) from e
        give_to_parent_owner(self.path)  # also one an older syncd left root's (SPEC §4.13)
        try:
            db = self.db
            db.execute("PRAGMA journal_mode=WAL")
            if check:
                bad = db.execute("PRAGMA quick_check").fetchone()[0]
                if bad != "ok":
                    raise sqlite3.DatabaseError(bad)
            self._migrate(db)
            for suffix in ("-wal", "-shm"):
                give_to_parent_owner(self.path.with_name(self.path.name + suffix))
        except (sqlite3.Error, LedgerError) as e:
            self.close()
            if isinstance(e, LedgerError):
                raise
            raise ledger_failure(self.path, e, "opened", self.config) from e

    def _open_readonly(self) -> None:
        for query in ("mode=ro", "mode=ro&immutable=1"):
            self._ro_query = query
            try:
                version = self.db.execute("PRAGMA user_version").fetchone()[0]
                break
            except sqlite3.Error as e:
                self.close()
                code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF
                if query.endswith("immutable=1") or code not in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN):
                    raise ledger_failure(self.path, e, "read", self.config) from e
        if version > SCHEMA_VERSION:
            self.close()
            raise LedgerError(f"ledger {self.path} has schema version {version}, newer than this "
                              f"syncd understands ({SCHEMA_VERSION}); upgrade syncd")

    # --- connections ------------------------------------------------------------------
    def _connect(self, cache_kib: int) -> sqlite_utils.Database:
        if self.readonly:
            uri = f"{Path(os.path.abspath(self.path)).as_uri()}?{self._ro_query}"
            conn = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None, check_same_thread=False)
        else:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=60000")
        conn.execute(f"PRAGMA cache_size=-{cache_kib}")
        with self._lock:
            self._all.append(conn)
        # no sqlite-utils plugins on the ledger (and no entry-point scan at every start)
        return sqlite_utils.Database(conn, execute_plugins=False)

    @property
    def db(self) -> sqlite_utils.Database:
        """The calling thread's connection, for reads (rows are read once, by index: a small
        cache keeps RSS flat)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect(cache_kib=256)
        return db

    def _writer(self) -> sqlite_utils.Database:
        """The one connection every write goes through (under `_write_lock`). Its page cache
        stays valid from one transaction to the next: a connection whose cache another one's
        commit invalidated re-reads the pages it touches (70 reads per restored file with one
        writing connection per worker)."""
        if self._wdb is None:
            self._wdb = self._connect(cache_kib=2048)
        return self._wdb

    def close_thread(self) -> None:
        """Close the calling thread's connection (worker threads call this when they end)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            with self._lock:
                if db.conn in self._all:
                    self._all.remove(db.conn)
            db.conn.close()
            self._local.db = None

    def close(self) -> None:
        with self._write_lock, self._lock:
            for c in self._all:
                try:
                    c.close()
                except sqlite3.Error:
                    pass
            self._all.clear()
        self._local = threading.local()
        self._wdb = None

    @contextmanager
    def write(self) -> Iterator[sqlite_utils.Database]:
        """One IMMEDIATE transaction, on the writer connection (read inside it through the
        connection it yields: other connections do not see its changes before the commit)."""
        with self._write_lock:
            try:
                db = self._writer()
                db.execute("BEGIN IMMEDIATE")
                changes = db.conn.total_changes
            except sqlite3.Error as e:
                raise self._failed(e) from e
            try:
                yield db
            except BaseException as e:
                _rollback(db)
                if is_ledger_failure(e):
                    raise self._failed(e) from e
                raise
            try:
                db.execute("COMMIT")
            except sqlite3.Error as e:
                _rollback(db)
                raise self._failed(e) from e
            if self.failure is not None and db.conn.total_changes != changes:
                self.failure = self.failing_since = None  # a real write worked again

    def _failed(self, e: BaseException, doing: str = "written") -> BaseException:
        """A sqlite error of the ledger's file (not of syncd's SQL) as the one-line LedgerError."""
        if not is_ledger_failure(e):
            return e
        err = ledger_failure(self.path, e, doing, self.config)
        if self.failure is None:
            self.failing_since = time.time()
        self.failure = str(err)
        return err

    def _grouped(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        """Run `fn` in a write transaction shared with the calls other threads make meanwhile.

        Group commit: workers finishing and claiming at the same time share one COMMIT (one
        fsync) instead of queueing for one each. The first caller leads: it takes everything
        queued, runs each piece in its own savepoint (one failing piece does not undo the
        others) and commits; callers arriving meanwhile form the next group. Every caller
        returns only once its work is committed, exactly as with `write()`."""
        work = _Work(fn)
        with self._group:
            self._group_queue.append(work)
            while self._group_leading and not work.done:
                self._group.wait()
            if work.done:
                return work.result()
            self._group_leading = True
            batch, self._group_queue = self._group_queue, []
        try:
            with self.write() as w:
                for item in batch:
                    w.execute("SAVEPOINT piece")
                    try:
                        item.value = item.fn(w)
                    except BaseException as e:  # noqa: BLE001 - handed to the caller it belongs to
                        if is_ledger_failure(e):
                            raise  # the file cannot be written: the whole group fails with it
                        w.execute("ROLLBACK TO piece")
                        item.error = e
                    w.execute("RELEASE piece")
        except BaseException as e:  # noqa: BLE001 - the commit failed: nothing of the group stands
            for item in batch:
                item.error, item.value = e, None
        finally:
            with self._group:
                for item in batch:
                    item.done = True
                self._group_leading = False
                self._group.notify_all()
        return work.result()

    def _migrate(self, db: sqlite_utils.Database) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise LedgerError(f"ledger {self.path} has schema version {version}, newer than this "
                              f"syncd understands ({SCHEMA_VERSION}); upgrade syncd")
        while version < SCHEMA_VERSION:
            with self.write() as w:
                MIGRATIONS[version](w)
                version += 1
                w.execute(f"PRAGMA user_version={version}")

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Row]:
        try:
            return list(self.db.query(sql, params))
        except sqlite3.Error as e:
            raise self._failed(e, "read") from e

    # --- watches and meta -------------------------------------------------------------
    def ensure_watch(self, prefix: str, path: str) -> Row:
        with self.write() as w:
            w.execute("INSERT INTO watches(prefix, path) VALUES (?, ?) "
                      "ON CONFLICT(prefix) DO UPDATE SET path=excluded.path", [prefix, path])
        return self.query("SELECT * FROM watches WHERE prefix=?", [prefix])[0]

    def set_watch(self, prefix: str, **fields: Any) -> None:
        sets = ", ".join(f"{k}=?" for k in fields)
        with self.write() as w:
            w.execute(f"UPDATE watches SET {sets} WHERE prefix=?", [*fields.values(), prefix])

    def get_meta(self, name: str, default: str | None = None) -> str | None:
        rows = self.query("SELECT value FROM meta WHERE name=?", [name])
        return rows[0]["value"] if rows else default

    def set_meta(self, name: str, value: str | None) -> None:
        with self.write() as w:
            if value is None:
                w.execute("DELETE FROM meta WHERE name=?", [name])
            else:
                put_meta(w, name, value)

    def describe_remote(self, identity: str, key_bases: dict[str, str]) -> tuple[str, int] | None:
        """Make the rows describe the remote `identity` (meta `remote`); `key_bases`: watch prefix ->
        the key base of its objects there.

        A ledger that described another remote treats this one as new: keys are recomputed,
        what it knew of the old remote is forgotten (remote_sha256, probe, the synced state: synced
        files are queued to be compared and uploaded) and every watch is listed again. A ledger
        from before the remote was recorded is taken to describe this one when its keys fit.
        Returns (the old remote, rows queued again) when it changed, else None."""
        now = time.time()
        fit = "key = CASE WHEN ?='' THEN path ELSE ? || '/' || path END"
        with self.write() as w:
            got = w.execute("SELECT value FROM meta WHERE name='remote'").fetchone()
            old = got[0] if got else None
            record = ("INSERT INTO meta(name, value) VALUES ('remote', ?) "
                      "ON CONFLICT(name) DO UPDATE SET value=excluded.value")
            if old == identity:
                return None
            if old is None and not any(
                    w.execute(f"SELECT 1 FROM files WHERE watch=? AND key IS NOT NULL AND NOT ({fit}) LIMIT 1",
                              [watch, base, base]).fetchone() for watch, base in key_bases.items()):
                w.execute(record, [identity])
                return None
            requeued = w.execute("SELECT count(*) FROM files WHERE state='synced'").fetchone()[0]
            w.execute(
                "UPDATE files SET remote_sha256=NULL, remote_etag=NULL, tomb=0, sha256=NULL, "
                "probe=CASE WHEN op='get' THEN 1 ELSE 0 END, "
                "op=CASE WHEN state='synced' THEN 'put' ELSE op END, "
                "attempts=CASE WHEN state='synced' THEN 0 ELSE attempts END, "
                "due_at=CASE WHEN state='synced' THEN ? ELSE due_at END, "
                "queued_at=CASE WHEN state='synced' THEN ? ELSE queued_at END, "
                "state=CASE WHEN state='synced' THEN 'pending' ELSE state END, updated_at=?, gen=gen+1",
                [now, now, now])
            for watch, base in key_bases.items():
                w.execute(f"UPDATE files SET {fit} WHERE watch=? AND key IS NOT NULL", [base, base, watch])
            w.execute("UPDATE watches SET listed_at=NULL")
            w.execute(record, [identity])
            return old or "unknown", requeued

    # --- rows ---------------------------------------------------------------------------
    def get(self, watch: str, path: str) -> Row | None:
        rows = self.query("SELECT * FROM files WHERE watch=? AND path=?", [watch, path])
        return rows[0] if rows else None

    def page(self, watch: str, after: str | None, limit: int = 1000) -> list[Row]:
        """Rows of a watch in path order (binary collation), after `after`: for merge joins."""
        if after is None:
            return self.query("SELECT * FROM files WHERE watch=? ORDER BY path LIMIT ?", [watch, limit])
        return self.query("SELECT * FROM files WHERE watch=? AND path>? ORDER BY path LIMIT ?",
                          [watch, after, limit])

    def iter_rows(self, watch: str, where: str = "1", params: Iterable[Any] = (),
                  batch: int = 1000) -> Iterator[Row]:
        """Stream rows of a watch matching `where`, in pages (bounded memory)."""
        last = -1
        params = list(params)
        while True:
            rows = self.query(f"SELECT * FROM files WHERE watch=? AND id>? AND ({where}) "
                              f"ORDER BY id LIMIT ?", [watch, last, *params, batch])
            if not rows:
                return
            yield from rows
            last = rows[-1]["id"]

    def upsert_many(self, rows: list[Row]) -> None:
        """Insert or update rows by (watch, path), each bumping `gen`; one transaction."""
        if not rows:
            return
        with self.write() as w:
            for r in rows:
                cols = list(r)
                sets = ", ".join(f"{c}=excluded.{c}" for c in cols if c not in ("watch", "path"))
                w.execute(
                    f"INSERT INTO files({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)}) "
                    f"ON CONFLICT(watch, path) DO UPDATE SET {sets}, gen=gen+1",
                    [r[c] for c in cols],
                )

    def delete_rows(self, ids: list[int]) -> None:
        if not ids:
            return
        with self.write() as w:
            w.conn.executemany("DELETE FROM files WHERE id=?", [(i,) for i in ids])

    def update(self, row_id: int, **fields: Any) -> None:
        """An outside change: bumps gen so an in-flight worker does not overwrite it."""
        sets = ", ".join(f"{k}=?" for k in fields)
        with self.write() as w:
            w.execute(f"UPDATE files SET {sets}, gen=gen+1 WHERE id=?", [*fields.values(), row_id])

    # --- the queue ------------------------------------------------------------------------
    def recover(self) -> int:
        """At startup: release leases of a crashed run; uploads in flight are probed first."""
        now = time.time()
        with self.write() as w:
            cur = w.execute(
                "UPDATE files SET lease_until=NULL, probe=CASE WHEN state='uploading' THEN 1 ELSE probe END, "
                "state=CASE WHEN state='uploading' THEN 'pending' ELSE state END, updated_at=? "
                "WHERE lease_until IS NOT NULL OR state='uploading'", [now])
            return cur.rowcount

    def recover_after_failure(self) -> int:
        """`recover`, once more after a checkpoint if the first try failed: after a full disk,
        the emptied WAL is space this small write can reuse (raises LedgerError otherwise)."""
        try:
            return self.recover()
        except LedgerError:
            self.checkpoint()
            return self.recover()

    def checkpoint(self) -> bool:
        """Copy the WAL into the database and empty it (TRUNCATE); False when that failed.

        After a full disk, an emptied WAL is space a small write can reuse."""
        with self._write_lock:
            try:
                busy = self._writer().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                return not busy
            except sqlite3.Error:
                return False

    def release(self, ids: Iterable[int]) -> None:
        """Give back rows claimed by workers whose results could not be written: queued again,
        probed first (an upload may have reached the remote), as `recover` does at startup."""
        ids = list(ids)
        if not ids:
            return
        now = time.time()
        with self.write() as w:
            w.conn.executemany(
                "UPDATE files SET lease_until=NULL, probe=CASE WHEN state='uploading' THEN 1 ELSE probe END, "
                "state=CASE WHEN state='uploading' THEN 'pending' ELSE state END, updated_at=? WHERE id=?",
                [(now, i) for i in ids])

    def claim(self, ops: tuple[str, ...], now: float, lease: float = 600.0, limit: int = 1,
              batch_bytes: int = 0, share: int = 1, fresh: float = 0.0, fresh_only: bool = False,
              max_size: int | None = None) -> list[Row]:
        """Atomically take due rows whose op is in `ops`: the first due row, then (up to `limit`
        rows in all, and no more than a `share`-th of what is due, so that `share` workers all
        get some) the next uploads, restores or deletions while their sizes (0 for a deletion)
        add up to at most `batch_bytes`. Small files and deletions are claimed a few at a time
        (fewer write transactions, sent at once by the lane); a large file is claimed alone.

        Fresh work first (`fresh` seconds): uploads that became due and were queued within that
        time, and deletions seen within it and not tried yet, the newest first, ahead of older
        work by `due_at` (a catch-up backlog): what the app has just closed or deleted reaches
        the remote first (SPEC §4.1). `fresh_only`: no other rows; `max_size`: no upload or
        restore larger than this."""
        marks = ",".join("?" for _ in ops)
        sized = " AND (op NOT IN ('put','get') OR size IS NULL OR size<=?)" if max_size is not None else ""
        size_args = [max_size] if max_size is not None else []
        where = (f"WHERE state IN ('pending','failed','deleting') AND due_at<=? AND lease_until IS NULL "
                 f"AND op IN ({marks}){sized}")
        deletions = ",".join(f"'{op}'" for op in REMOTE_DELETE_OPS)

        def take(w: sqlite_utils.Database) -> list[Row]:
            want = limit * share
            due: list[tuple[int, int | None, str]] = []
            if fresh:  # a range of the due_at index (named: SQLite prefers files_state, the whole backlog)
                # a deletion's due_at is when it was seen; a failed one is a retry, not fresh
                due = w.execute(f"SELECT id, size, op FROM files INDEXED BY files_queue {where} AND due_at>? "
                                f"AND ((op='put' AND queued_at>=?) OR (op IN ({deletions}) AND attempts=0)) "
                                f"ORDER BY due_at DESC LIMIT ?",
                                [now, *ops, *size_args, now - fresh, now - fresh, want]).fetchall()
            if not fresh_only and len(due) < want:
                taken = {r[0] for r in due}
                rest = w.execute(f"SELECT id, size, op FROM files {where} ORDER BY due_at LIMIT ?",
                                 [now, *ops, *size_args, want]).fetchall()
                due += [r for r in rest if r[0] not in taken][:want - len(due)]
            fair = max(1, math.ceil(len(due) / share))
            ids: list[int] = []
            total = 0
            for row_id, size, op in due[:fair]:
                total += 0 if op in REMOTE_DELETE_OPS else size or 0
                if ids and (op not in BATCHED or total > batch_bytes):
                    break
                ids.append(row_id)
                if op not in BATCHED:
                    break
            if not ids:
                return []
            cur = w.execute(
                f"UPDATE files SET lease_until=?, "
                f"state=CASE WHEN op='put' THEN 'uploading' ELSE state END, updated_at=? "
                f"WHERE id IN ({','.join('?' for _ in ids)}) RETURNING *",
                [now + lease, now, *ids],
            )
            cols = [d[0] for d in cur.description]
            rows = {r["id"]: r for r in (dict(zip(cols, t, strict=True)) for t in cur.fetchall())}
            return [rows[i] for i in ids]

        return self._grouped(take)

    def finish(self, row: Row, *, still_op: str | None = None, hold: bool = False, **fields: Any) -> bool:
        """Apply a worker's result if nobody changed the row meanwhile (and, with `still_op`, its
        op is still that one); release it, except with `hold` when the result was applied (the
        worker still has a step to take: it lets go with `let_go`).

        Returns False when the row changed during the work (the outside change stands; only
        facts about the remote are kept from the result: `remote_sha256`, `remote_etag`, and
        `probe` when it says the remote may hold an upload).
        """
        now = time.time()
        fields.setdefault("updated_at", now)
        sets = ", ".join(f"{k}=?" for k in fields)
        op_check = " AND op=?" if still_op is not None else ""

        def apply(w: sqlite_utils.Database) -> bool:
            lease = "" if hold else ", lease_until=NULL"
            cur = w.execute(f"UPDATE files SET {sets}{lease} WHERE id=? AND gen=?{op_check}",
                            [*fields.values(), row["id"], row["gen"], *([still_op] if still_op else [])])
            if cur.rowcount:
                return True
            extra: dict[str, Any] = {k: fields[k] for k in ("remote_sha256", "remote_etag") if k in fields}
            if fields.get("probe") == 1:
                extra["probe"] = 1  # the remote may hold an upload whose answer was lost
            keep = "".join(f", {k}=?" for k in extra)
            # only the worker's own lease ends: one taken since it expired (an on-demand restore
            # of /files/ holding the path until its rename) stays with its holder
            w.execute(
                f"UPDATE files SET lease_until=CASE WHEN lease_until IS ? THEN NULL ELSE lease_until END, "
                f"state=CASE WHEN state='uploading' THEN 'pending' ELSE state END{keep} WHERE id=?",
                [row.get("lease_until"), *extra.values(), row["id"]])
            return False

        return self._grouped(apply)

    def let_go(self, row_id: int, *, until: float | None = None) -> None:
        """End a lease `finish(hold=True)` kept (the result stands as it was recorded); with
        `until`, only the lease that ends then (the caller's own: not one taken since it expired)."""
        mine = "" if until is None else " AND lease_until=?"
        self._grouped(lambda w: w.execute(f"UPDATE files SET lease_until=NULL WHERE id=?{mine}",
                                          [row_id, *([until] if until is not None else [])]))

    def forget(self, row: Row) -> bool:
        """Drop a row if nobody changed it meanwhile (a file that vanished before it was ever
        uploaded); one a remote change waits for (`recheck`) stays, as a deletion, to be judged."""

        def drop(w: sqlite_utils.Database) -> bool:
            cur = w.execute("DELETE FROM files WHERE id=? AND gen=? AND recheck IS NULL", [row["id"], row["gen"]])
            if cur.rowcount:
                return True
            cur = w.execute("UPDATE files SET state='deleted', op=NULL, lease_until=NULL, gen=gen+1 "
                            "WHERE id=? AND gen=? AND recheck IS NOT NULL", [row["id"], row["gen"]])
            if not cur.rowcount:
                w.execute("UPDATE files SET lease_until=NULL WHERE id=?", [row["id"]])
            return bool(cur.rowcount)

        return self._grouped(drop)

    def requeue_failed(self, watch: str | None = None, path: str | None = None) -> int:
        """`syncd retry`: failed rows are due now with a fresh attempt count.

        `path` selects one file or everything under a directory. Names that cannot be keys stay
        failed (retrying cannot help); a failed restore whose object was gone is tried again.
        """
        where, params = ["state='failed'", "error_kind IS NOT 'name'"], []
        if watch is not None:
            where.append("watch=?")
            params.append(watch)
        if path:
            where.append("(path=? OR (path>=? AND path<?))")
            params += [path, path + "/", path + "0"]  # "0" sorts right after "/"
        now = time.time()
        with self.write() as w:
            cur = w.execute(
                "UPDATE files SET state=CASE WHEN op IN ('delete','trash','tomb','unlink') THEN 'deleting' "
                "ELSE 'pending' END, "
                "op=COALESCE(op, 'get'), attempts=0, due_at=0, queued_at=?, updated_at=?, gen=gen+1 "
                f"WHERE {' AND '.join(where)}", [now, now, *params])
            return cur.rowcount

    def next_due(self, ops: tuple[str, ...], after: float | None = None) -> float | None:
        """When the next row for `ops` is due (`after`: the first one due later than that)."""
        marks = ",".join("?" for _ in ops)
        later = " AND due_at>?" if after is not None else ""
        rows = self.query(
            f"SELECT min(due_at) AS d FROM files{' INDEXED BY files_queue' if later else ''} "
            f"WHERE state IN ('pending','failed','deleting') "
            f"AND lease_until IS NULL AND op IN ({marks}){later}", [*ops, *([after] if after is not None else [])])
        return rows[0]["d"]

    def outstanding(self, ops: tuple[str, ...], include_failed: bool = False) -> int:
        """Rows with work left (queued or in flight) for `ops`; local deletions paused by the
        mass-deletion guard have none until a listing or `syncd retry --deletes` (syncd.guard)."""
        states = "'pending','uploading','deleting'" + (",'failed'" if include_failed else "")
        marks = ",".join("?" for _ in ops)
        return self.query(f"SELECT count(*) AS n FROM files WHERE op IN ({marks}) AND state IN ({states}) "
                          f"AND due_at<?", [*ops, PAUSED])[0]["n"]

    def find_remote_copy(self, sha256: str, exclude_id: int) -> Row | None:
        """Another row whose key holds this content: a server-side copy source (renames, duplicates)."""
        rows = self.query("SELECT * FROM files WHERE remote_sha256=? AND id!=? AND key IS NOT NULL LIMIT 1",
                          [sha256, exclude_id])
        return rows[0] if rows else None

    def copy_may_need(self, row: Row) -> bool:
        """An upload is queued or in flight that may copy from `row`'s key: one of the same size
        whose content is not known to be remote yet (a rename's new path, SPEC §4.8). The
        deletion of `row`'s key waits for it, or the copy would find the source gone."""
        rows = self.query(
            "SELECT 1 FROM files WHERE op='put' AND state IN ('pending','uploading') AND size=? "
            "AND id!=? AND remote_sha256 IS NOT ? LIMIT 1", [row["size"], row["id"], row["remote_sha256"]])
        return bool(rows)

    # --- reporting --------------------------------------------------------------------------
    def counts(self, watch: str) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for r in self.query("SELECT state, count(*) AS n FROM files WHERE watch=? GROUP BY state", [watch]):
            out[r["state"]] = r["n"]
        return out

    def failures(self, watch: str, limit: int = 20) -> tuple[list[Row], int]:
        rows = self.query("SELECT path, last_error, attempts, updated_at, op FROM files "
                          "WHERE watch=? AND state='failed' ORDER BY updated_at DESC LIMIT ?", [watch, limit])
        total = self.query("SELECT count(*) AS n FROM files WHERE watch=? AND state='failed'", [watch])[0]["n"]
        return rows, total

    def oldest_pending(self, watch: str) -> float | None:
        """When the oldest row still waiting for work entered the queue (seconds since epoch)."""
        rows = self.query("SELECT min(queued_at) AS t FROM files WHERE watch=? AND state IN "
                          "('pending','uploading','deleting')", [watch])
        return rows[0]["t"]

    def last_success(self, watch: str) -> float | None:
        return self.query("SELECT max(synced_at) AS t FROM files WHERE watch=?", [watch])[0]["t"]
