"""`syncd restore`: in place (through the ledger queue) or `--to DIR` (no ledger)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from syncd.config import Config
from syncd.engine import RESTORE_OPS, Engine, remote_files
from syncd.fsutil import make_dirs
from syncd.keys import RESTORE_TEMP_PREFIX, UnsafeKey, join_key
from syncd.ledger import Ledger
from syncd.names import shown
from syncd.remote.base import Remote, RemoteError
from syncd.restore import fetch, occupied, safe_target
from syncd.retry import call as retry_call

log = logging.getLogger(__name__)
STALE_TEMP_SECONDS = 60.0
PlanPrinter = Callable[[str, str], None]  # (kind, "watch/path"): a dry run's line per file


@dataclass
class RestoreSummary:
    restored: int = 0
    skipped: int = 0
    failed: int = 0
    would_restore: int = 0
    dry_run: bool = False
    failures: list[tuple[str, str]] = field(default_factory=list)

    def line(self) -> str:
        if self.dry_run:
            return f"dry run: would restore {self.would_restore}, skipped {self.skipped}, failed {self.failed}"
        return f"restored {self.restored}, skipped {self.skipped}, failed {self.failed}"


def clean_stale_temps(dirs: Iterable[Path]) -> int:
    """Remove the restore temps a killed `restore --to` left in the directories it writes to
    again (in-place restores have theirs removed by the next scan). A temp whose inode changed
    within STALE_TEMP_SECONDS may belong to a restore running now: it stays."""
    now, removed = time.time(), 0
    for d in dirs:
        try:
            with os.scandir(d) as entries:
                for de in entries:
                    if (de.name.startswith(RESTORE_TEMP_PREFIX) and de.is_file(follow_symlinks=False)
                            and now - de.stat(follow_symlinks=False).st_ctime > STALE_TEMP_SECONDS):
                        os.unlink(de.path)
                        removed += 1
        except OSError:  # not there yet (nothing to clean) or unreadable (the restore will say)
            continue
    return removed


def restore_in_place(cfg: Config, ledger: Ledger, remote: Remote, *, globs: Iterable[str] = (),
                     overwrite: bool = False, dry_run: bool = False, progress=None,
                     on_plan: PlanPrinter | None = None,
                     stop: threading.Event | None = None) -> RestoreSummary:
    engine = Engine(cfg, ledger, remote, oneshot=True, overwrite=overwrite, stop=stop,
                    on_progress=progress.update if progress is not None else None,
                    on_plan=on_plan if dry_run else None)
    engine.check_remote()
    engine.prepare(create=not dry_run)
    if not dry_run:
        ledger.recover()
    queued = 0
    for w in cfg.watches:
        queued += engine.listing(w, sync=False, include_tombstones=True, globs=globs, overwrite=overwrite,
                                 dry_run=dry_run)
    out = RestoreSummary(dry_run=dry_run)
    if dry_run:
        out.would_restore = queued
    else:
        if progress is not None:
            progress.total = engine.outstanding(RESTORE_OPS)
        try:
            engine.drain(RESTORE_OPS)
        finally:
            if progress is not None:
                progress.close()
        out.restored = engine.stats.restored
        out.failures = list(engine.stats.failures)
        out.failed = engine.stats.failed
    out.failures += engine.refused
    out.failed += len(engine.refused)
    out.skipped = max(0, queued - out.restored - out.failed) if not dry_run else 0
    return out


def restore_to(cfg: Config, remote: Remote, to_dir: Path, *, globs: Iterable[str] = (), overwrite: bool = False,
               dry_run: bool = False, on_plan: PlanPrinter | None = None) -> RestoreSummary:
    """Write DIR/<watch prefix>/<path> for every matching object; the ledger is not touched."""
    from syncd.engine import unavailable

    try:
        for w in cfg.watches:
            base = join_key(cfg.remote.prefix, w.prefix)
            retry_call(lambda base=base: remote.probe(base + "/" if base else ""))
    except RemoteError as e:
        raise unavailable(remote, e) from e
    out = RestoreSummary(dry_run=dry_run)
    lock = threading.Lock()
    globs = tuple(globs)

    def one(prefix: str, root: Path, rel: str, key: str) -> None:
        try:
            target = safe_target(root, rel, create=not dry_run)
            # raises for a directory of that name: failed, not skipped (SPEC §4.14)
            if occupied(target) and not overwrite:
                with lock:
                    out.skipped += 1
                return
            if dry_run:
                with lock:
                    out.would_restore += 1
                    if on_plan is not None:
                        on_plan("restore", join_key(prefix, rel))
                return
            retry_call(lambda: fetch(remote, key, target, overwrite=overwrite))
            log.debug("restored %s to %s", shown(key), shown(target))  # -v: every transfer (README)
            with lock:
                out.restored += 1
        except FileExistsError:
            with lock:
                out.skipped += 1
        except (RemoteError, UnsafeKey, OSError) as e:
            log.error("cannot restore %s: %s", shown(key), e)
            with lock:
                out.failed += 1
                out.failures.append((key, str(e)))

    with ThreadPoolExecutor(cfg.workers) as ex:
        for w in cfg.watches:
            base = join_key(cfg.remote.prefix, w.prefix)
            root = to_dir / w.prefix if w.prefix else to_dir
            if not dry_run:
                make_dirs(root)
            refused: list[tuple[str, str]] = []

            def listing(base=base, w=w, refused=refused) -> list:
                refused.clear()  # a transient error starts the listing over
                return list(remote_files(remote, base, w, globs, refused))

            try:
                objects = retry_call(listing)
            except RemoteError as e:
                raise unavailable(remote, e) from e
            if not dry_run:
                clean_stale_temps({root.joinpath(*rel.split("/")[:-1]) for rel, _obj in objects})
            if dry_run:  # nothing to download: in the listing's order, one line each
                for rel, obj in objects:
                    one(w.prefix, root, rel, obj.key)
            futures = [] if dry_run else [ex.submit(one, w.prefix, root, rel, obj.key) for rel, obj in objects]
            for f in futures:
                f.result()
            out.failed += len(refused)
            out.failures += refused
    return out
