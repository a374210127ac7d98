"""Logging setup (text or one JSON object per line) and once-per-cause failure reporting.

Every line syncd writes to stderr goes through here: log records through the two formatters,
and a one-shot command's own lines (`failed: ...`, `syncd: error: ...`) through `stderr_line`,
so that with `log_format = "json"` each of them is one JSON object (SPEC §2). Both escape the
final text with `names.shown` (SPEC §4.14): whatever a record's arguments hold, a file name
cannot forge a line or send a terminal sequence, even from a call site that forgot to escape.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime

from syncd.names import shown

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


_format = {"json": False}  # what `setup` chose, for the lines that are not log records


def shown_lines(text: str) -> str:
    """A traceback keeps its lines; each is escaped (an exception's message may hold a name).
    Only tracebacks are printed this way: they come with -v or from a bug."""
    return "\n".join(shown(line) for line in text.split("\n"))


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, the message escaped (SPEC §4.14)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = shown(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:
        return shown_lines(super().formatException(ei))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            # escaped like the text format: a consumer that prints `msg` sees what a reader of
            # the text log sees (JSON itself would only escape C0 controls)
            "msg": shown(record.getMessage()),
        }
        if record.exc_info:
            obj["exc"] = shown_lines(self.formatException(record.exc_info))
        elif record.exc_text:
            obj["exc"] = shown_lines(record.exc_text)
        return json.dumps(obj, ensure_ascii=False)


def syslog_priority(levelno: int) -> int:
    """The syslog priority journald files a line under: 3 error, 4 warning, 6 info, 7 debug."""
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def to_journal(stream=None) -> bool:
    """Is `stream` (stderr) connected to journald? systemd sets JOURNAL_STREAM to the
    `device:inode` of the stream it connected; a redirected stderr no longer matches."""
    want = os.environ.get("JOURNAL_STREAM", "")
    if not want:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):  # closed, or not a real file (pytest's capture)
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


class JournalPrefix(logging.Formatter):
    """Prefixes each line with `<N>` (sd-daemon(3)): journald strips it and files the line under
    that priority, so `journalctl -p warning` shows syncd's warnings and errors."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        # a traceback's lines would each be filed at priority 6: keep them at the record's
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def journal_line(text: str, levelno: int = logging.ERROR, stream=None) -> str:
    """`text` as it should be written to stderr (with its priority when that is the journal)."""
    return f"<{syslog_priority(levelno)}>{text}" if to_journal(stream) else text


def use_format(fmt: str | None) -> None:
    """Choose text or JSON for `stderr_line` before (or without) `setup`: a config error in a
    config that asks for JSON is said in JSON."""
    if fmt in ("text", "json"):
        _format["json"] = fmt == "json"


def is_json() -> bool:
    return _format["json"]


def stderr_line(text: str, levelno: int = logging.ERROR, *, exc: bool = False, stream=None) -> str:
    """A one-shot command's own stderr line (`failed: ...`, `syncd: error: ...`), escaped: as it
    is in text mode, one JSON object like a log record's in JSON mode (SPEC §2). `exc`: the
    exception being handled goes with it (-v's traceback: in JSON, the object's `exc`)."""
    if not _format["json"]:
        return journal_line(shown(text), levelno, stream)
    record = logging.LogRecord("syncd", levelno, __file__, 0, text, None, sys.exc_info() if exc else None)
    return journal_line(JsonFormatter().format(record), levelno, stream)


def setup(level: str = "info", fmt: str = "text", stream=None) -> None:
    """Configure the root logger once (the entry point's job)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    use_format(fmt)
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    if to_journal(handler.stream):
        formatter = JournalPrefix(formatter)
    handler.setFormatter(formatter)
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
    # Python warnings (a library's RuntimeWarning) become log lines in the same format (and with
    # a journald priority) instead of raw two-line text on stderr
    logging.captureWarnings(True)


class CauseLog:
    """Logs the first failure of each distinct cause, then a count at most once a minute.

    A denied s3:PutObject on 10,000 files is one line (plus counts), not 10,000.
    """

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self.log = logger
        self.interval = interval
        self._lock = threading.Lock()
        self._seen: dict[str, list[float | int]] = {}  # cause -> [last_logged, suppressed]

    def report(self, cause: str, example: str, level: int = logging.WARNING, *,
               subjects: Iterable[str] = ()) -> None:
        """`subjects`: the path, key or directory this failure is about, as they may appear in
        `cause`: a disk full for 6 files is one cause, not 6 (the first is logged in full)."""
        now = time.monotonic()
        group = generic_cause(cause, subjects)
        with self._lock:
            entry = self._seen.get(group)
            if entry is None:
                self._seen[group] = [now, 0]
                msg = f"{cause} (e.g. {example}); further files with this cause are counted, not logged"
            elif now - entry[0] >= self.interval and entry[1]:
                msg = f"{group}: {entry[1] + 1} more files since last report (e.g. {example})"
                entry[0], entry[1] = now, 0
            else:
                entry[1] += 1
                return
        self.log.log(level, msg)

    def clear(self, cause: str | None = None) -> None:
        """Forget a cause (or all), so its next failure is logged in full again."""
        with self._lock:
            if cause is None:
                self._seen.clear()
            else:
                self._seen.pop(cause, None)


def generic_cause(cause: str, subjects: Iterable[str]) -> str:
    """`cause` with each subject (longest first) replaced by `…` where it stands as a whole
    name (a short path such as `a` must not eat the `a` of `space`)."""
    for subject in sorted({x for x in subjects if x}, key=len, reverse=True):
        cause = re.sub(r"(?<![\w.-])" + re.escape(subject) + r"(?![\w.-])", "…", cause)
    return cause
