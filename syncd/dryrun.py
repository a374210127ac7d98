"""The ledger of a dry run, which changes nothing (SPEC §3): no lock file, no ledger made.

An existing ledger is opened read-only (one an older syncd wrote is copied and migrated in a
temporary directory: the plan needs today's columns); without one, the plan is made against an
empty ledger in a temporary directory, thrown away at the end.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from syncd.config import Config
from syncd.ledger import SCHEMA_VERSION, Ledger, ledger_failure


@contextmanager
def dry_run_ledger(cfg: Config) -> Iterator[Ledger]:
    with tempfile.TemporaryDirectory(prefix="syncd-dry-run-") as tmp:
        copy = Path(tmp) / "ledger.db"
        ledger = Ledger(cfg.ledger, readonly=True, config=cfg.path) if cfg.ledger.exists() else Ledger(copy)
        try:
            if ledger.readonly and ledger.query("PRAGMA user_version")[0]["user_version"] < SCHEMA_VERSION:
                try:
                    with sqlite3.connect(copy) as dst:
                        ledger.db.conn.backup(dst)
                    dst.close()
                except sqlite3.Error as e:
                    raise ledger_failure(cfg.ledger, e, "read", cfg.path) from e
                ledger.close()
                ledger = Ledger(copy)  # migrated on open
            yield ledger
        finally:
            ledger.close()
