"""S3 PUTs and GETs through awscrt's native S3 client (`[remote] transfers`), behind `S3Remote`.

Why: a restore of many small files is bound by the client's CPU on the botocore path (botocore
builds, signs and parses each request in Python under the GIL: ~60% of 2.2-2.7 ms per 4 KiB
file). awscrt does the HTTP, the signing and the connection pool in C, off the GIL.

What goes this way (`S3Remote.put` / `get` hand it over), and what stays on botocore:
- PUTs of bodies up to CRT_PUT_MAX, as one PutObject that syncd builds itself, with exactly the
  headers of the botocore path: the SHA-256 the server verifies (x-amz-checksum-sha256, or
  Content-MD5), `syncd-sha256`/`syncd-mtime-ns`, type, storage class, SSE/KMS. awscrt reads a
  request body whole into memory before it sends it, so a larger file (streamed by botocore) and
  multipart uploads (whose parts, file-change checks and abort at a stop live in
  `syncd.remote.multipart`) stay on botocore.
- GETs of syncd's own objects (those with `syncd-sha256`, which the restore checks over the bytes
  written) of up to CRT_GET_MAX, streamed into the caller's writer. Any other object (another
  tool's, maybe with a composite checksum to check part by part; a larger one) is given up here
  at its headers, before any byte is written, and fetched by botocore (one request more); so are
  versions (`restore --at`).

Retries: awscrt cannot be told to try once; MAX_RETRIES = 1 is its least (one retry inside a
ledger attempt, for the botocore path none). A request that moves no byte for READ_TIMEOUT is
cancelled (botocore's read timeout). At a stop (`interrupt_on`), requests in flight get
STOP_GRACE to end, then are cancelled and raise Stopped: the row goes back as it was, the
restore's temp file is removed (SPEC §4.10); botocore's cannot be interrupted.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from io import BytesIO
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit

import botocore.exceptions as bexc

from syncd import __version__
from syncd.remote.base import (
    CREDENTIALS,
    INTEGRITY,
    TRANSIENT,
    UNREACHABLE,
    Fetched,
    ObjectInfo,
    RemoteError,
    Stopped,
)
from syncd.remote.multipart import STOP_GRACE

log = logging.getLogger(__name__)
MIB = 1024 * 1024
CRT_PUT_MAX = 8 * MIB  # bodies awscrt holds whole in memory: at most this much per request
# GETs of larger objects go to botocore: awscrt fetches them in PART_SIZE ranges, which cost
# 1.7x the client CPU of botocore's one stream for a 512 MiB object (and 10x the time on moto,
# which copies the whole object for each range); up to it, one request
CRT_GET_MAX = PART_SIZE = 8 * MIB
THROUGHPUT_GBPS = 10.0  # awscrt's default, at least; syncd's threads bound the requests in flight
# awscrt opens throughput_target_gbps / 0.4 connections at most (its default 10 Gbps: 25, fewer than
# syncd's 32 small requests in flight): the target is raised to give each request of syncd's one
GBPS_PER_CONNECTION = 0.4
MAX_RETRIES = 1
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
WAIT_STEP = 1.0  # how often a waiting caller looks at the clock
STOP_STEP = 0.1  # ... and for a stop, once one can come

# awscrt's error names, sorted into syncd's kinds (the rest are TRANSIENT)
_UNREACHABLE = {"AWS_IO_SOCKET_CONNECTION_REFUSED", "AWS_IO_SOCKET_TIMEOUT", "AWS_IO_SOCKET_NO_ROUTE_TO_HOST",
                "AWS_IO_SOCKET_NETWORK_DOWN", "AWS_IO_DNS_QUERY_FAILED", "AWS_IO_DNS_INVALID_NAME",
                "AWS_IO_DNS_NO_ADDRESS_FOR_HOST", "AWS_IO_DNS_HOST_REMOVED_FROM_CACHE"}
_INTEGRITY = {"AWS_ERROR_S3_RESPONSE_CHECKSUM_MISMATCH", "AWS_ERROR_S3_CHECKSUM_CALCULATION_FAILED"}
_RESPONSE_CODES = {"AWS_ERROR_S3_SLOW_DOWN": ("SlowDown", 503), "AWS_ERROR_S3_INTERNAL_ERROR": ("InternalError", 500),
                   "AWS_ERROR_S3_REQUEST_TIME_TOO_SKEWED": ("RequestTimeTooSkewed", 403)}


class NotForCrt(Exception):
    """The object is not one this path fetches (no syncd-sha256): botocore fetches it."""


class QuietBody:
    """A request body for awscrt that never raises into it: awscrt prints an exception its
    stream raises (a traceback and "Treating Python exception as error" on stderr, the daemon's
    log) before it fails the request. A read or rewind that fails (SizedBody: the file changed
    while sent) ends the body early instead, which awscrt refuses at once as shorter than its
    Content-Length (AWS_ERROR_S3_INCORRECT_CONTENT_LENGTH); `error` keeps what was raised."""

    def __init__(self, body: Any) -> None:
        self._body = body
        self.error: Exception | None = None

    def read(self, n: int = -1) -> bytes:
        if self.error is not None:
            return b""
        try:
            return bytes(self._body.read(n))
        except Exception as e:  # noqa: BLE001 - kept for the caller, which raises it
            self.error = e
            return b""

    def seek(self, pos: int, whence: int = 0) -> int:
        if self.error is not None:
            return pos
        try:
            return int(self._body.seek(pos, whence))
        except Exception as e:  # noqa: BLE001 - as in read
            self.error = e
            return pos


class CrtTransfers:
    """One awscrt S3Client for one bucket. Thread-safe: each call waits for its own request."""

    def __init__(self, *, bucket: str, endpoint_url: str, region: str, credentials: Callable[[], Any],
                 ca_bundle: str | None, map_error: Callable[[BaseException, str, str], RemoteError],
                 info: Callable[[str, dict[str, Any]], ObjectInfo], in_flight: int = 0) -> None:
        """`in_flight`: the requests syncd's threads make at once at most (small files)."""
        from awscrt import auth, io, s3

        self._s3, self._map_error, self._info = s3, map_error, info
        self.bucket = bucket
        if endpoint_url:  # path style, as the botocore client with an endpoint
            ep = urlsplit(endpoint_url)
            tls = ep.scheme == "https"
            self.host = ep.netloc
            self._base = f"{ep.path.rstrip('/')}/{quote(bucket, safe='')}/"
        else:
            suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
            tls = True
            if bucket == bucket.lower() and "." not in bucket:  # virtual-hosted, as botocore on AWS
                self.host, self._base = f"{bucket}.s3.{region}.{suffix}", "/"
            else:
                self.host, self._base = f"s3.{region}.{suffix}", f"/{quote(bucket, safe='')}/"
        # botocore's credentials (profile, SSO, role, refresh) are resolved by the caller's thread
        # before each request (`_signing_credentials`); awscrt's delegate only hands over the
        # last ones: a delegate that raises is printed by awscrt as an ignored exception with a
        # traceback, on stderr
        self._credentials = credentials
        self._auth = auth
        self._frozen: tuple[Any, Any] = (None, None)  # botocore's frozen credentials, awscrt's copy

        def provide() -> Any:
            return self._frozen[1]

        provider = auth.AwsCredentialsProvider.new_delegate(provide)
        tls_options = None
        if tls and ca_bundle:
            opts = io.TlsContextOptions()
            opts.override_default_trust_store_from_path(ca_filepath=ca_bundle)
            tls_options = io.ClientTlsContext(opts).new_connection_options()
        self.client = s3.S3Client(
            region=region,
            signing_config=s3.create_default_s3_signing_config(region=region, credential_provider=provider),
            tls_mode=s3.S3RequestTlsMode.ENABLED if tls else s3.S3RequestTlsMode.DISABLED,
            tls_connection_options=tls_options,
            part_size=PART_SIZE,
            throughput_target_gbps=max(THROUGHPUT_GBPS, (in_flight + 8) * GBPS_PER_CONNECTION),
            retry_config=s3.S3RetryConfig(max_retries=MAX_RETRIES),
            connect_timeout_ms=int(CONNECT_TIMEOUT * 1000),
        )
        self._agent = f"syncd/{__version__} awscrt"
        self.stop: threading.Event | None = None  # S3Remote.interrupt_on

    def _signing_credentials(self) -> None:
        """Resolve botocore's credentials for the next request (refreshed when due)."""
        c = self._credentials()
        if c is None:
            raise bexc.NoCredentialsError()
        frozen = c.get_frozen_credentials()
        if frozen != self._frozen[0]:
            self._frozen = (frozen, self._auth.AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token))

    def _path(self, key: str) -> str:
        return self._base + quote(key, safe="/~")

    # --- PUT ----------------------------------------------------------------------------
    def put(self, key: str, body: bytes | Any, size: int, extra: dict[str, Any]) -> str | None:
        """PutObject of `body` (bytes, or a file-like of exactly `size` bytes) with the botocore
        path's parameters `extra`; the new object's ETag. Raises RemoteError."""
        from awscrt.http import HttpHeaders, HttpRequest

        headers = [("Host", self.host), ("Content-Length", str(size)), ("User-Agent", self._agent),
                   *_put_headers(extra)]
        stream = BytesIO(body) if isinstance(body, bytes) else QuietBody(body)
        request = HttpRequest("PUT", self._path(key), HttpHeaders(headers), stream)
        got: dict[str, str] = {}
        try:
            self._run("PutObject", "s3:PutObject", key, request, self._s3.S3RequestType.DEFAULT, got)
        except RemoteError:
            if isinstance(stream, QuietBody) and stream.error is not None:
                raise stream.error from None  # the body's own failure (a file changed while sent)
            raise
        return got.get("etag", "").strip('"') or None

    # --- GET ----------------------------------------------------------------------------
    def get(self, key: str, dest: BinaryIO) -> Fetched | None:
        """The object's bytes into `dest`, in order; None (nothing written) when it has no
        syncd-sha256 (botocore fetches it: its checksums, a composite's parts) or is larger than
        CRT_GET_MAX."""
        from awscrt.http import HttpHeaders, HttpRequest

        request = HttpRequest("GET", self._path(key), HttpHeaders([("Host", self.host), ("User-Agent", self._agent)]))
        got: dict[str, str] = {}
        written = 0

        def on_body(chunk: bytes, offset: int, **_: Any) -> None:
            nonlocal written
            if offset != written:  # never seen: awscrt delivers a ranged GET's body in order
                raise RemoteError(TRANSIENT, f"s3:GetObject {key}: body out of order", code="OutOfOrder",
                                  action="s3:GetObject")
            dest.write(chunk)
            written += len(chunk)

        def headers_check(h: dict[str, str]) -> None:
            if "x-amz-meta-syncd-sha256" not in h or int(h.get("content-length") or 0) > CRT_GET_MAX:
                raise NotForCrt(key)

        try:
            self._run("GetObject", "s3:GetObject", key, request, self._s3.S3RequestType.GET_OBJECT, got,
                      on_body=on_body, check=headers_check)
        except NotForCrt:
            return None
        return Fetched(info=self._info(key, _response(got)), server_verified=False)

    # --- one request --------------------------------------------------------------------
    def _run(self, operation: str, action: str, key: str, request: Any, kind: Any, got: dict[str, str], *,
             on_body: Callable[..., None] | None = None,
             check: Callable[[dict[str, str]], None] | None = None) -> None:
        """Send `request` and wait for its end; its response headers (lowercase) into `got`."""
        moved = [time.monotonic()]

        def on_headers(status_code: int, headers: list[tuple[str, str]], **_: Any) -> None:
            moved[0] = time.monotonic()
            h = {k.lower(): v for k, v in headers}
            if 200 <= status_code < 300 and check is not None:
                check(h)
            got.update(h)

        def body(chunk: bytes, offset: int, **_: Any) -> None:
            moved[0] = time.monotonic()
            assert on_body is not None
            on_body(chunk, offset)

        def on_progress(_n: int, **__: Any) -> None:
            moved[0] = time.monotonic()

        extra: dict[str, Any] = {"operation_name": operation} if kind == self._s3.S3RequestType.DEFAULT else {}
        try:
            self._signing_credentials()
            req = self.client.make_request(type=kind, request=request, on_headers=on_headers,
                                           on_body=body if on_body is not None else None,
                                           on_progress=on_progress, **extra)
        except Exception as e:  # no credentials, or awscrt refused to start it
            raise self._error(e, action, key) from e
        fut = req.finished_future
        stop, stopping = self.stop, 0.0
        while True:
            done, _ = concurrent.futures.wait([fut], timeout=WAIT_STEP if stop is None else STOP_STEP)
            if done:
                break
            now = time.monotonic()
            if stop is not None and stop.is_set():
                stopping = stopping or now
                if now - stopping > STOP_GRACE:
                    self._cancel(req)
                    raise Stopped(f"{action} {key}: stopped", action=action)
            if now - moved[0] > READ_TIMEOUT:
                self._cancel(req)
                raise RemoteError(TRANSIENT, f"{action} {key}: no answer for {READ_TIMEOUT:.0f} s",
                                  code="ReadTimeout", action=action)
        failure = fut.exception()
        if failure is not None:
            raise self._error(failure, action, key) from failure

    @staticmethod
    def _cancel(req: Any) -> None:
        """End a request; return once awscrt is done with it (its callbacks write no more)."""
        req.cancel()
        concurrent.futures.wait([req.finished_future], timeout=CONNECT_TIMEOUT)

    def _error(self, e: BaseException, action: str, key: str) -> BaseException:
        if isinstance(e, NotForCrt):
            return e
        return crt_error(e, action, key, self._map_error)


