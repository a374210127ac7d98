"""Multipart uploads of large files that never leave their parts behind (SPEC §4.10).

CreateMultipartUpload, the parts (up to PART_CONCURRENCY of a file at once, and at most the
remote's `slots` across files: each holds a connection, its bytes read from the file as they are
sent), then CompleteMultipartUpload. Any other end aborts the upload on the store, whose parts
would otherwise be billed, unlisted, until a lifecycle rule removed them: a part failing its
PART_ATTEMPTS tries, the file changing or failing to be read, any exception, and a stop. At a
stop no part starts; parts already in flight get STOP_GRACE to finish the file, else it is
aborted. The abort is one request with short timeouts (ABORT_TIMEOUT); a failed one is one
warning naming the upload id. (s3transfer aborted only after a failure, once every part in
flight had ended; a stop left the upload open: the process exited first.)

A process killed mid-upload (`kill -9`, power loss) aborts nothing: `stale` picks, from one
listing at the next start, the uploads it left under the watches (`S3Remote.abort_stale_uploads`).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from syncd.bwlimit import Limiter, MeteredBody
from syncd.fsutil import CHUNK
from syncd.remote.base import INTEGRITY, NOT_FOUND, RemoteError, Stopped

log = logging.getLogger(__name__)
MIB = 1024 * 1024
PART_CONCURRENCY = 4  # parts of one file in flight at once
MAX_PARTS = 10_000  # S3's limits: parts per upload, and the largest part
MAX_PART = 5 * 1024 * MIB
# a stop's 10 s (SPEC §4.10): parts in flight get STOP_GRACE to finish the file, then the abort
# gets up to ABORT_TIMEOUT to connect and as long for its answer, leaving the rest of the stop
STOP_GRACE = 4.0
ABORT_TIMEOUT = 2.0
POLL = 0.1


def part_size(size: int, chunk: int) -> int:
    """`chunk`, doubled until the file fits in MAX_PARTS parts (as s3transfer does)."""
    while -(-size // chunk) > MAX_PARTS and chunk < MAX_PART:
        chunk = min(chunk * 2, MAX_PART)
    return chunk


class Underway:
    """The multipart uploads this process has under way, which the start-up sweep must not
    abort: their ids, and how many are being created (an id the store may list already, but
    not yet known here)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ids: set[str] = set()
        self._creating = 0

    def create(self, create: Callable[[], str]) -> str:
        with self._cond:
            self._creating += 1
        upload_id = ""
        try:
            upload_id = create()
            return upload_id
        finally:
            with self._cond:
                self._creating -= 1
                if upload_id:
                    self._ids.add(upload_id)
                self._cond.notify_all()

    def ended(self, upload_id: str) -> None:
        """Completed or aborted (called only after that request)."""
        with self._cond:
            self._ids.discard(upload_id)

    def ids(self, timeout: float) -> set[str] | None:
        """Every upload of this process a listing done before this call can show; None when
        some are still being created after `timeout` (then nothing may be called stale)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._creating == 0, timeout):
                return None
            return set(self._ids)


class FileChanged(Exception):
    """The file is not the one the upload started with (written to, truncated)."""


class PartBody:
    """Bytes [start, start + length) of an open file, read as they are sent: a part is never held
    in memory whole, and botocore rewinds it (`seek(0)`) to send it again."""

    def __init__(self, f: Any, start: int, length: int) -> None:
        self._f, self._start, self._len, self._pos = f, start, length, 0

    def __len__(self) -> int:
        return self._len

    def read(self, n: int = -1) -> bytes:
        want = self._len - self._pos if n is None or n < 0 else min(n, self._len - self._pos)
        if want <= 0:
            return b""
        self._f.seek(self._start + self._pos)
        data = self._f.read(want)
        if not data:  # the file got shorter than the part
            raise FileChanged("the file was truncated while it was uploaded")
        self._pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, min(self._len, base + pos))
        return self._pos

    def tell(self) -> int:
        return self._pos


@dataclass
class Part:
    number: int
    start: int
    length: int


class Upload:
    """One multipart upload of `path` as `key`: `run()` returns the object's ETag, or raises
    (RemoteError; Stopped when a stop aborted it) with the upload aborted on the store."""

    def __init__(self, client: Any, abort: Callable[..., bool], bucket: str, key: str, path: Path, *,
                 size: int, chunk: int, checksum: str, slots: threading.Semaphore, underway: Underway,
                 stop: threading.Event | None, map_error: Callable[[BaseException, str, str], RemoteError],
                 limiter: Limiter | None = None) -> None:
        self.client, self._abort_fn, self.bucket, self.key, self.path = client, abort, bucket, key, path
        self.limiter = limiter  # bwlimit: a part's bytes take tokens as they are sent (a retry's too)
        self.underway = underway
        self.size, self.checksum, self.slots, self.stop, self.map_error = size, checksum, slots, stop, map_error
        chunk = part_size(size, chunk)
        self.parts = [Part(i + 1, off, min(chunk, size - off)) for i, off in enumerate(range(0, size, chunk))]
        self.upload_id = ""
        self._cond = threading.Condition()
        self._next = 0  # index of the next part to start
        self._sent: dict[int, dict[str, str]] = {}  # part number -> its entry in CompleteMultipartUpload
        self._running = 0  # sender threads alive
        self._halt = False  # no part starts any more
        self._aborted = False
        self._error: BaseException | None = None
        self._baseline: tuple[int, int] = (0, 0)

    # --- the coordinator (the worker's thread) --------------------------------------------------
    def run(self, extra: dict[str, Any]) -> str | None:
        with open(self.path, "rb") as f:  # before anything is created: a vanished file costs no request
            st = os.fstat(f.fileno())
        self._baseline = (st.st_size, st.st_mtime_ns)
        if st.st_size != self.size:
            raise _changed(self.key)
        if self.stop is not None and self.stop.is_set():
            raise Stopped(f"s3:PutObject {self.key}: stopped", action="s3:PutObject")
        try:
            self.upload_id = self.underway.create(
                lambda: str(self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key, **extra)["UploadId"]))
        except Exception as e:
            raise self.map_error(e, "s3:PutObject", self.key) from e
        completed = False
        try:
            stopped = self._send_parts()
            if stopped:
                log.info("stopping: aborting the multipart upload of %s (%d of %d parts sent); the file is sent "
                         "again at the next start", self.key, len(self._sent), len(self.parts))
                raise Stopped(f"s3:PutObject {self.key}: stopped", action="s3:PutObject")
            if self._error is not None:
                raise self._failure(self._error)
            etag = self._complete()
            completed = True
            return etag
        finally:
            if not completed:
                self._abort()
            self.underway.ended(self.upload_id)

    def _send_parts(self) -> bool:
        """Send every part; True when a stop ended it first. On a part's failure the others in
        flight end first (their requests would land after the abort), unless a stop comes."""
        workers = [threading.Thread(target=self._sender, name="syncd-part", daemon=True)
                   for _ in range(min(PART_CONCURRENCY, len(self.parts)))]
        with self._cond:
            self._running = len(workers)
        for t in workers:
            t.start()
        grace: float | None = None
        with self._cond:
            while True:
                if self.stop is not None and self.stop.is_set():
                    self._halt = True
                    if self._next < len(self.parts):  # parts never started: it cannot complete
                        return True
                    grace = grace or time.monotonic() + STOP_GRACE
                    if len(self._sent) == len(self.parts):
                        return False
                    if time.monotonic() > grace or self._error is not None:
                        return True
                elif self._error is not None:
                    self._halt = True
                    if self._running == 0:
                        return False
                elif len(self._sent) == len(self.parts):
                    return False
                self._cond.wait(POLL)

    def _complete(self) -> str | None:
        parts = [self._sent[p.number] for p in self.parts]
        try:
            resp = self.client.complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                                         MultipartUpload={"Parts": parts})
        except Exception as e:
            raise self.map_error(e, "s3:PutObject", self.key) from e
        return str(resp.get("ETag", "")).strip('"') or None

    def _failure(self, e: BaseException) -> RemoteError:
        if isinstance(e, FileChanged) or self._changed():
            return _changed(self.key)
        err = self.map_error(e, "s3:PutObject", self.key)
        err.__cause__ = e
        return err

    def _changed(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False  # gone: the caller sees it
        return (st.st_size, st.st_mtime_ns) != self._baseline

    def _abort(self) -> None:
        with self._cond:
            self._halt = True
            self._aborted = True
        self._abort_fn(self.bucket, self.key, self.upload_id)

    # --- the parts (daemon threads: a stop does not wait for a part in flight) -----------------
    def _sender(self) -> None:
        try:
            with open(self.path, "rb") as f:
                while self._take_slot():
                    try:
                        part = self._claim()
                        if part is None:
                            return
                        self._send(f, part)
                    finally:
                        self.slots.release()
        except BaseException as e:  # noqa: BLE001 - handed to the coordinator
            with self._cond:
                if self._error is None:
                    self._error = e
                self._halt = True
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def _take_slot(self) -> bool:
        while not self._halt:
            if self.slots.acquire(timeout=POLL):
                return True
        return False

    def _claim(self) -> Part | None:
        with self._cond:
            if self._halt or self._next >= len(self.parts):
                return None
            self._next += 1
            return self.parts[self._next - 1]

    def _send(self, f: Any, part: Part) -> None:
        self._unchanged(f)
        body = PartBody(f, part.start, part.length)
        args: dict[str, Any] = {}
        if self.checksum == "sha256":
            args["ChecksumAlgorithm"] = "SHA256"
            args["ChecksumSHA256"] = base64.b64encode(_digest(body, "sha256")).decode()
        elif self.checksum == "md5":
            args["ContentMD5"] = base64.b64encode(_digest(body, "md5")).decode()
        sent = body if self.limiter is None else MeteredBody(body, self.limiter)
        resp = self.client.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                       PartNumber=part.number, Body=sent, ContentLength=part.length, **args)
        self._unchanged(f)  # what was sent is the file's content since the upload began
        entry = {"PartNumber": part.number, "ETag": resp["ETag"]}
        if self.checksum == "sha256":
            entry["ChecksumSHA256"] = resp.get("ChecksumSHA256") or args["ChecksumSHA256"]
        with self._cond:
            self._sent[part.number] = entry
            late = self._aborted
            self._cond.notify_all()
        if late:  # it landed after the abort (S3: parts in flight may): abort again, quietly
            self._abort_fn(self.bucket, self.key, self.upload_id, quiet=True)

    def _unchanged(self, f: Any) -> None:
        st = os.fstat(f.fileno())
        if (st.st_size, st.st_mtime_ns) != self._baseline:
            raise FileChanged("the file changed while it was uploaded")


def _digest(body: PartBody, algorithm: str) -> bytes:
    h = hashlib.new(algorithm, usedforsecurity=False)
    left = len(body)
    while left > 0:
        chunk = body.read(min(CHUNK, left))
        h.update(chunk)
        left -= len(chunk)
    body.seek(0)
    return h.digest()


def _changed(key: str) -> RemoteError:
    # INTEGRITY: the file goes back to settling, then is uploaded whole (syncd.transfers)
    return RemoteError(INTEGRITY, f"s3:PutObject {key}: the file changed while it was uploaded",
                       code="FileChanged", action="s3:PutObject")


def abort(client: Any, bucket: str, key: str, upload_id: str, map_error: Callable[..., RemoteError], *,
          quiet: bool = False) -> bool:
    """AbortMultipartUpload, once (`client` has short timeouts). False when it failed: then one
    warning (none when `quiet`) with the upload id, for an operator to abort it by hand."""
    try:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        return True
    except Exception as e:  # noqa: BLE001 - best effort: the file's own outcome is what counts
        err = map_error(e, "s3:AbortMultipartUpload", key)
        if err.kind == NOT_FOUND:  # gone already (completed, or aborted by another request)
            return True
        (log.debug if quiet else log.warning)(
            "could not abort multipart upload %s of %s (%s): its parts stay until syncd's next start or a "
            "lifecycle rule aborts it", upload_id, key, err.cause)
        return False


def stale(uploads: Iterable[dict[str, Any]], bases: Mapping[str, float], *, now: float,
          mine: set[str], ours: Callable[[str], bool] = lambda _key: True) -> list[dict[str, Any]]:
    """The uploads to abort at start: those under a watch's key base (`bases`: base -> the age in
    seconds an upload must have there) that are not this process's own (`mine`: upload ids), of
    keys this host uploads (`ours`: another tool's upload under way is not syncd's to abort)."""
    out = []
    for u in uploads:
        key = u.get("Key", "")
        if u.get("UploadId") in mine or not ours(key):
            continue
        ages = [min_age for base, min_age in bases.items() if key.startswith(base + "/" if base else "")]
        if not ages:
            continue
        started = u.get("Initiated")
        if (now - started.timestamp() if isinstance(started, datetime) else 0.0) >= max(ages):
            out.append(u)
    return out
