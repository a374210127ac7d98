"""`GET/HEAD /files/<watch prefix>/<path>` (SPEC §6): a file from disk, or restored on the spot.

A request path is checked before anything touches the disk: it must decode (percent-encoding,
UTF-8) to a safe key — no `..` or `.` or empty segments, not absolute, no backslash, NUL, drive
letter or encoded slash (400) — and name a file the watch keeps (403 for excluded names and
syncd's own objects). The local file is opened without following symlinks on the way
(`O_NOFOLLOW` one directory at a time, unless `follow_symlinks`, and then only to a target
inside the watch root), so nothing outside the root is ever read.

A file missing locally is restored first, exactly as at start (`restore.fetch`: temp file,
checked against `syncd-sha256`, fsync, no-clobber rename) and recorded as synced in the same
step, so the restore queue skips it and the watcher does not upload it back; the row stays leased
(the path busy) from that record until the file is at its name, so a remote change seen in
between waits for the path instead of finding a synced row and no file. Concurrent requests
for one file wait for a single download (`_inflight`); a file queued for restore is leased ahead
of the queue (no worker starts it meanwhile), and one a worker is already restoring is waited
for, not downloaded twice. Ledger tombstones (`deleted` rows) hide a file; for a file the ledger
does not know (a lost ledger, before its listing), so does a remote tombstone at least as new as
the object (`remote_tombstone_hides`). The body is sent from the open file with `sendfile`
(never held in memory).
"""

from __future__ import annotations

import errno
import logging
import mimetypes
import os
import stat as st_mod
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote

from syncd import tombstones
from syncd.access import HANGUPS
from syncd.config import Config, WatchConfig
from syncd.keys import UnsafeKey, is_reserved, join_key, key_problem, rel_from_key
from syncd.ledger import Ledger
from syncd.names import shown
from syncd.patterns import Filter
from syncd.remote.base import (
    LOCAL,
    NOT_FOUND,
    TRANSIENT,
    UNREACHABLE,
    ObjectInfo,
    Remote,
    RemoteError,
)
from syncd.restore import Restored, fetch, safe_target
from syncd.retry import call as retry_call
from syncd.transfers import Stats

log = logging.getLogger(__name__)
ROUTE = "/files/"
TOMBSTONE_DIR = ".syncd"  # <watch prefix>/.syncd/tombstones/... (SPEC §4.5): never served
TOMBSTONES = ".syncd/tombstones"
REQUEST_ATTEMPTS = 3  # transient remote errors during a request: a few quick tries, then 503
HIDDEN = ("deleted", "deleting")  # ledger tombstones (SPEC §4.5)
QUEUE_WAIT = 300.0  # longest wait for a restore worker already downloading the file
QUEUE_POLL = 0.05
PUBLISH_GRACE = 5.0  # a worker's restore is recorded just before its rename: the file is due
_DIR_FD = os.open in os.supports_dir_fd and os.stat in os.supports_dir_fd and hasattr(os, "O_NOFOLLOW")


