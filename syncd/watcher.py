"""Live watching: watchdog observers enqueue; one recorder thread writes the ledger.

Handlers only put events on a queue (an exception in a handler silently kills watchdog's
thread, PITFALLS §1). The recorder batches them and decides from the file's *current* state
(lstat), not from the event kind, so coalesced, reordered or synthetic events all end right:
a path that exists is a change, one that does not is a deletion. New directories are walked
(files written into them before their inotify watch existed are found, and a read lease tells
whether their writer has closed them already: syncd.leases). Queue overflows and observer
errors trigger a full rescan.
"""

from __future__ import annotations

import logging
import os
import queue
import stat as st_mod
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

from syncd.closes import Closes
from syncd.config import Config, WatchConfig
from syncd.errors import LedgerError
from syncd.keys import name_problem, rel_path
from syncd.leases import Leases
from syncd.ledger import Ledger
from syncd.patterns import Filter
from syncd.pool import Wake
from syncd.scanner import BAD_NAME, FILE, Entry, Scanner, walk

log = logging.getLogger(__name__)

EVENTS = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent, FileDeletedEvent,
          DirCreatedEvent, DirMovedEvent, DirDeletedEvent]
BATCH_MAX = 2000
BATCH_WAIT = 0.02
# at a stop, how long the observers go on reading what inotify queued before they stop: most
# events are read within a few ms, but watchdog holds a rename's IN_MOVED_FROM 0.5 s for its
# IN_MOVED_TO (InotifyMoveEventGrouper.delay); a rename out of sight (into a directory not yet
# watched) just before SIGTERM would be dropped with it, and the old name come back at the start
STOP_GRACE = 0.75


class _Handler(FileSystemEventHandler):
    def __init__(self, prefix: str, q: queue.Queue) -> None:
        self.prefix = prefix
        self.q = q

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.q.put((self.prefix, event))


def _stopping_noise(record: logging.LogRecord) -> bool:
    """watchdog logs an ERROR when an event arrives as its emitter stops: expected at a stop."""
    return "called when the thread is inactive" not in record.getMessage()


