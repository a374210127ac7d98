"""The remote interface every backend implements, and the errors they all map to.

Backends translate vendor errors into `RemoteError` with a `kind`; `syncd.retry` decides from
the kind alone what is retried (like rclone's shared errors + one `shouldRetry`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

META_SHA = "syncd-sha256"
META_MTIME = "syncd-mtime-ns"

# Error kinds. "transient" is retried with backoff; the others mark the file failed.
TRANSIENT = "transient"  # timeouts, connection errors, 5xx, SlowDown, RequestTimeout
UNREACHABLE = "unreachable"  # nothing answers at the endpoint (transient for the daemon)
DENIED = "denied"  # AccessDenied on an action
CREDENTIALS = "credentials"  # missing, rejected or expired credentials
NO_BUCKET = "no_bucket"
NOT_FOUND = "not_found"  # the object does not exist
INTEGRITY = "integrity"  # checksum mismatch
INVALID = "invalid"  # the request itself is bad (key too long, ...)
LOCAL = "local"  # a local file-system problem (permission, disk full)


class RemoteError(Exception):
    """A remote operation failed. `kind` is one of the constants above; `code` the vendor code."""

    def __init__(self, kind: str, message: str, *, code: str = "", action: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code
        self.action = action

    @property
    def cause(self) -> str:
        """A short stable description used to group log lines and status errors."""
        if self.kind == DENIED:
            return f"AccessDenied: {self.action}" if self.action else f"AccessDenied: {self}"
        return f"{self.code or self.kind}: {self}"


class Stopped(RemoteError):
    """A transfer a stop ended early (its multipart upload aborted): not the file's failure, so
    its row goes back to the queue as it was (SPEC §4.10)."""

    def __init__(self, message: str, *, code: str = "Stopped", action: str = "") -> None:
        super().__init__(TRANSIENT, message, code=code, action=action)


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str | None = None  # syncd-sha256 metadata (lowercase hex), when known
    mtime_ns: int | None = None  # syncd-mtime-ns metadata, else the store's modification time
    etag: str = ""  # the store's version tag (S3: the ETag; file://: size and mtime), for listings
    # the store's own modification time (S3: LastModified; file://: the file's mtime), what a
    # listing shows: tombstones are compared by it, whoever asks (tombstones.hides)
    modified_ns: int | None = None


@dataclass(frozen=True)
class Fetched:
    """What `Remote.get` wrote: the object's metadata and the server-verified checksum status."""

    info: ObjectInfo
    server_verified: bool  # the store's own checksum was checked while reading


@dataclass(frozen=True)
class VersionInfo:
    """One entry of a versioned listing: an object version or a delete marker."""

    key: str
    version_id: str
    last_modified: datetime  # timezone-aware
    size: int = 0
    is_latest: bool = False
    delete_marker: bool = False


class Remote(Protocol):
    """A flat key space. Keys never start with `/`."""

    name: str

    def probe(self, prefix: str) -> None:
        """Raise RemoteError unless keys under `prefix` can be listed (unreachable, credentials,
        bucket, permission)."""

    def list(self, prefix: str, *, start_after: str = "") -> Iterator[ObjectInfo]:
        """All objects whose key starts with `prefix` (recursive, flat), in UTF-8 binary key order
        (as S3 lists), with `etag` and `mtime_ns` (the store's modification time). Metadata may be
        absent. `start_after`: only keys after it (a listing resumed after a failed page)."""

    def head(self, key: str) -> ObjectInfo | None:
        """Object info with metadata, or None when the key does not exist."""

    def put(self, key: str, path: Path, *, size: int, sha256: str, mtime_ns: int,
            data: bytes | None = None) -> str | None:
        """Upload the file at `path` as `key`, with its checksum verified by the server.

        `data`: the file's bytes when the caller already read them (small files): sent as is.
        Returns the new object's etag as a listing will show it (None when unknown)."""

    def get(self, key: str, dest: BinaryIO, *, version_id: str | None = None) -> Fetched:
        """Write the object's bytes into `dest` (that version's, with `version_id`: S3 only;
        other remotes refuse it with RemoteError(INVALID)). RemoteError(NOT_FOUND) when missing."""

    def copy(self, src: str, dst: str, *, sha256: str, mtime_ns: int,
             expect_sha256: str | None = None) -> str | None:
        """Server-side copy; RemoteError(NOT_FOUND) when `src` is gone, or, with `expect_sha256`,
        when `src` no longer holds that content (then `dst` may hold anything: upload it).
        Returns the copy's etag (None when unknown)."""

    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is not an error."""

    def close(self) -> None:
        """Release connections."""


# --- optional abilities: callers use them when a remote has them (like rclone's optional interfaces)
@runtime_checkable
class Interruptible(Protocol):
    def interrupt_on(self, stop: threading.Event) -> None:
        """Transfers in flight when `stop` is set end early, leaving nothing behind on the store
        (S3: a multipart upload is aborted); they raise Stopped."""


@runtime_checkable
class OpenUploads(Protocol):
    def abort_stale_uploads(self, bases: Mapping[str, float],
                            ours: Callable[[str], bool] = ...) -> int:
        """Abort the uploads a killed process left open under these key bases (base -> the age
        in seconds an upload must have there to be called stale) of the keys `ours` accepts; how
        many were aborted. Never
        raises: a store that cannot list them is reported and left alone."""
