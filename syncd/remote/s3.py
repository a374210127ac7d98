"""S3 remote (botocore): one shared client, multipart uploads that abort what they leave
(`syncd.remote.multipart`), server-verified checksums.

Who retries: botocore is set to a single attempt; syncd's ledger owns every retry of a file
(backoff in `syncd.retry`), so attempts never multiply across layers (PITFALLS §2). The one
exception is a part of a multipart upload: its own client retries it (`PART_ATTEMPTS`), as the
ledger can only send the whole file again.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import logging
import mimetypes
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, cast

import botocore.exceptions as bexc
import botocore.session
from botocore.config import Config as BotoConfig
from botocore.httpchecksum import StreamingChecksumBody
from botocore.utils import determine_content_length, parse_timestamp

from syncd import __version__
from syncd.bwlimit import Limiter, MeteredBody, MeteredWriter, start_metering
from syncd.config import RemoteConfig
from syncd.errors import ConfigError
from syncd.fsutil import CHUNK, SMALL_FILE, SizedBody
from syncd.lane import lane_size, per_worker
from syncd.remote import composite, multipart
from syncd.remote.base import (
    CREDENTIALS,
    DENIED,
    INTEGRITY,
    INVALID,
    LOCAL,
    META_MTIME,
    META_SHA,
    NO_BUCKET,
    NOT_FOUND,
    TRANSIENT,
    UNREACHABLE,
    Fetched,
    ObjectInfo,
    RemoteError,
    VersionInfo,
)
from syncd.remote.s3_crt import CRT_PUT_MAX, CrtTransfers

log = logging.getLogger(__name__)
MIB = 1024 * 1024
PART_CONCURRENCY = multipart.PART_CONCURRENCY
PART_ATTEMPTS = 3  # tries of one part of a multipart upload before the file goes back to the ledger

_CRED_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
               "TokenRefreshRequired", "ExpiredTokenException", "InvalidClientTokenId",
               "AuthorizationHeaderMalformed", "UnrecognizedClientException"}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "403", "Forbidden", "AccountProblem",
                 "KMS.AccessDeniedException", "AccessDeniedException"}
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
                    "ThrottlingException", "RequestTimeTooSkewed", "OperationAborted", "503", "500",
                    "502", "504", "RequestLimitExceeded", "TooManyRequests", "429",
                    "KMS.ThrottlingException"}
_INTEGRITY_CODES = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch",
                    "XAmzContentChecksumMismatch", "InvalidChecksum"}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}


def map_error(e: BaseException, action: str, target: str = "") -> RemoteError:
    """Translate a boto/botocore/urllib3 exception into a RemoteError (kind + code + action)."""
    where = f" {target}" if target else ""
    if isinstance(e, RemoteError):
        return e
    if isinstance(e, bexc.ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        msg = err.get("Message") or code
        if code in _CRED_CODES:
            return RemoteError(CREDENTIALS, f"credentials rejected ({code}): {msg}", code=code, action=action)
        if code == "NoSuchBucket":
            return RemoteError(NO_BUCKET, f"bucket does not exist: {msg}", code=code, action=action)
        if code in _INTEGRITY_CODES:
            return RemoteError(INTEGRITY, f"{action}{where}: checksum rejected by the server ({code})",
                               code=code, action=action)
        if code in _NOT_FOUND_CODES or status == 404:
            return RemoteError(NOT_FOUND, f"{action}{where}: not found", code=code or "404", action=action)
        if code in _DENIED_CODES or status == 403:
            what = action
            if "kms" in msg.lower() or code.startswith("KMS"):
                what = "kms:GenerateDataKey/kms:Decrypt"
            return RemoteError(DENIED, f"{what} denied{where} ({code or status})", code=code or "AccessDenied",
                               action=what)
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return RemoteError(TRANSIENT, f"{action}{where}: {code or status} {msg}", code=code or str(status),
                               action=action)
        return RemoteError(INVALID, f"{action}{where}: {code} {msg}", code=code, action=action)
    if isinstance(e, (bexc.NoCredentialsError, bexc.PartialCredentialsError, bexc.ProfileNotFound,
                      bexc.CredentialRetrievalError)):
        return RemoteError(CREDENTIALS, f"no usable AWS credentials: {e}", code=type(e).__name__, action=action)
    if isinstance(e, bexc.EndpointConnectionError | bexc.ConnectTimeoutError):
        return RemoteError(UNREACHABLE, f"cannot reach the S3 endpoint: {e}", code="Unreachable", action=action)
    if isinstance(e, bexc.FlexibleChecksumError):
        return RemoteError(INTEGRITY, f"{action}{where}: checksum mismatch while reading", code="ChecksumMismatch",
                           action=action)
    if isinstance(e, (bexc.ReadTimeoutError, bexc.ConnectionClosedError, bexc.ResponseStreamingError,
                      bexc.IncompleteReadError, bexc.HTTPClientError, bexc.ConnectionError)):
        return RemoteError(TRANSIENT, f"{action}{where}: {type(e).__name__}: {e}", code=type(e).__name__,
                           action=action)
    if isinstance(e, FileNotFoundError):
        return RemoteError(LOCAL, f"{target or e.filename} vanished", code="NoSuchFile", action=action)
    if isinstance(e, OSError):
        return RemoteError(LOCAL, f"{action}{where}: {e.strerror or e}", code=type(e).__name__, action=action)
    return RemoteError(TRANSIENT, f"{action}{where}: {type(e).__name__}: {e}", code=type(e).__name__,
                       action=action)


def crt_available() -> bool:
    """awscrt's S3 client can be imported (botocore[crt])."""
    try:
        import awscrt.s3  # noqa: F401
    except ImportError:
        return False
    return True


