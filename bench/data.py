"""Seeded datasets, and a syncd ledger that already tracks one (for the no-op and RSS scenarios)."""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

# Every generated file gets this mtime (one day before the run): older than any settle time, and
# older than the objects the peers compare it with.
AGE = 86400
FILES_PER_DIR = 500


def make_tree(root: Path, n: int, size: int, seed: int, per_dir: int = FILES_PER_DIR) -> Path:
    """`n` files of `size` random bytes under `root/dNNN/fNNNNNN.bin`; same seed, same bytes."""
    rng = random.Random(seed)
    mtime_ns = int((time.time() - AGE) * 1e9)
    root.mkdir(parents=True, exist_ok=True)
    chunk = 1 << 20
    for i in range(n):
        d = root / f"d{i // per_dir:03d}"
        if i % per_dir == 0:
            d.mkdir(exist_ok=True)
        path = d / f"f{i:06d}.bin"
        with open(path, "wb") as f:
            left = size
            while left:
                take = min(chunk, left)
                f.write(rng.randbytes(take))
                left -= take
        os.utime(path, ns=(mtime_ns, mtime_ns))
    os.sync()  # no writeback of the fresh data during the first measured run
    return root


def count_files(root: Path) -> int:
    return sum(len(files) for _d, _s, files in os.walk(root))


def seed_ledger(ledger_path: Path, *, watch: Path, watch_prefix: str, remote_prefix: str) -> int:
    """Record every file under `watch` as synced, as if syncd had uploaded it (and had listed the
    remote once): the state a long-running syncd is in. Uses syncd's own ledger API."""
    from syncd.keys import join_key
    from syncd.ledger import Ledger

    ledger = Ledger(ledger_path)
    try:
        ledger.ensure_watch(watch_prefix, str(watch))
        now = time.time()
        batch: list[dict] = []
        n = 0
        for dirpath, dirnames, filenames in os.walk(watch):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, watch).replace(os.sep, "/")
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                st = os.stat(path)
                with open(path, "rb") as f:
                    sha = hashlib.file_digest(f, "sha256").hexdigest()
                batch.append({"watch": watch_prefix, "path": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                              "sha256": sha, "remote_sha256": sha, "state": "synced", "op": None,
                              "key": join_key(remote_prefix, watch_prefix, rel), "attempts": 0,
                              "updated_at": now, "synced_at": now, "due_at": now, "probe": 0})
                if len(batch) >= 5000:
                    ledger.upsert_many(batch)
                    n += len(batch)
                    batch.clear()
        ledger.upsert_many(batch)
        n += len(batch)
        ledger.set_watch(watch_prefix, listed_at=now)
        return n
    finally:
        ledger.close()
