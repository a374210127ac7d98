"""`syncd restore --at TIME`: every file as it was at TIME, from a versioned bucket (SPEC §3).

The remote's versioned listing comes keys in order, each key newest first (`S3Remote.list_versions`),
so the choice for a key is the first entry not newer than TIME (`pick`): a version is restored,
a delete marker means the file did not exist then. One pass, streamed: memory does not grow
with the number of keys (a bounded number of downloads is in flight). Each chosen version is
downloaded by `syncd.restore.fetch` like any restore (temp file, checked against that version's
`syncd-sha256`, atomic publish), asking the remote for that version.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

from syncd.config import Config, WatchConfig
from syncd.engine import unavailable
from syncd.errors import ConfigError
from syncd.fsutil import make_dirs
from syncd.keys import UnsafeKey, is_reserved, join_key, rel_from_key
from syncd.ledger import Ledger
from syncd.names import shown
from syncd.patterns import Filter, matches_any
from syncd.remote.base import Remote, RemoteError, VersionInfo
from syncd.restore import Restored, fetch, occupied, safe_target
from syncd.restore_cmd import PlanPrinter, RestoreSummary, clean_stale_temps
from syncd.retry import call as retry_call

log = logging.getLogger(__name__)
IN_FLIGHT_PER_WORKER = 4  # downloads queued ahead of the workers: bounds memory, keeps them busy
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """TIME of `restore --at`: ISO 8601 (without a zone: local time, as `date` shows it) or a
    relative age such as `30m`, `2h`, `3d`, `1w` (that long before now). Timezone-aware result."""
    now = now or datetime.now(UTC)
    m = _RELATIVE.match(text)
    if m:
        return now - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(f"--at {text!r}: not a time; give ISO 8601 (2026-11-24T10:00:00Z) or an age "
                          f"such as 30m, 2h, 3d") from None
    return t if t.tzinfo is not None else t.astimezone()  # naive: the local time zone


def pick(entries: Iterable[VersionInfo], at: datetime) -> Iterator[VersionInfo]:
    """For each key, the newest entry (version or delete marker) not newer than `at`.

    `entries`: keys in order, each key's entries newest first. A key with nothing that old yields
    nothing (the file did not exist at `at`)."""
    current: str | None = None
    decided = False
    for v in entries:
        if v.key != current:
            current, decided = v.key, False
        if decided or v.last_modified > at:
            continue
        decided = True
        yield v


def _require_versions(cfg: Config, remote: Remote) -> None:
    if cfg.remote.scheme != "s3" or not hasattr(remote, "list_versions"):
        raise ConfigError(f"restore --at needs a versioned S3 bucket; the remote {remote.name} keeps only "
                          f"the latest copy of each file (restore without --at brings that back)")
    try:
        status = retry_call(remote.versioning)  # type: ignore[attr-defined]
    except RemoteError as e:
        raise unavailable(remote, e) from e
    if status not in ("Enabled", "Suspended"):
        raise ConfigError(f"restore --at needs a versioned bucket, and versioning was never enabled on "
                          f"{remote.name}: it holds only the latest version of each object. Enable "
                          f"versioning (aws s3api put-bucket-versioning ... Status=Enabled) to be able "
                          f"to go back in time from now on")


class _Run:
    """One `restore --at`: the shared counters and the bounded pool of downloads."""

    def __init__(self, cfg: Config, remote: Remote, at: datetime, *, overwrite: bool, dry_run: bool,
                 ledger: Ledger | None, progress, on_plan: PlanPrinter | None) -> None:
        self.cfg, self.remote, self.at = cfg, remote, at
        self.overwrite, self.dry_run, self.ledger = overwrite, dry_run, ledger
        self.progress, self.on_plan = progress, on_plan
        self.out = RestoreSummary(dry_run=dry_run)
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(cfg.workers * IN_FLIGHT_PER_WORKER)
        self.cleaned: set[Path] = set()

    def failed(self, what: str, why: str) -> None:
        with self.lock:
            self.out.failed += 1
            self.out.failures.append((what, why))

    def count(self, field: str) -> None:
        with self.lock:
            setattr(self.out, field, getattr(self.out, field) + 1)
        if self.progress is not None:
            self.progress.update(1)

    def watch(self, ex: ThreadPoolExecutor, w: WatchConfig, root: Path, globs: tuple[str, ...]) -> None:
        base = join_key(self.cfg.remote.prefix, w.prefix)
        prefix = base + "/" if base else ""
        filt = Filter(w.include, w.exclude)
        resume = ""  # the last key decided: a listing cut by a transient error resumes after it

        def listing() -> None:
            nonlocal resume
            versions = self.remote.list_versions(prefix, after=resume)  # type: ignore[attr-defined]
            for v in pick(versions, self.at):
                resume = v.key
                if v.delete_marker or v.key.endswith("/"):
                    continue  # deleted at that time; "folder" markers made by consoles
                try:
                    rel = rel_from_key(v.key, base)
                except UnsafeKey as e:
                    log.error("refusing remote key %r: %s", v.key, e)
                    self.failed(v.key, f"unsafe key: {e}")
                    continue
                if (is_reserved(rel) or rel.split("/", 1)[0] == ".syncd" or not filt.wants(rel)
                        or (globs and not matches_any(globs, rel))):
                    continue
                if self.dry_run:  # nothing to download: no pool needed
                    self.one(w, root, rel, v)
                    continue
                self.slots.acquire()
                try:
                    ex.submit(self.one, w, root, rel, v).add_done_callback(lambda _f: self.slots.release())
                except BaseException:
                    self.slots.release()
                    raise
                if self.progress is not None:
                    self.progress.total = (self.progress.total or 0) + 1
                    self.progress.refresh()

        try:
            retry_call(listing)
        except RemoteError as e:
            raise unavailable(self.remote, e) from e

    def one(self, w: WatchConfig, root: Path, rel: str, v: VersionInfo) -> None:
        """Restore one chosen version; never raises (it runs in the pool)."""
        try:
            target = safe_target(root, rel, follow_symlinks=w.follow_symlinks and self.ledger is not None,
                                 create=not self.dry_run)
            # raises for a directory of that name: failed, not skipped (SPEC §4.14)
            if occupied(target) and not self.overwrite:
                self.count("skipped")
                return
            if self.dry_run:
                if self.on_plan is not None:
                    self.on_plan("restore", join_key(w.prefix, rel))
                self.count("would_restore")
                return
            if self.ledger is None:  # --to DIR: the temps a killed earlier run left there go first
                with self.lock:
                    fresh = target.parent not in self.cleaned
                    self.cleaned.add(target.parent)
                if fresh:
                    clean_stale_temps([target.parent])
            record = self._recorder(w, rel, v) if self.ledger is not None else None
            retry_call(lambda: fetch(self.remote, v.key, target, overwrite=self.overwrite,
                                     version_id=v.version_id, before_publish=record))
            self.count("restored")
        except FileExistsError:
            self.count("skipped")
        except (RemoteError, UnsafeKey, OSError) as e:
            self._failed_one(v, str(e))
        except Exception as e:  # noqa: BLE001 - the task ends here: a bug is a failed file, not a lost one
            log.exception("internal error restoring %s", shown(v.key))
            self._failed_one(v, f"internal error: {type(e).__name__}: {e}")

    def _failed_one(self, v: VersionInfo, why: str) -> None:
        log.error("cannot restore %s (version %s): %s", shown(v.key), v.version_id, why)
        self.failed(v.key, why)
        if self.progress is not None:
            self.progress.update(1)

    def _recorder(self, w: WatchConfig, rel: str, v: VersionInfo) -> Callable[[Restored], bool]:
        """In place, the ledger learns of the file before it appears (so it is not taken for a new
        file). The latest version is what the remote holds: synced. An older one is queued as an
        upload (checked with a HEAD first): the next `run` or `resync` makes the restored content
        the remote's current version again, so the backup follows what the app now sees."""
        ledger = self.ledger
        assert ledger is not None

        def record(res: Restored) -> bool:
            now = time.time()
            row = {"watch": w.prefix, "path": rel, "key": v.key, "size": res.size, "mtime_ns": res.mtime_ns,
                   "sha256": res.sha256, "attempts": 0, "last_error": None, "error_kind": None,
                   "lease_until": None, "updated_at": now, "due_at": now}
            if v.is_latest:
                row.update(state="synced", op=None, remote_sha256=res.sha256, synced_at=now, probe=0)
            else:
                row.update(state="pending", op="put", remote_sha256=None, probe=1, queued_at=now)
            ledger.upsert_many([row])
            return True

        return record