def fast_timestamp(value: Any) -> datetime:
    """botocore's timestamp parser, with the formats S3 sends parsed by the standard library.

    botocore hands every timestamp (each listed object's LastModified, each GET's Last-Modified)
    to dateutil's generic parser: about 50 us each, 5 s of CPU for a 100,000-object listing."""
    if isinstance(value, str):
        try:
            if value.endswith("GMT"):  # RFC 7231 date in a header
                return email.utils.parsedate_to_datetime(value)
            if value.endswith("Z") and "T" in value:  # ISO 8601 in a listing
                return datetime.fromisoformat(value)
        except (TypeError, ValueError):
            pass
    return parse_timestamp(value)


def _b64(hexdigest: str) -> str:
    return base64.b64encode(bytes.fromhex(hexdigest)).decode()


class S3Remote:
    def __init__(self, cfg: RemoteConfig, *, workers: int = 8, limiter: Limiter | None = None) -> None:
        self.cfg = cfg
        self._limiter = limiter  # bwlimit: every body sent or received takes its tokens (syncd.bwlimit)
        self.bucket = cfg.bucket
        self.name = f"s3://{cfg.bucket}/{cfg.prefix}".rstrip("/")
        # the awscrt path (syncd.remote.s3_crt), made at the first transfer; never under a bwlimit
        self._crt_mode = "botocore" if limiter is not None else cfg.transfers
        self._crt: CrtTransfers | None = None
        if self._crt_mode == "auto" and (cfg.checksum == "none" or not crt_available()):
            self._crt_mode = "botocore"
        elif self._crt_mode == "crt" and not crt_available():
            raise ConfigError('remote.transfers: "crt" needs awscrt (pip install "botocore[crt]"), which cannot '
                              'be imported')
        # small transfers in flight per worker (syncd.lane), on either path
        self.native_transfers = self._crt_mode != "botocore"
        self._per_worker = per_worker(self)
        # a botocore session, not boto3's: boto3 imports s3transfer and its resource layer at
        # once (a third of the start-up time of a one-shot resync) and syncd needs neither
        session = botocore.session.get_session()
        session.user_agent_name, session.user_agent_version = "syncd", __version__
        session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=fast_timestamp)
        if cfg.profile:
            session.set_config_variable("profile", cfg.profile)
        s3opts: dict[str, Any] = {"addressing_style": "path"} if cfg.endpoint_url else {}
        if cfg.checksum == "sha256":
            # every body syncd sends carries a signed SHA-256 header the server checks: signing
            # the body too (botocore does over plain http) would only hash each file twice more
            s3opts["payload_signing_enabled"] = False
        try:
            self.client = self._make_client(session, s3opts, workers, attempts=1)
        except bexc.ProfileNotFound as e:
            raise ConfigError(f"remote.profile: no AWS profile {cfg.profile!r} in the AWS config or "
                              f"credentials files ({e})") from e
        self._s3opts, self._workers = s3opts, workers
        self._session = session  # for the presigning client (`presign_get`)
        # Expect: 100-continue spares a large body a trip to a server that refuses it; a small one
        # only gains a round trip (and the server a reply) per file
        self.client.meta.events.register("before-sign.s3.PutObject", no_expect_for_small_bodies)
        self.threshold = int(cfg.multipart_threshold_mb * MIB)
        self._part_size = int(cfg.multipart_chunk_mb * MIB)
        self._part_concurrency = PART_CONCURRENCY * max(1, min(workers, 4))
        # parts in flight across all files: each holds a connection of the part client's pool
        self._slots = threading.BoundedSemaphore(self._part_concurrency)
        self._clients_lock = threading.Lock()
        self._part_clients: tuple[Any, Any] | None = None
        self._stop: threading.Event | None = None
        self._underway = multipart.Underway()

    def _make_client(self, session: Any, s3opts: dict[str, Any], workers: int, *, attempts: int,
                     timeout: float = 0) -> Any:
        client = session.create_client(
            "s3",
            endpoint_url=self.cfg.endpoint_url or None,
            region_name=self.cfg.region or None,
            config=BotoConfig(
                # a connection for every request in flight at once: each worker's own, its
                # batch of small files in the lane (syncd.lane), multipart parts, and a few
                # spare (an overflow is opened, used once and dropped, with a warning)
                max_pool_connections=workers + lane_size(workers, self._per_worker)
                + PART_CONCURRENCY * max(1, min(workers, 4)) + 4,
                connect_timeout=timeout or 10,
                read_timeout=timeout or 60,
                retries={"mode": "standard", "total_max_attempts": attempts},
                # syncd builds every request's parameters itself: checking them again against
                # the service model is a few percent of the CPU of a small file's request
                parameter_validation=False,
                # syncd asks for the checksum it wants explicitly (SHA-256 or Content-MD5); the SDK's
                # default CRC32 breaks many S3-compatible stores (PITFALLS §2).
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                s3=s3opts,
            ),
        )
        if self._limiter is not None:  # first: before anything (moto's in-process stub too) reads the body
            client.meta.events.register_first("before-send.s3", start_metering)
        return client

    def _multipart_clients(self) -> tuple[Any, Any]:
        """The clients of multipart uploads, made at the first large file: one whose requests are
        tried PART_ATTEMPTS times (a part that fails is sent again alone, as `aws s3 cp` and
        rclone's low-level retries do: one lost part of a large file does not cost the whole
        file again), and one of a single short try for aborts (a stop's 10 s, SPEC §4.10)."""
        with self._clients_lock:
            if self._part_clients is None:
                self._part_clients = (
                    self._make_client(self._session, self._s3opts, self._workers, attempts=PART_ATTEMPTS),
                    self._make_client(self._session, self._s3opts, 0, attempts=1,
                                      timeout=multipart.ABORT_TIMEOUT))
            return self._part_clients

    def _transfers(self) -> CrtTransfers | None:
        """The awscrt path (`syncd.remote.s3_crt`), or None: transfers go through botocore."""
        if self._crt_mode == "botocore":
            return None
        with self._clients_lock:
            if self._crt is None:
                self._crt = CrtTransfers(bucket=self.bucket, endpoint_url=self.cfg.endpoint_url,
                                         region=self._signing_region(), credentials=self._session.get_credentials,
                                         ca_bundle=self._session.get_config_variable("ca_bundle"),
                                         map_error=map_error, info=self._info,
                                         in_flight=self._workers * self._per_worker)
                self._crt.stop = self._stop
                log.debug("transfers through awscrt (remote.transfers = %s)", self.cfg.transfers)
            return self._crt

    def _signing_region(self) -> str:
        """The bucket's region, which awscrt signs for (it follows no region redirect)."""
        if self.cfg.region or self.cfg.endpoint_url:
            return str(self.cfg.region or self.client.meta.region_name or "us-east-1")
        try:
            resp = self.client.head_bucket(Bucket=self.bucket)
        except bexc.ClientError as e:
            resp = e.response
        except Exception as e:  # unreachable: asked again at the next transfer
            raise map_error(e, "s3:ListBucket", f"s3://{self.bucket}") from e
        headers = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        return str(headers.get("x-amz-bucket-region") or self.client.meta.region_name or "us-east-1")

    def _abort(self, bucket: str, key: str, upload_id: str, *, quiet: bool = False) -> bool:
        return multipart.abort(self._multipart_clients()[1], bucket, key, upload_id, map_error, quiet=quiet)

    def interrupt_on(self, stop: threading.Event) -> None:
        """A multipart upload under way when `stop` is set is aborted (`syncd.remote.multipart`),
        so is an awscrt request (`syncd.remote.s3_crt`); transfers in flight stop waiting for the
        bandwidth limit."""
        self._stop = stop
        if self._limiter is not None:
            self._limiter.interrupt_on(stop)
        with self._clients_lock:
            if self._crt is not None:
                self._crt.stop = stop

    # --- helpers ------------------------------------------------------------------------
    def _extra(self, key: str, sha256: str, mtime_ns: int) -> dict[str, Any]:
        args: dict[str, Any] = {"Metadata": {META_SHA: sha256, META_MTIME: str(mtime_ns)}}
        ctype, _ = mimetypes.guess_type(key, strict=False)
        if ctype:  # like `aws s3 sync`: an unknown type is left to the store (binary/octet-stream)
            args["ContentType"] = ctype
        if self.cfg.storage_class:
            args["StorageClass"] = self.cfg.storage_class
        if self.cfg.sse:
            args["ServerSideEncryption"] = self.cfg.sse
        if self.cfg.sse_kms_key_id:
            args["SSEKMSKeyId"] = self.cfg.sse_kms_key_id
        return args

    @staticmethod
    def _info(key: str, resp: dict[str, Any]) -> ObjectInfo:
        meta = {k.lower(): v for k, v in (resp.get("Metadata") or {}).items()}
        sha = meta.get(META_SHA)
        mtime = meta.get(META_MTIME)
        lm = resp.get("LastModified")
        modified_ns = int(lm.timestamp() * 1e9) if isinstance(lm, datetime) else None
        mtime_ns = int(mtime) if mtime and mtime.isdigit() else modified_ns
        size = resp.get("ContentLength", resp.get("Size", 0))
        return ObjectInfo(key=key, size=int(size), sha256=sha.lower() if sha else None, mtime_ns=mtime_ns,
                          etag=str(resp.get("ETag", "")).strip('"'), modified_ns=modified_ns)

    # --- Remote -------------------------------------------------------------------------
    def probe(self, prefix: str = "") -> None:
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)
        except Exception as e:
            raise map_error(e, "s3:ListBucket", f"s3://{self.bucket}/{prefix}") from e

    def list(self, prefix: str, *, start_after: str = "") -> Iterator[ObjectInfo]:
        try:
            more = {"StartAfter": start_after} if start_after else {}
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix, **more)
            for page in pages:
                for o in page.get("Contents", ()):
                    lm = o.get("LastModified")
                    at = int(lm.timestamp() * 1e9) if lm else None
                    yield ObjectInfo(key=o["Key"], size=int(o.get("Size", 0)), mtime_ns=at,
                                     etag=str(o.get("ETag", "")).strip('"'), modified_ns=at)
        except bexc.BotoCoreError as e:
            raise map_error(e, "s3:ListBucket", prefix) from e
        except bexc.ClientError as e:
            raise map_error(e, "s3:ListBucket", prefix) from e

    def head(self, key: str) -> ObjectInfo | None:
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as e:
            err = map_error(e, "s3:GetObject", key)
            if err.kind == NOT_FOUND:
                return None
            raise err from e
        return self._info(key, resp)

    def put(self, key: str, path: Path, *, size: int, sha256: str, mtime_ns: int,
            data: bytes | None = None) -> str | None:
        extra = self._extra(key, sha256, mtime_ns)
        body: SizedBody | None = None
        try:
            if data is None and size > self.threshold:  # *larger* than the threshold, as rclone's upload_cutoff
                if self.cfg.checksum == "sha256":
                    # per-part SHA-256, verified by the server part by part (a composite checksum)
                    extra["ChecksumAlgorithm"] = "SHA256"
                return self._multipart(key, path, size, extra)
            if self.cfg.checksum == "sha256":
                extra["ChecksumAlgorithm"] = "SHA256"
                extra["ChecksumSHA256"] = _b64(sha256)
            elif self.cfg.checksum == "md5":
                md5 = hashlib.md5(data, usedforsecurity=False).digest() if data is not None else _md5_file(path)
                extra["ContentMD5"] = base64.b64encode(md5).decode()
            crt = self._transfers()
            if data is not None:  # already read (a small file): sent from memory
                if crt is not None:
                    return crt.put(key, data, len(data), extra)
                if self._limiter is not None:
                    self._limiter.take(len(data))  # a single attempt: these bytes are sent once
                resp = self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **extra)
            else:
                with open(path, "rb") as f:
                    body = SizedBody(f, size)  # rewritten meanwhile: no hung or mixed request
                    if crt is not None and size <= CRT_PUT_MAX:
                        return crt.put(key, body, size, extra)
                    sent = body if self._limiter is None else MeteredBody(body, self._limiter)
                    resp = self.client.put_object(Bucket=self.bucket, Key=key, Body=sent, ContentLength=size,
                                                  **extra)
            return str(resp.get("ETag", "")).strip('"') or None
        except Exception as e:
            if body is not None and body.changed:  # rewritten while sent: it settles or its close comes
                raise RemoteError(INTEGRITY, f"s3:PutObject {key}: {path} changed while it was sent",
                                  code="FileChanged", action="s3:PutObject") from e
            raise map_error(e, "s3:PutObject", key) from e

    def _multipart(self, key: str, path: Path, size: int, extra: dict[str, Any]) -> str | None:
        return multipart.Upload(self._multipart_clients()[0], self._abort, self.bucket, key, path, size=size,
                                chunk=self._part_size, checksum=self.cfg.checksum, slots=self._slots,
                                underway=self._underway, stop=self._stop, map_error=map_error,
                                limiter=self._limiter).run(extra)

    def abort_stale_uploads(self, bases: Mapping[str, float],
                            ours: Callable[[str], bool] = lambda _key: True) -> int:
        """Abort the multipart uploads a killed syncd left open under `bases` (base -> the age
        an upload must have there): one listing (a page, up to 1000) under their common prefix.
        A store that denies it or does not implement it is told once at info and left alone."""
        common = os.path.commonprefix([b + "/" if b else "" for b in bases])
        try:
            resp = self._multipart_clients()[1].list_multipart_uploads(Bucket=self.bucket, Prefix=common)
        except Exception as e:  # noqa: BLE001 - best effort: a lifecycle rule is the other way
            log.info("cannot list the multipart uploads under s3://%s/%s (%s): uploads a killed syncd left open "
                     "stay until a lifecycle rule aborts them", self.bucket, common,
                     map_error(e, "s3:ListBucketMultipartUploads", common).cause)
            return 0
        mine = self._underway.ids(timeout=10.0)  # this process's own, created before the listing
        if mine is None:
            log.debug("multipart uploads are being created for 10 s: none is called stale this time")
            return 0
        aborted = 0
        for u in multipart.stale(resp.get("Uploads") or (), bases, now=time.time(), mine=mine, ours=ours):
            aborted += self._abort(self.bucket, u["Key"], u["UploadId"])
        if aborted:
            log.info("aborted %d multipart uploads left open (by a syncd killed mid-upload) under s3://%s/%s", aborted,
                     self.bucket, common)
        return aborted

    def get(self, key: str, dest: BinaryIO, *, version_id: str | None = None) -> Fetched:
        action = "s3:GetObjectVersion" if version_id else "s3:GetObject"
        try:
            crt = None if version_id else self._transfers()
            if crt is not None:
                fetched = crt.get(key, dest)
                if fetched is not None:
                    return fetched  # else: not syncd's, or above 8 MiB; nothing written: botocore fetches it
            extra = {"VersionId": version_id} if version_id else {}
            resp = self.client.get_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED", **extra)
            body = resp["Body"]
            # botocore checks a full-object checksum at the end of the body (FlexibleChecksumError)
            # only when it wrapped the body to do so: it skips, silently, a composite checksum and
            # an algorithm it cannot compute (CRC32C and CRC64NVME need awscrt, PITFALLS §9)
            verified = isinstance(body, StreamingChecksumBody) and \
                resp.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT"
            info = self._info(key, resp)
            parts = None
            if not verified and info.sha256 is None:  # another tool's object: maybe a composite
                parts = self._part_check(key, resp, info, dest, version_id)
            sink = dest if parts is None else cast(BinaryIO, parts)
            size = CHUNK
            if self._limiter is not None:  # the body is read from the socket as fast as it is written
                sink, size = cast(BinaryIO, MeteredWriter(sink, self._limiter)), self._limiter.chunk
            if int(resp.get("ContentLength") or 0) <= size:
                # one exact-size read: a read(CHUNK) allocates (and zeroes) a 1 MiB buffer per call,
                # which cost more than the download for small files
                sink.write(body.read())
            else:
                for chunk in body.iter_chunks(size):
                    sink.write(chunk)
            if parts is not None:
                parts.check(f"{action} {key}")  # before the file can appear (SPEC §4.3)
                verified = True
        except Exception as e:
            raise map_error(e, action, key) from e
        return Fetched(info=info, server_verified=bool(verified))

    def _part_check(self, key: str, resp: dict[str, Any], info: ObjectInfo, dest: BinaryIO,
                    version_id: str | None) -> composite.PartCheck | None:
        """A writer that checks the body against its composite checksum, part by part, or None
        (no composite checksum, or a store that does not say where its parts end)."""
        comp = composite.composite_of(resp)
        if comp is None:
            return None
        try:  # asked while the body waits: its bytes must be hashed at the part boundaries
            sizes = composite.part_sizes(self.client, self.bucket, key, etag=info.etag, size=info.size,
                                         parts=comp.parts, version_id=version_id)
        except BaseException:
            resp["Body"].close()
            raise
        return composite.PartCheck(comp, sizes, dest) if sizes else None

    # --- beyond the Remote interface: S3's own abilities (presigning, versions, bucket settings)
    def presign_get(self, key: str, expires: int) -> str:
        """A URL that GETs `key` without credentials for `expires` seconds, signed locally with
        Signature Version 4 (botocore presigns with the deprecated version 2 unless told)."""
        try:
            signer = self._session.create_client(
                "s3", endpoint_url=self.cfg.endpoint_url or None, region_name=self._bucket_region(),
                config=BotoConfig(signature_version="s3v4",
                                  s3={"addressing_style": "path"} if self.cfg.endpoint_url else {}))
            return signer.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                 ExpiresIn=expires)
        except Exception as e:
            raise map_error(e, "s3:GetObject", key) from e

    def _bucket_region(self) -> str | None:
        """The region a URL must be signed for. Requests follow S3's region redirects; a URL
        cannot, so on AWS without a configured region the bucket is asked (x-amz-bucket-region,
        sent even with an error)."""
        if self.cfg.region or self.cfg.endpoint_url:
            return self.cfg.region or self.client.meta.region_name
        try:
            resp = self.client.head_bucket(Bucket=self.bucket)
        except bexc.ClientError as e:
            resp = e.response
        except bexc.BotoCoreError:
            resp = {}
        headers = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        return headers.get("x-amz-bucket-region") or self.client.meta.region_name

    def versioning(self) -> str:
        """The bucket's versioning status: "Enabled", "Suspended", or "" (never enabled)."""
        return str(self.bucket_setting("versioning").get("Status") or "")

    _SETTINGS = {"versioning": ("get_bucket_versioning", "s3:GetBucketVersioning"),
                 "encryption": ("get_bucket_encryption", "s3:GetEncryptionConfiguration"),
                 "public_access_block": ("get_public_access_block", "s3:GetBucketPublicAccessBlock"),
                 "lifecycle": ("get_bucket_lifecycle_configuration", "s3:GetLifecycleConfiguration")}

    def bucket_setting(self, name: str) -> dict[str, Any]:
        """One bucket-level setting (a key of `_SETTINGS`), as S3 returns it.

        A setting that was never made raises RemoteError with S3's code (e.g.
        NoSuchLifecycleConfiguration); a denied read raises RemoteError(DENIED)."""
        method, action = self._SETTINGS[name]
        try:
            resp = getattr(self.client, method)(Bucket=self.bucket)
        except Exception as e:
            raise map_error(e, action, f"s3://{self.bucket}") from e
        resp.pop("ResponseMetadata", None)
        return resp

    def list_versions(self, prefix: str, *, after: str = "", page_size: int = 1000) -> Iterator[VersionInfo]:
        """Every version and delete marker under `prefix` (of keys after `after`), keys in order,
        each key newest first.

        Page by page (`_in_order`): memory stays flat however many keys there are."""
        try:
            marker = {"KeyMarker": after} if after else {}
            pages = self.client.get_paginator("list_object_versions").paginate(
                Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}, **marker)
            for page in pages:
                for entry in _in_order(page):
                    # KeyMarker alone means "keys after it"; moto also returns the rest of its versions
                    if not after or entry.key > after:
                        yield entry
        except Exception as e:
            raise map_error(e, "s3:ListBucketVersions", prefix) from e

    def copy(self, src: str, dst: str, *, sha256: str, mtime_ns: int,
             expect_sha256: str | None = None) -> str | None:
        extra = self._extra(dst, sha256, mtime_ns)
        if self.cfg.checksum == "sha256":
            extra["ChecksumAlgorithm"] = "SHA256"
        etag = ""
        if expect_sha256:
            # the source is another file's key, which may be overwritten right now: copy only the
            # content we asked for (CopySourceIfMatch; and the copy's ETag, for stores that
            # ignore the condition)
            info = self.head(src)
            if info is None or info.sha256 != expect_sha256:
                raise _source_changed(src)
            etag = info.etag
            if etag:
                extra["CopySourceIfMatch"] = f'"{etag}"'
        try:
            resp = self.client.copy_object(Bucket=self.bucket, Key=dst, CopySource={"Bucket": self.bucket, "Key": src},
                                           MetadataDirective="REPLACE", **extra)
        except Exception as e:
            err = map_error(e, "s3:PutObject", f"{src} -> {dst}")
            if err.code == "PreconditionFailed":
                raise _source_changed(src) from e
            raise err from e
        copied = str(resp.get("CopyObjectResult", {}).get("ETag", "")).strip('"')
        if etag and copied and copied != etag and self.cfg.sse != "aws:kms":  # KMS ETags are not MD5s
            raise _source_changed(src)  # the caller uploads, which overwrites `dst`
        return copied or None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as e:
            err = map_error(e, "s3:DeleteObject", key)
            if err.kind != NOT_FOUND:
                raise err from e

    def close(self) -> None:
        """Nothing to release: connections close with the process, and the threads of a multipart
        upload end with it (a stop aborted what was under way)."""