def crt_error(e: BaseException, action: str, key: str,
              map_error: Callable[[BaseException, str, str], RemoteError]) -> RemoteError:
    """An awscrt failure as the RemoteError the botocore path would raise for it."""
    from awscrt.exceptions import AwsCrtError
    from awscrt.s3 import S3ResponseError

    if isinstance(e, S3ResponseError) and e.status_code:
        code, msg = _xml_error(e.body)
        response = {"Error": {"Code": code or str(e.status_code), "Message": msg or ""},
                    "ResponseMetadata": {"HTTPStatusCode": int(e.status_code),
                                         "HTTPHeaders": {k.lower(): v for k, v in e.headers or ()}}}
        if e.status_code == 412 and action == "s3:GetObject":  # a later range: overwritten meanwhile
            return RemoteError(TRANSIENT, f"{key} changed while it was read", code="ObjectChanged", action=action)
        return map_error(bexc.ClientError(response, action.split(":", 1)[1]), action, key)
    if isinstance(e, AwsCrtError):
        name = e.name
        if name in _RESPONSE_CODES:
            code, status = _RESPONSE_CODES[name]
            response = {"Error": {"Code": code, "Message": e.message}, "ResponseMetadata": {"HTTPStatusCode": status}}
            return map_error(bexc.ClientError(response, action.split(":", 1)[1]), action, key)
        if name.startswith("AWS_AUTH_"):
            return RemoteError(CREDENTIALS, f"no usable AWS credentials: {e.message}", code=name, action=action)
        if name in _UNREACHABLE:
            return RemoteError(UNREACHABLE, f"cannot reach the S3 endpoint: {e.message} ({name})", code="Unreachable",
                               action=action)
        if name in _INTEGRITY:
            return RemoteError(INTEGRITY, f"{action} {key}: checksum mismatch while reading", code="ChecksumMismatch",
                               action=action)
        return RemoteError(TRANSIENT, f"{action} {key}: {name}: {e.message}", code=name, action=action)
    return map_error(e, action, key)