def restore_at(cfg: Config, remote: Remote, at: datetime, *, to_dir: Path | None = None,
               ledger: Ledger | None = None, globs: Iterable[str] = (), overwrite: bool = False,
               dry_run: bool = False, progress=None, on_plan: PlanPrinter | None = None) -> RestoreSummary:
    """Bring back every file as it was at `at`: into `to_dir` (DIR/<watch prefix>/<path>, no
    ledger), or in place (`ledger` given; only missing files unless `overwrite`). `progress`: a
    tqdm bar (its owner closes it); `on_plan`: told each file a dry run would restore."""
    if (to_dir is None) == (ledger is None):
        raise ValueError("restore_at: give exactly one of to_dir and ledger")
    _require_versions(cfg, remote)
    run = _Run(cfg, remote, at, overwrite=overwrite, dry_run=dry_run, ledger=ledger, progress=progress,
               on_plan=on_plan)
    globs = tuple(globs)
    with ThreadPoolExecutor(cfg.workers, thread_name_prefix="restore-at") as ex:
        for w in cfg.watches:
            if to_dir is not None:
                root = to_dir / w.prefix if w.prefix else to_dir
            else:
                root = w.path
                if not dry_run:
                    ledger.ensure_watch(w.prefix, str(w.path))  # type: ignore[union-attr]
            if not dry_run:
                make_dirs(root)
            run.watch(ex, w, root, globs)
    return run.out