def no_expect_for_small_bodies(request: Any, **_: Any) -> None:
    """botocore event handler (before-sign): no `Expect: 100-continue` on a small body."""
    if request.headers.get("Expect") and (determine_content_length(request.body) or 0) <= SMALL_FILE:
        del request.headers["Expect"]


def _in_order(page: dict[str, Any]) -> list[VersionInfo]:
    """A page's versions and delete markers as one list: keys in order, each key newest first.

    S3 sends one sequence in that order, but botocore splits it into two lists (versions,
    delete markers), each still in order; they are merged back by LastModified. Stores with
    1-second timestamps (moto) cannot order two entries of one key written within the same
    second: then the latest comes first, then versions before delete markers (a stable sort).
    """
    entries = [_version(v, False) for v in page.get("Versions", ())]
    entries += [_version(d, True) for d in page.get("DeleteMarkers", ())]
    entries.sort(key=lambda v: (v.key, -v.last_modified.timestamp(), not v.is_latest))
    return entries


def _version(v: dict[str, Any], marker: bool) -> VersionInfo:
    return VersionInfo(key=v["Key"], version_id=str(v.get("VersionId") or "null"), last_modified=v["LastModified"],
                       size=int(v.get("Size", 0)), is_latest=bool(v.get("IsLatest")), delete_marker=marker)


def _source_changed(src: str) -> RemoteError:
    return RemoteError(NOT_FOUND, f"{src} changed before it could be copied", code="SourceChanged",
                       action="s3:GetObject")


def _md5_file(path: Path) -> bytes:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.digest()
