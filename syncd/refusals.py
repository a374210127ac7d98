"""Names syncd refuses to sync, counted for `/metrics` (`syncd_failures_total{reason}`, SPEC §6).

A local name that cannot be a key (not UTF-8, a backslash, too long) is recorded `failed` by the
scanner, and a remote key that would land outside its watch root is refused by a listing; neither
goes through a transfer, so neither reaches the transfer counters. The counts are per process,
like every Prometheus counter.
"""

from __future__ import annotations

import threading
from collections import Counter

NAME = "name"  # a local file name that cannot be a key
UNSAFE_KEY = "unsafe_key"  # a remote key that would escape the watch root (`..`, absolute, NUL)
REASONS = (NAME, UNSAFE_KEY)

_lock = threading.Lock()
_counts: Counter = Counter()


def count(reason: str, n: int = 1) -> None:
    with _lock:
        _counts[reason] += n


def counts() -> dict[str, int]:
    with _lock:
        return dict(_counts)
