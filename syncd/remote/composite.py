"""Checking an S3 COMPOSITE (multipart) checksum, which botocore skips (PITFALLS §10).

Other tools' multipart uploads (`aws s3 cp`, boto3 `upload_file`) leave objects without
`syncd-sha256` whose checksum is `base64(H(H(part 1) + ... + H(part N)))-N`, H being the
object's algorithm (CRC32 by default, CRC32C, SHA1, SHA256; CRC64NVME is only ever a
FULL_OBJECT checksum, which botocore checks). To check one, the body is hashed part by part while
it streams to the temp file, at the boundaries the store gives: GetObjectAttributes (ObjectParts,
1000 parts a request), or, where that is refused or lists no parts (moto 5.2.5), a HEAD per part
(PartNumber=N: that part's Content-Length). Only these objects cost the extra request(s).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import botocore.exceptions as bexc
from awscrt import checksums

from syncd.remote.base import INTEGRITY, TRANSIENT, RemoteError

log = logging.getLogger(__name__)
MAX_PARTS = 1000  # parts a GetObjectAttributes answer lists at most


class _Hash(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def digest(self) -> bytes: ...


class _Crc:
    """A CRC with hashlib's two methods (update, digest): the big-endian bytes S3 encodes."""

    def __init__(self, fn: Any, width: int) -> None:
        self.fn, self.width, self.value = fn, width, 0

    def update(self, data: bytes | memoryview, /) -> None:
        self.value = self.fn(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(self.width, "big")


_ALGORITHMS: dict[str, Any] = {
    "CRC32": lambda: _Crc(zlib.crc32, 4),
    "CRC32C": lambda: _Crc(checksums.crc32c, 4),  # awscrt: a dependency through botocore[crt]
    "SHA1": lambda: hashlib.sha1(usedforsecurity=False),
    "SHA256": hashlib.sha256,
}


@dataclass(frozen=True)
class Composite:
    algorithm: str  # CRC32, CRC32C, SHA1 or SHA256
    value: str  # base64 of the checksum of the parts' checksums
    parts: int | None  # N of the "-N" suffix, when the store sent it


def composite_of(resp: dict[str, Any]) -> Composite | None:
    """The composite checksum of a GetObject answer (ChecksumMode ENABLED), or None."""
    for alg in _ALGORITHMS:
        value = str(resp.get(f"Checksum{alg}") or "")
        if not value:
            continue
        base, dash, n = value.rpartition("-")  # "-" is not a base64 character
        if dash and n.isdigit():
            return Composite(alg, base, int(n))
        if resp.get("ChecksumType") == "COMPOSITE":
            return Composite(alg, value, None)
    return None


class PartCheck:
    """Passes writes on to `dest` and hashes them part by part; `check` compares the result."""

    def __init__(self, comp: Composite, sizes: list[int], dest: BinaryIO) -> None:
        self.comp, self.sizes, self.dest = comp, sizes, dest
        self._new = _ALGORITHMS[comp.algorithm]
        self._h: _Hash = self._new()
        self._i, self._left = 0, sizes[0]
        self._digests: list[bytes] = []
        self._extra = False  # more bytes than the parts hold

    def write(self, b: bytes) -> int:  # the one method of BinaryIO a remote uses
        view = memoryview(b)
        while view:
            if self._i >= len(self.sizes):
                self._extra = True
                break
            take = min(len(view), self._left)
            if take:
                self._h.update(view[:take])
                view, self._left = view[take:], self._left - take
            if not self._left:
                self._next_part()
        return self.dest.write(b)

    def _next_part(self) -> None:
        self._digests.append(self._h.digest())
        self._h, self._i = self._new(), self._i + 1
        self._left = self.sizes[self._i] if self._i < len(self.sizes) else 0

    def check(self, what: str) -> None:
        """RemoteError(INTEGRITY) unless the bytes written match the composite checksum."""
        while self._i < len(self.sizes) and not self._left:  # empty parts at the end
            self._next_part()
        whole = self._i == len(self.sizes) and not self._extra
        h = self._new()
        h.update(b"".join(self._digests))
        if not whole or base64.b64encode(h.digest()).decode() != self.comp.value:
            raise RemoteError(INTEGRITY, f"{what}: checksum mismatch while reading (composite "
                                         f"{self.comp.algorithm} of {len(self.sizes)} parts)",
                              code="ChecksumMismatch", action="s3:GetObject")


_said_denied = False


def part_sizes(client: Any, bucket: str, key: str, *, etag: str, size: int, parts: int | None,
               version_id: str | None = None) -> list[int] | None:
    """The sizes of the object's parts, in order, or None when the store does not say.

    `etag`: the GET's; GetObjectAttributes answering about another object (overwritten since)
    raises RemoteError(TRANSIENT): the file is fetched again."""
    extra = {"VersionId": version_id} if version_id else {}
    sizes = _from_attributes(client, bucket, key, etag, extra)
    if sizes is None:
        sizes = _from_heads(client, bucket, key, parts, extra)
    if sizes is None or sum(sizes) != size or (parts is not None and len(sizes) != parts) or not sizes:
        log.debug("no part sizes for %s (%s)", key, sizes and f"{len(sizes)} parts, {sum(sizes)} bytes")
        return None
    return sizes


def _from_attributes(client: Any, bucket: str, key: str, etag: str, extra: dict[str, str]) -> list[int] | None:
    global _said_denied
    sizes: list[int] = []
    marker = 0
    while True:
        try:
            resp = client.get_object_attributes(Bucket=bucket, Key=key, ObjectAttributes=["ObjectParts", "ETag"],
                                                MaxParts=MAX_PARTS, PartNumberMarker=marker, **extra)
        except bexc.ClientError as e:
            if not _not_for_us(e):
                raise
            if not _said_denied:  # once: every such object takes this way
                _said_denied = True
                log.info("GetObjectAttributes refused (%s): composite checksums are checked with a HEAD "
                         "per part (grant s3:GetObjectAttributes, see `syncd iam-policy`)", _code(e))
            return None
        if str(resp.get("ETag") or etag).strip('"') != etag:
            raise _changed(key)
        op = resp.get("ObjectParts") or {}
        listed = op.get("Parts") or []
        if not listed:
            return None
        sizes += [int(p["Size"]) for p in listed]
        if not op.get("IsTruncated"):
            return sizes
        marker = int(op.get("NextPartNumberMarker") or listed[-1]["PartNumber"])


def _from_heads(client: Any, bucket: str, key: str, parts: int | None,
                extra: dict[str, str]) -> list[int] | None:
    # one at a time: the way of stores that refuse GetObjectAttributes, not AWS's. No If-Match:
    # moto compares it with the part's ETag. An object overwritten since the GET makes the check
    # fail, and the file is fetched again at its next retry.
    sizes: list[int] = []
    n = 1
    while parts is None or n <= parts:
        try:
            resp = client.head_object(Bucket=bucket, Key=key, PartNumber=n, **extra)
        except bexc.ClientError as e:
            if _not_for_us(e):
                return None
            raise
        count = int(resp.get("PartsCount") or 0)
        if not count or (parts is not None and count != parts):  # the store ignored PartNumber
            return None
        parts = count
        sizes.append(int(resp.get("ContentLength") or 0))
        n += 1
    return sizes


def _code(e: bexc.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def _not_for_us(e: bexc.ClientError) -> bool:
    """A refusal (denied, not implemented, a bad part number) rather than a passing failure."""
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return (400 <= status < 500 and status not in (408, 429)) or status == 501 or _code(e) == "NotImplemented"


def _changed(key: str) -> RemoteError:
    return RemoteError(TRANSIENT, f"{key} changed while it was read", code="ObjectChanged", action="s3:GetObject")