def _xml_error(body: bytes | None) -> tuple[str, str]:
    if not body:
        return "", ""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return "", ""
    return root.findtext("Code") or "", root.findtext("Message") or ""


# botocore's parameter -> its header (the ones `S3Remote` sends)
_HEADERS = {"ContentType": "Content-Type", "StorageClass": "x-amz-storage-class",
            "ServerSideEncryption": "x-amz-server-side-encryption",
            "SSEKMSKeyId": "x-amz-server-side-encryption-aws-kms-key-id", "ContentMD5": "Content-MD5",
            "ChecksumSHA256": "x-amz-checksum-sha256", "ChecksumAlgorithm": "x-amz-sdk-checksum-algorithm"}


def _put_headers(extra: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for name, value in extra.items():
        if name == "Metadata":
            out += [(f"x-amz-meta-{k}", str(v)) for k, v in value.items()]
        else:
            out.append((_HEADERS[name], str(value)))  # KeyError: a parameter this path does not know
    return out


def _response(h: dict[str, str]) -> dict[str, Any]:
    """GetObject's response headers as botocore's parsed answer (what `S3Remote._info` reads)."""
    resp: dict[str, Any] = {"Metadata": {k[len("x-amz-meta-"):]: v for k, v in h.items() if k.startswith("x-amz-meta-")},
                            "ContentLength": int(h.get("content-length") or 0), "ETag": h.get("etag", "")}
    try:
        resp["LastModified"] = parsedate_to_datetime(h["last-modified"])
    except (KeyError, TypeError, ValueError):
        pass
    return resp