class _OverflowLog(logging.Handler):
    """watchdog only logs an inotify overflow (PITFALLS §1): turn that line into a rescan."""

    def __init__(self, trigger: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.trigger = trigger

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage().lower()
        if "overflow" in msg or "unable to rebuild" in msg:
            self.trigger("watcher overflow")


class Watcher:
    def __init__(self, cfg: Config, ledger: Ledger, *, request_rescan: Callable[[str], None],
                 wake: Wake | None = None, closes: Closes | None = None) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.request_rescan = request_rescan
        self.wake = wake or Wake()
        # files their writer closed, shared with the workers (upload_on_close, syncd.closes)
        self.closes = closes if closes is not None else Closes()
        # files found in new directories, closed before their watch existed (no close event)
        self.leases = Leases()
        self.q: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._observers: list = []
        self._thread: threading.Thread | None = None
        self._watches = {w.prefix: w for w in cfg.watches}
        self._filters = {w.prefix: Filter(w.include, w.exclude) for w in cfg.watches}
        self._overflow = _OverflowLog(request_rescan)
        self.root_ids: dict[str, tuple[int, int]] = {}
        self.down: dict[str, str] = {}  # watch prefix -> reason (root vanished, ...)
        self.events_seen = 0

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        for name in ("watchdog.observers.inotify_c", "watchdog.observers.inotify"):
            logging.getLogger(name).addHandler(self._overflow)
        # In a burst of new directories watchdog adds the watch of a subdirectory twice (walking
        # its new parent, then on the subdirectory's own IN_CREATE) with the same callback, and
        # warns with the repr of every watched path. Overwriting a callback with itself changes
        # nothing: the warning is noise, dropped here (other warnings are logged, logs.setup).
        warnings.filterwarnings("ignore", message="Callback with id .* already exists", category=RuntimeWarning,
                                module=r"watchdog\.")
        self._check_inotify_limit()
        if any(w.upload_on_close and w.observer == "native" for w in self.cfg.watches):
            log.info("files closed in new directories before their watch existed: %s",
                     self.leases.description if self.leases.usable else
                     f"wait for settle_seconds (no kernel leases: {self.leases.description})")
        for w in self.cfg.watches:
            st = os.stat(w.path)
            self.root_ids[w.prefix] = (st.st_dev, st.st_ino)
            obs = PollingObserver(timeout=1.0) if w.observer == "polling" else Observer()
            obs.name = f"syncd-observer-{w.prefix}"
            obs.schedule(_Handler(w.prefix, self.q), str(w.path), recursive=True, event_filter=EVENTS,
                         follow_symlink=w.follow_symlinks)
            obs.daemon = True
            obs.start()
            self._observers.append(obs)
        self._thread = threading.Thread(target=self._run, name="syncd-recorder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; what the kernel reported before the stop is recorded first (a file the
        app deleted a moment before SIGTERM would otherwise come back at the next start)."""
        if self._thread is not None and self._thread.is_alive():
            time.sleep(STOP_GRACE)  # the emitters read what inotify has queued
        for name in ("watchdog.observers.inotify_c", "watchdog.observers.inotify"):
            logging.getLogger(name).addFilter(_stopping_noise)
        for obs in self._observers:
            obs.stop()
        for obs in self._observers:
            obs.join(timeout=5)
        self._stop.set()  # the recorder drains its queue, then ends
        if self._thread is not None:
            self._thread.join(timeout=10)
        for name in ("watchdog.observers.inotify_c", "watchdog.observers.inotify"):
            logging.getLogger(name).removeHandler(self._overflow)
        self._observers.clear()

    def alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive()) and all(o.is_alive() for o in self._observers)

    def root_ok(self, w: WatchConfig) -> str | None:
        """Why the watch root is not usable (vanished, replaced, unmounted), or None."""
        try:
            st = os.stat(w.path)
        except OSError as e:
            return f"watch root {w.path} is gone ({e.strerror})"
        if not st_mod.S_ISDIR(st.st_mode):
            return f"watch root {w.path} is not a directory"
        known = self.root_ids.get(w.prefix)
        if known is not None and known != (st.st_dev, st.st_ino):
            return f"watch root {w.path} was replaced or unmounted"
        return None

    def _check_inotify_limit(self) -> None:
        try:
            limit = int(Path("/proc/sys/fs/inotify/max_user_watches").read_text())
        except (OSError, ValueError):
            return
        dirs = 0
        for w in self.cfg.watches:
            if w.observer == "native":
                for _root, _dirs, _files in os.walk(w.path):
                    dirs += 1
                    if dirs > limit:
                        break
        if dirs > limit * 0.9:
            log.warning("%d directories to watch but fs.inotify.max_user_watches is %d: raise it "
                        "(sysctl fs.inotify.max_user_watches=%d) or use observer = \"polling\"; "
                        "periodic rescans still catch everything", dirs, limit, dirs * 2)

    # --- the recorder ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not (self._stop.is_set() and self.q.empty()):
                try:
                    first = self.q.get(timeout=0.25)
                except queue.Empty:
                    continue
                batch = [first]
                deadline = time.monotonic() + BATCH_WAIT
                while len(batch) < BATCH_MAX:
                    try:
                        batch.append(self.q.get(timeout=max(0.0, deadline - time.monotonic())))
                    except queue.Empty:
                        break
                try:
                    self.apply(batch)
                except LedgerError:  # the daemon reports it (/healthz 503) and rescans once it works
                    self.request_rescan("the ledger could not record watcher events")
                except Exception:  # noqa: BLE001 - the recorder must survive; a rescan repairs
                    log.exception("could not record %d watcher events; rescanning", len(batch))
                    self.request_rescan("recorder error")
        finally:
            self.ledger.close_thread()

    def apply(self, batch: list[tuple[str, FileSystemEvent]]) -> None:
        """Record a batch of events in the ledger (one transaction per watch)."""
        self.events_seen += len(batch)
        files: dict[str, dict[str, str]] = {}  # prefix -> ledger path -> file-system path
        closed: dict[str, set[str]] = {}  # prefix -> ledger paths closed after writing, or renamed in
        written: dict[str, set[str]] = {}  # prefix -> ledger paths written to (after any close in this batch)
        new_dirs: dict[str, set[str]] = {}
        gone_dirs: dict[str, set[str]] = {}
        linked: dict[str, bool] = {}  # parent directory -> reached through a symlink (this batch)
        for prefix, ev in batch:
            w = self._watches[prefix]
            paths = [ev.src_path] + ([ev.dest_path] if getattr(ev, "dest_path", "") else [])
            for i, raw in enumerate(paths):
                fs_path = os.fsdecode(raw)
                if w.follow_symlinks:
                    fs_path = canonical_path(str(w.path), fs_path)
                elif through_symlink(str(w.path), fs_path, linked):
                    continue  # reported through a symlinked directory, which is not followed
                rel = self._rel(w, fs_path)
                if rel is None:
                    continue
                if rel == "":
                    if isinstance(ev, (DirDeletedEvent, DirMovedEvent)):
                        self.request_rescan(f"watch root {w.path} moved or deleted")
                    continue
                if ev.is_directory:
                    is_dest = i == 1
                    if isinstance(ev, DirCreatedEvent) or (isinstance(ev, DirMovedEvent) and is_dest):
                        new_dirs.setdefault(prefix, set()).add(rel)
                    elif isinstance(ev, (DirDeletedEvent, DirMovedEvent)):
                        gone_dirs.setdefault(prefix, set()).add(rel)
                else:
                    files.setdefault(prefix, {})[rel] = fs_path
                    # whole: its writer closed it, or it was renamed into place (the usual
                    # "write a temp file, then rename" of careful writers)
                    if w.upload_on_close and (isinstance(ev, FileClosedEvent) or
                                              (i == 1 and isinstance(ev, FileMovedEvent))):
                        closed.setdefault(prefix, set()).add(rel)
                        written.get(prefix, set()).discard(rel)
                    elif i == 0 and isinstance(ev, (FileCreatedEvent, FileModifiedEvent)):
                        # written again after a close (a new writer, e.g. a rewrite right after a
                        # rename into place): what the file is now is not what was closed, and a
                        # close fact recorded from a stat taken after this write (an earlier
                        # batch, read late) is not one either; its writer's close event comes
                        closed.get(prefix, set()).discard(rel)
                        written.setdefault(prefix, set()).add(rel)
        for prefix, rels in written.items():
            for rel in rels:
                self.closes.forget(prefix, rel)
        queued = False
        for prefix in set(files) | set(new_dirs) | set(gone_dirs):
            queued |= self._apply_watch(self._watches[prefix], files.get(prefix, {}),
                                        new_dirs.get(prefix, set()), gone_dirs.get(prefix, set()),
                                        closed.get(prefix, set()))
        if queued:
            self.wake.set()

    def _rel(self, w: WatchConfig, path: str) -> str | None:
        return rel_path(w.path, Path(path))  # also right for a drive-root watch (D:\\) on Windows

    def _apply_watch(self, w: WatchConfig, files: dict[str, str], new_dirs: set[str], gone_dirs: set[str],
                     closed: set[str] | frozenset[str] = frozenset()) -> bool:
        problem = self.root_ok(w)
        if problem:
            # never turn a vanished or unmounted root into remote deletions (SPEC §4.5)
            if self.down.get(w.prefix) != problem:
                log.error("%s; not recording deletions, waiting for it to come back", problem)
            self.down[w.prefix] = problem
            return False
        self.down.pop(w.prefix, None)
        filt = self._filters[w.prefix]
        sc = Scanner(self.ledger, w, self.cfg.remote.prefix, settle=self.cfg.settle_seconds, missing="delete")
        for d in sorted(new_dirs):
            if not filt.dir_wanted(d):
                continue
            try:
                top = w.path.joinpath(*d.split("/"))
                if not w.follow_symlinks and os.path.islink(top):
                    continue  # a symlink to a directory: not followed (SPEC §4.9)
                above = _idents(w.path, d) if w.follow_symlinks else ()
                for entry in walk(top, filt, w.follow_symlinks, base=d, ancestors=above):
                    if entry.kind in (FILE, BAD_NAME):
                        files.pop(entry.path, None)
                        entry, is_closed = self._whole(w, entry, entry.path in closed)
                        self._seen(sc, entry, closed=is_closed)
            except OSError:
                pass  # gone again already; its events follow
        for rel, fs_path in sorted(files.items()):
            if not filt.wants(rel):
                continue
            found = self._stat(w, rel, fs_path)
            if found is None:
                row = self.ledger.get(w.prefix, rel)
                if row is not None:
                    sc.on_missing(row)
            else:
                self._seen(sc, found, closed=rel in closed)
        for d in sorted(gone_dirs):
            for row in self.ledger.iter_rows(w.prefix, "path >= ? AND path < ?", [d + "/", d + "0"]):
                if not os.path.lexists(w.path.joinpath(*row["path"].split("/"))):
                    sc.on_missing(row)
        return sc.flush() > 0

    def _whole(self, w: WatchConfig, entry: Entry, closed: bool) -> tuple[Entry, bool]:
        """A file found in a new directory: probably closed before the directory's watch
        existed, so no close event comes for it. Closed if nobody writes it now (a read lease,
        syncd.leases), with the size and mtime taken then; one still open gets its close event."""
        if closed or entry.kind != FILE or not w.upload_on_close or w.observer != "native":
            return entry, closed
        st = self.leases.whole(w.path.joinpath(*entry.path.split("/")), follow_symlinks=w.follow_symlinks)
        if st is None:
            return entry, False
        return Entry(path=entry.path, kind=FILE, size=st.st_size, mtime_ns=st.st_mtime_ns), True

    def _seen(self, sc: Scanner, entry: Entry, *, closed: bool = False) -> None:
        row = self.ledger.get(sc.watch.prefix, entry.path)
        if closed and entry.kind == FILE and not (
                row is not None and row["state"] == "synced"
                and (row["size"], row["mtime_ns"]) == (entry.size, entry.mtime_ns)):
            # recorded before the ledger commit, so a worker that claims the row sees it
            if self.closes.record(sc.watch.prefix, entry.path, entry.size, entry.mtime_ns):
                sc.due_at[entry.path] = max(sc.now, Closes.ready_at(entry.mtime_ns))
        if row is None:
            sc.on_new(entry)
        else:
            sc.on_seen(row, entry)

    def _stat(self, w: WatchConfig, rel: str, fs_path: str) -> Entry | None:
        try:
            s = os.stat(fs_path) if w.follow_symlinks else os.lstat(fs_path)
        except OSError:
            return None
        if not st_mod.S_ISREG(s.st_mode):
            return None  # symlinks (not followed), fifos, sockets, devices
        parts = os.path.relpath(fs_path, w.path).split(os.sep)
        problem = next((p for p in map(name_problem, parts) if p), None)
        return Entry(path=rel, kind=BAD_NAME if problem else FILE, size=s.st_size, mtime_ns=s.st_mtime_ns,
                     problem=problem or "")


def canonical_path(root: str, path: str) -> str:
    """With follow_symlinks, watchdog reports events through symlink loops (root/a/loop/a/loop/
    .../a/f, where a/loop -> ..): the path the scanner uses for the same file, where no
    directory appears twice on the way down. Paths that cannot be resolved are left as they are."""
    parts = os.path.relpath(path, root).split(os.sep)
    if parts[0] in (os.curdir, os.pardir):
        return path
    try:
        st = os.stat(root)
    except OSError:
        return path
    stack = [((st.st_dev, st.st_ino), root)]
    for i, part in enumerate(parts[:-1]):
        nxt = os.path.join(stack[-1][1], part)
        try:
            st = os.stat(nxt)
        except OSError:  # gone (a deletion) or a dangling link: keep the rest as reported
            return os.path.join(nxt, *parts[i + 1:])
        ident = (st.st_dev, st.st_ino)
        back = next((k for k, (seen, _p) in enumerate(stack) if seen == ident), None)
        if back is None:
            stack.append((ident, nxt))
        else:  # a loop back to a directory above: continue from there
            del stack[back + 1:]
    return os.path.join(stack[-1][1], parts[-1])


def through_symlink(root: str, path: str, cache: dict[str, bool]) -> bool:
    """Does `path` lie below a symlinked directory inside `root` (not followed)?"""
    parent = os.path.dirname(path)
    if parent not in cache:
        rel = os.path.relpath(parent, root)
        real_root = os.path.realpath(root)
        cache[parent] = os.path.realpath(parent) != (real_root if rel == os.curdir else
                                                     os.path.join(real_root, rel))
    return cache[parent]


def _idents(root: Path, rel_dir: str) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of the root and the directories between it and `rel_dir` (excluded)."""
    out, cur = [], root
    for part in ["", *rel_dir.split("/")[:-1]]:
        cur = cur / part if part else cur
        try:
            st = os.stat(cur)
        except OSError:
            break
        out.append((st.st_dev, st.st_ino))
    return out