class Refusal(Exception):
    """A request that gets an error answer: `status` and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class _Lease:
    """The row lease an on-demand restore holds: taken ahead of the queue (`_hold`), or by its
    record (`_record`) until the file is at its name; `until` is its expiry, which the release
    checks (a lease someone took after ours expired is theirs)."""

    row_id: int | None = None
    until: float = 0.0


@dataclass
class Opened:
    """A regular file open for reading, with the stat taken from the open descriptor."""

    file: BinaryIO
    size: int
    mtime: float
    name: str


def parse(route: str) -> str:
    """The decoded `<watch prefix>/<path>` of a `/files/...` request path, or Refusal(400)."""
    raw = route[len(ROUTE):]
    if "%2f" in raw.lower():  # an encoded slash would smuggle a separator past the segment checks
        raise Refusal(400, "encoded slash (%2F) in the path")
    try:
        text = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise Refusal(400, "the path is not valid UTF-8") from None
    try:
        rel_from_key(text, "")  # `..`, `.`, empty segments, absolute, backslash, NUL, drive letters
    except UnsafeKey as e:
        raise Refusal(400, f"not a safe path: {e}") from None
    if problem := key_problem(text):
        raise Refusal(400, problem)
    return text


def open_local(root: Path, rel: str, *, follow_symlinks: bool) -> Opened | None:
    """Open `root/rel` for reading if it is a regular file; None when it does not exist.

    Refusal(403) for a symlink that is not followed (anywhere on the way) and for anything that
    is not a regular file. Without `follow_symlinks` (and where the OS allows) the path is walked
    with `O_NOFOLLOW` one directory at a time, so a symlink swapped in meanwhile cannot lead out.
    """
    if follow_symlinks or not _DIR_FD:
        return _open_checked(root, rel, follow_symlinks=follow_symlinks)
    parts = rel.split("/")
    dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for seg in parts[:-1]:
            try:
                nfd = os.open(seg, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
            except FileNotFoundError:
                return None
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    _refuse_entry(os.stat(seg, dir_fd=dfd, follow_symlinks=False))
                    return None  # a regular file where the path needs a directory
                raise
            os.close(dfd)
            dfd = nfd
        try:
            st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        _refuse_entry(st)
        # O_NONBLOCK: a fifo swapped in after the stat must not hang the request thread
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        return None
    finally:
        os.close(dfd)
    return _opened(fd, parts[-1])


def _refuse_entry(st: os.stat_result) -> None:
    if st_mod.S_ISLNK(st.st_mode):
        raise Refusal(403, "a symlink (not followed: follow_symlinks = false)")
    if not st_mod.S_ISREG(st.st_mode):
        raise Refusal(403, "not a regular file")


def _open_checked(root: Path, rel: str, *, follow_symlinks: bool) -> Opened | None:
    """Where symlinks are followed (or the OS has no dir_fd): resolve, and keep to the root."""
    try:
        safe_target(root, rel, follow_symlinks=follow_symlinks, create=False)
    except UnsafeKey as e:
        raise Refusal(403, str(e)) from None
    path = root.joinpath(*rel.split("/"))
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if st_mod.S_ISLNK(st.st_mode):
        if not follow_symlinks:
            _refuse_entry(st)
        real_root, real = os.path.realpath(root), os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root:
            raise Refusal(403, "a symlink that leads outside the watch root")
        try:
            st = os.stat(real)
        except FileNotFoundError:
            return None
        path = Path(real)
    _refuse_entry(st)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        return None
    return _opened(fd, path.name)


def _opened(fd: int, name: str) -> Opened:
    st = os.fstat(fd)
    if not st_mod.S_ISREG(st.st_mode):  # swapped between the stat and the open
        os.close(fd)
        raise Refusal(403, "not a regular file")
    return Opened(file=os.fdopen(fd, "rb"), size=st.st_size, mtime=st.st_mtime, name=name)


class FileServer:
    """Answers `/files/` requests for the watches of `cfg`.

    `tombstoned(watch, rel, obj)`: whether a remote tombstone (`.syncd/tombstones/`, SPEC §4.5)
    hides the object `obj` (its HEAD); asked before an on-demand restore of a file the ledger
    has no row for (a row is this host's own knowledge: `deleted` rows hide the file, others
    do not). Default: `remote_tombstone_hides`.

    `restoring(row_id)`: whether a restore worker has started that row's download
    (`Transfers.restoring`). A row a worker has only claimed in its batch is then not waited
    for: the request restores it ahead of the batch, and the worker skips it when it gets there.
    Without it, a request waits for whichever worker holds the row.
    """

    def __init__(self, cfg: Config, ledger: Ledger, remote: Remote, stats: Stats, *,
                 stop: threading.Event | None = None,
                 tombstoned: Callable[[WatchConfig, str, ObjectInfo], bool] | None = None,
                 restoring: Callable[[int], bool] | None = None) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.remote = remote
        self.stats = stats
        self.stop = stop
        self.tombstoned = tombstoned or self.remote_tombstone_hides
        self.restoring = restoring
        # longest prefix first: "a/b" must win over "a" (prefixes never overlap, but "" may exist)
        self._watches = sorted(cfg.watches, key=lambda w: len(w.prefix), reverse=True)
        self._filters = {w.prefix: Filter(w.include, w.exclude) for w in cfg.watches}
        mimetypes.init()  # once, here: the lazy first-use initialisation is not thread-safe
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, str], Future[str]] = {}
        self.served: Counter[str] = Counter()  # source ("disk" | "remote") -> answers

    # --- the request ----------------------------------------------------------------------
    def serve(self, handler: BaseHTTPRequestHandler, route: str) -> None:
        """Answer one GET or HEAD for `route` (the request path without its query)."""
        head = handler.command == "HEAD"
        try:
            opened, source = self.open(route)
        except Refusal as e:
            body = f"{e}\n".encode()
            handler.send_response(e.status)
            handler.send_header("Content-Type", "text/plain; charset=utf-8")
            handler.send_header("Content-Length", str(len(body)))
            if e.status == 503:
                handler.send_header("Retry-After", "5")
            handler.end_headers()
            if not head:
                handler.wfile.write(body)
            return
        with opened.file as f:
            ctype = mimetypes.guess_type(opened.name)[0] or "application/octet-stream"
            handler.send_response(200)
            handler.send_header("Content-Type", ctype)
            handler.send_header("Content-Length", str(opened.size))
            handler.send_header("Last-Modified", formatdate(opened.mtime, usegmt=True))
            handler.end_headers()
            with self._lock:
                self.served[source] += 1
            if not head:
                self._send(handler, f, opened.size, route)

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, f: BinaryIO, size: int, what: str) -> None:
        handler.wfile.flush()
        try:
            sent = handler.connection.sendfile(f, 0, size)  # zero-copy; falls back to send() chunks
        except OSError as e:  # the client went away, or the disk failed mid-file: headers are out
            if not isinstance(e, HANGUPS):
                log.warning("files: sending %s failed: %s", shown(what), e)
            handler.close_connection = True
            return
        if sent != size:  # truncated while we sent it: the client sees a short body, not a wrong one
            log.warning("files: %s shrank while being sent (%d of %d bytes)", shown(what), sent, size)
            handler.close_connection = True

    def open(self, route: str) -> tuple[Opened, str]:
        """The open file for a `/files/...` path and where it came from ("disk" | "remote"),
        restoring it first when only the remote has it. Raises Refusal."""
        watch, rel = self.locate(parse(route))
        if not watch.path.is_dir():
            raise Refusal(503, f"watch root {watch.path} is missing or unmounted")
        try:
            opened = open_local(watch.path, rel, follow_symlinks=watch.follow_symlinks)
            if opened is not None:
                return opened, "disk"
            source = self.restore(watch, rel)
            opened = open_local(watch.path, rel, follow_symlinks=watch.follow_symlinks)
        except PermissionError:
            raise Refusal(403, "permission denied on the local file system") from None
        if opened is None:  # deleted again right after it was restored
            raise Refusal(404, "not found")
        return opened, source

    def locate(self, text: str) -> tuple[WatchConfig, str]:
        """The watch and the relative path of a decoded `<watch prefix>/<path>`."""
        for w in self._watches:
            if text == w.prefix:
                raise Refusal(404, "not a file: the watch itself")
            if w.prefix and not text.startswith(w.prefix + "/"):
                continue
            rel = text[len(w.prefix) + 1:] if w.prefix else text
            if is_reserved(rel) or rel.split("/", 1)[0] == TOMBSTONE_DIR:
                raise Refusal(403, "syncd's own objects are not served")
            if not self._filters[w.prefix].wants(rel):
                raise Refusal(403, f"excluded by the include/exclude patterns of watch {w.prefix!r}")
            return w, rel
        raise Refusal(404, "no watch has this prefix")

    # --- on-demand restore ----------------------------------------------------------------
    def restore(self, watch: WatchConfig, rel: str) -> str:
        """Restore one missing file, sharing the download with concurrent requests for it.
        Returns the answer's source: "remote" (or "disk" when it appeared locally meanwhile)."""
        k = (watch.prefix, rel)
        with self._lock:
            fut = self._inflight.get(k)
            leader = fut is None
            if fut is None:
                fut = self._inflight[k] = Future()
        if not leader:
            return fut.result()  # raises the leader's Refusal too
        try:
            fut.set_result(self._restore(watch, rel))
        except BaseException as e:  # noqa: BLE001 - handed to every waiter, then raised here
            fut.set_exception(e)
        finally:
            with self._lock:
                del self._inflight[k]
        return fut.result()

    def _restore(self, watch: WatchConfig, rel: str) -> str:
        if os.path.lexists(watch.path.joinpath(*rel.split("/"))):
            return "disk"  # a download for it ended between our look at the disk and now
        row = self.ledger.get(watch.prefix, rel)
        if row is not None and row["state"] in HIDDEN:
            raise Refusal(404, "not found (deleted by the app: a tombstone hides it)")
        lease = _Lease()  # the row's, while this request holds it
        queued = row is not None and row["op"] == "get"
        just_restored = row is not None and row["state"] == "synced" and row["op"] is None and \
            time.time() - (row["updated_at"] or 0) < PUBLISH_GRACE
        if row is not None and (queued or just_restored):
            # queued for restore: take it ahead of the queue
            if not self._hold(row["id"], lease):  # a restore worker has it, or has just recorded it
                if self._queued_restore_done(watch, rel):
                    return "remote"
                self._hold(row["id"], lease)
        try:
            return self._fetch(watch, rel, known=row is not None, queued=queued, lease=lease)
        finally:
            # the file is at its name (or the restore failed): what waited for the path may go
            if lease.row_id is not None:
                self.ledger.let_go(lease.row_id, until=lease.until)

    def _fetch(self, watch: WatchConfig, rel: str, *, known: bool, queued: bool, lease: _Lease) -> str:
        key = join_key(self.cfg.remote.prefix, watch.prefix, rel)
        t0 = time.monotonic()
        try:
            # ask first: a miss (broken links, scanners) costs a HEAD and creates no directories;
            # not for a queued restore: its listing saw the object and judged its tombstone (the
            # GET answers for both, a round trip sooner)
            if not queued:
                obj = self._remote(lambda: self.remote.head(key))
                if obj is None:
                    raise Refusal(404, "not found (neither on disk nor in the remote)")
                if not known and self._remote(lambda: self.tombstoned(watch, rel, obj)):
                    raise Refusal(404, "not found (deleted by the app: a remote tombstone hides it)")
            target = safe_target(watch.path, rel, follow_symlinks=watch.follow_symlinks)
            res = self._remote(lambda: fetch(self.remote, key, target,
                                             before_publish=lambda r: self._record(watch, rel, key, r, lease)))
        except FileExistsError:
            self._local_appeared(watch, rel)
            return "disk"
        except UnsafeKey as e:
            raise Refusal(403, str(e)) from None
        except RemoteError as e:
            raise self._remote_refusal(watch, rel, e) from None
        if res is None:  # the app deleted it while we downloaded: its tombstone stands
            raise Refusal(404, "not found (deleted by the app meanwhile)")
        self.stats.add(restored=1)
        self.stats.succeeded()
        # one line per transfer is debug (`-v`), as for the workers' restores; the counts are
        # syncd_restores_total and syncd_served_total{source="remote"}
        log.debug("files: restored %s/%s on demand (%d bytes, %.2fs)", watch.prefix, shown(rel), res.size,
                 time.monotonic() - t0)
        return "remote"

    def _hold(self, row_id: int, lease: _Lease) -> bool:
        """Lease a queued restore (as a worker's claim does), so that no worker starts the same
        download meanwhile (into `lease`); False when someone else holds it."""
        now = time.time()
        until = now + QUEUE_WAIT
        with self.ledger.write() as w:
            cur = w.execute("UPDATE files SET lease_until=? WHERE id=? AND op='get' AND state IN ('pending','failed') "
                            "AND (lease_until IS NULL OR lease_until<?)", [until, row_id, now])
            if not cur.rowcount:
                return False
        lease.row_id, lease.until = row_id, until
        return True

    def _queued_restore_done(self, watch: WatchConfig, rel: str) -> bool:
        """A restore worker holds the file's row (its download is under way, or next in its
        batch): wait for it instead of downloading twice. True when the file is there; False
        when the worker let go without it (failed: the request tries itself) or took too long."""
        target = watch.path.joinpath(*rel.split("/"))
        deadline = time.monotonic() + QUEUE_WAIT
        grace: float | None = None
        while not os.path.lexists(target):
            row = self.ledger.get(watch.prefix, rel)
            if row is not None and row["op"] == "get" and (row["lease_until"] or 0) > time.time():
                if self.restoring is not None and not self.restoring(row["id"]):
                    return False  # only claimed in a worker's batch, behind other downloads: go first
                if time.monotonic() > deadline:
                    return False
            elif row is not None and row["state"] == "synced" and row["op"] is None:
                # the worker recorded its restore, which it does just before the rename
                grace = grace if grace is not None else time.monotonic() + PUBLISH_GRACE
                if time.monotonic() > grace:
                    return False
            else:
                return os.path.lexists(target)
            if self.stop is not None and self.stop.wait(QUEUE_POLL):
                return False
            if self.stop is None:
                time.sleep(QUEUE_POLL)
        return True

    def remote_tombstone_hides(self, watch: WatchConfig, rel: str, obj: ObjectInfo) -> bool:
        """SPEC §4.5: a tombstone at `<remote prefix>/<watch prefix>/.syncd/tombstones/<rel>` at
        least as new as the object hides it (no dates to compare: the tombstone wins)."""
        tomb = self.remote.head(join_key(self.cfg.remote.prefix, watch.prefix, TOMBSTONES, rel))
        return tombstones.hides(tomb, obj)  # by the store's times, as the listing judges

    def _remote(self, fn: Callable[[], object]):  # noqa: ANN202 - returns what fn returns
        return retry_call(fn, attempts=REQUEST_ATTEMPTS, stop_event=self.stop)

    def _record(self, watch: WatchConfig, rel: str, key: str, res: Restored, lease: _Lease) -> bool:
        """Before the file appears: its row is synced (what `Transfers._get` records), with `gen`
        bumped, so a queued restore of it is dropped and one in flight does not publish. False
        (nothing published) when the app deleted the file meanwhile.

        The row stays leased (`lease`, released by `_restore` once the file is at its name): a
        remote change seen before the rename (a synced row, no file yet) would find nothing to
        do and be lost; busy, it waits for the path (SPEC §4.12), as for a worker's restore."""
        now = time.time()
        until = now + QUEUE_WAIT  # the rename follows at once; a crash's lease ends at the next start
        fields = {"key": key, "size": res.size, "mtime_ns": res.mtime_ns, "sha256": res.sha256,
                  "remote_sha256": res.sha256, "state": "synced", "op": None, "synced_at": now,
                  "updated_at": now, "attempts": 0, "last_error": None, "error_kind": None, "probe": 0,
                  "lease_until": until}
        with self.ledger.write() as w:
            found = w.execute("SELECT id, state FROM files WHERE watch=? AND path=?",
                              [watch.prefix, rel]).fetchone()
            if found is None:
                cols = {"watch": watch.prefix, "path": rel, "due_at": 0, "queued_at": now, **fields}
                cur = w.execute(f"INSERT INTO files({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                                list(cols.values()))
                row_id = cur.lastrowid
            elif found[1] in HIDDEN:
                return False
            else:
                row_id = found[0]
                sets = ", ".join(f"{c}=?" for c in fields)
                w.execute(f"UPDATE files SET {sets}, gen=gen+1 WHERE id=?", [*fields.values(), row_id])
        lease.row_id, lease.until = row_id, until
        return True

    def _local_appeared(self, watch: WatchConfig, rel: str) -> None:
        """A local file took the name first (the app, or the restore queue): it wins; unless it
        is the synced file itself, compare it with the remote (as `Transfers._get` does)."""
        row = self.ledger.get(watch.prefix, rel)
        try:
            st = os.lstat(watch.path.joinpath(*rel.split("/")))
            same = (st.st_size, st.st_mtime_ns) == (row["size"], row["mtime_ns"]) if row is not None else False
        except OSError:
            same = False
        if row is not None and row["state"] == "synced" and not same:
            self.ledger.update(row["id"], state="pending", op="put", probe=1, due_at=time.time(),
                               lease_until=None)

    def _remote_refusal(self, watch: WatchConfig, rel: str, e: RemoteError) -> Refusal:
        if e.kind == NOT_FOUND:
            return Refusal(404, "not found (neither on disk nor in the remote)")
        log.warning("files: on-demand restore of %s/%s failed: %s", watch.prefix, shown(rel), e.cause)
        with self.stats.lock:
            self.stats.fail_reasons[e.kind] += 1
        if e.kind in (TRANSIENT, UNREACHABLE):
            return Refusal(503, f"the remote is not answering: {e.cause}")
        if e.kind == LOCAL:
            return Refusal(500, f"cannot write the file: {e.cause}")
        return Refusal(502, f"restore failed: {e.cause}")
