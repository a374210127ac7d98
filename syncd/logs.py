"""Logging setup (text or one JSON object per line) and once-per-cause failure reporting."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from datetime import UTC, datetime

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False)


def setup(level: str = "info", fmt: str = "text", stream=None) -> None:
    """Configure the root logger once (the entry point's job)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_syncd", False):
            root.removeHandler(h)
    handler._syncd = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # third-party chatter stays at warning even with debug: botocore's debug lines carry
    # request headers, and credentials must never reach a log
    for name in ("botocore", "boto3", "s3transfer", "urllib3", "watchdog"):
        logging.getLogger(name).setLevel(logging.WARNING)


class CauseLog:
    """Logs the first failure of each distinct cause, then a count at most once a minute.

    A denied s3:PutObject on 10,000 files is one line (plus counts), not 10,000.
    """

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self.log = logger
        self.interval = interval
        self._lock = threading.Lock()
        self._seen: dict[str, list[float | int]] = {}  # cause -> [last_logged, suppressed]

    def report(self, cause: str, example: str, level: int = logging.WARNING) -> None:
        now = time.monotonic()
        with self._lock:
            entry = self._seen.get(cause)
            if entry is None:
                self._seen[cause] = [now, 0]
                msg = f"{cause} (e.g. {example}); further files with this cause are counted, not logged"
            elif now - entry[0] >= self.interval and entry[1]:
                msg = f"{cause}: {entry[1] + 1} more files since last report (e.g. {example})"
                entry[0], entry[1] = now, 0
            else:
                entry[1] += 1
                return
        self.log.log(level, msg)

    def clear(self, cause: str | None = None) -> None:
        with self._lock:
            if cause is None:
                self._seen.clear()
            else:
                self._seen.pop(cause, None)
