"""Multipart objects other tools wrote are restored verified (SPEC §4.3).

`aws s3 cp` / boto3 `upload_file` of a large file leave a multipart object without
`syncd-sha256` whose checksum is COMPOSITE (a checksum of the parts' checksums: CRC32 by default,
CRC32C, SHA1 or SHA256 when asked), which botocore does not check on a whole-object GET
(PITFALLS §10). syncd checks it itself, part by part, while the body streams to the temp file:
a byte changed on the way or in the store is refused (exit 1, no file), an intact object is
restored without the "unverified" warning.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig

from tests.reliability.faultproxy import FaultProxy, Rates
from tests.reliability.util import port_of

MIB = 1024 * 1024
SIZE = 11 * MIB + 123  # three parts of 5 MiB, 5 MiB and 1 MiB + 123 bytes
COMPOSITE = ["CRC32", "CRC32C", "SHA1", "SHA256"]


pytestmark = pytest.mark.usefixtures("moto_computes_crc32c")


def _upload_file(store, key: str, data: bytes, tmp: Path, algorithm: str | None,
                 checksum_type: str | None = None) -> None:
    """As boto3's `upload_file` (and `aws s3 cp`) writes a large file: a multipart upload with
    botocore's default checksum (CRC32 since 1.36) or the one asked for; no syncd metadata."""
    src = tmp / "src.bin"
    src.write_bytes(data)
    extra = {"ChecksumAlgorithm": algorithm} if algorithm else {}
    if checksum_type:
        extra["ChecksumType"] = checksum_type
    store.client.upload_file(str(src), store.bucket, key, ExtraArgs=extra,
                             Config=TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB))
    head = store.client.head_object(Bucket=store.bucket, Key=key, ChecksumMode="ENABLED")
    assert "syncd-sha256" not in head.get("Metadata", {})


def _multipart(store, key: str, parts: list[bytes], algorithm: str) -> None:
    """An explicit multipart upload with parts of different sizes (any tool may choose them)."""
    c = store.client
    up = c.create_multipart_upload(Bucket=store.bucket, Key=key, ChecksumAlgorithm=algorithm)["UploadId"]
    done = []
    for n, body in enumerate(parts, 1):
        r = c.upload_part(Bucket=store.bucket, Key=key, UploadId=up, PartNumber=n, Body=body,
                          ChecksumAlgorithm=algorithm)
        part = {"PartNumber": n, "ETag": r["ETag"]}
        if r.get(f"Checksum{algorithm}"):
            part[f"Checksum{algorithm}"] = r[f"Checksum{algorithm}"]
        done.append(part)
    c.complete_multipart_upload(Bucket=store.bucket, Key=key, UploadId=up, MultipartUpload={"Parts": done})


def _checksum_type(store, key: str) -> str:
    return store.client.get_object_attributes(Bucket=store.bucket, Key=key,
                                              ObjectAttributes=["Checksum"])["Checksum"]["ChecksumType"]


def _resync_restores_verified(env, syncd, name: str, data: bytes) -> None:
    env.root.mkdir(parents=True, exist_ok=True)
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.out + r.err
    assert (env.root / name).read_bytes() == data
    assert "unverified" not in r.out + r.err, r.err
    assert r.out.strip().splitlines()[-1].endswith("restored 1, unchanged 0, failed 0"), r.out


def _resync_refuses(env, syncd, name: str) -> None:
    env.root.mkdir(parents=True, exist_ok=True)
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 1, r.out + r.err
    failed = [ln for ln in r.err.splitlines() if ln.startswith("failed:") and name in ln]
    assert failed and "checksum mismatch" in failed[0], r.err
    assert not (env.root / name).exists()
    assert not [p for p in env.root.iterdir() if p.name.startswith(".syncd-restore-")]


@pytest.mark.parametrize("algorithm", [None, *COMPOSITE], ids=["default", *COMPOSITE])
@pytest.mark.parametrize("store", ["moto"], indirect=True)
def test_a_file_another_tool_uploaded_in_parts_is_restored_verified(store, make_env, syncd, tmp_path, algorithm):
    env = make_env(store)
    data = os.urandom(SIZE)
    _upload_file(store, f"{env.prefix}/big.bin", data, tmp_path, algorithm)
    assert _checksum_type(store, f"{env.prefix}/big.bin") == "COMPOSITE"
    _resync_restores_verified(env, syncd, "big.bin", data)


@pytest.mark.parametrize("algorithm", ["CRC32", "SHA256"])
@pytest.mark.parametrize("store", ["moto_server", "moto_server+botocore"], indirect=True)
def test_a_multipart_object_with_parts_of_different_sizes_is_restored_verified(store, make_env, syncd, algorithm):
    """The part boundaries are the object's own (asked of the store), not a guess from the first."""
    env = make_env(store)
    parts = [os.urandom(6 * MIB), os.urandom(5 * MIB), os.urandom(MIB + 7)]
    _multipart(store, f"{env.prefix}/uneven.bin", parts, algorithm)
    assert _checksum_type(store, f"{env.prefix}/uneven.bin") == "COMPOSITE"
    _resync_restores_verified(env, syncd, "uneven.bin", b"".join(parts))


@pytest.mark.parametrize("store", ["moto"], indirect=True)
def test_a_full_object_crc64nvme_multipart_upload_is_restored_verified(store, make_env, syncd, tmp_path):
    """A FULL_OBJECT CRC is the whole body's: botocore (awscrt) checks it; nothing more is asked."""
    env = make_env(store)
    data = os.urandom(SIZE)
    _upload_file(store, f"{env.prefix}/full.bin", data, tmp_path, "CRC64NVME")
    assert _checksum_type(store, f"{env.prefix}/full.bin") == "FULL_OBJECT"
    _resync_restores_verified(env, syncd, "full.bin", data)


@pytest.mark.parametrize("algorithm", ["CRC32", "CRC32C", "SHA256"])
@pytest.mark.parametrize("store", ["moto_server", "moto_server+botocore"], indirect=True)
def test_a_byte_flipped_in_the_download_of_a_composite_object_is_refused(store, make_env, syncd, tmp_path, algorithm):
    data = os.urandom(SIZE)
    with FaultProxy(port_of(store.endpoint_url), seed=0, rates=Rates(), corrupt=b"/uploads/big.bin ") as proxy:
        env = make_env(store, remote={"endpoint_url": proxy.url})
        _upload_file(store, f"{env.prefix}/big.bin", data, tmp_path, algorithm)
        _resync_refuses(env, syncd, "big.bin")
        assert proxy.corrupted >= 1


@pytest.mark.parametrize("store", ["moto"], indirect=True)
def test_a_byte_changed_in_the_stored_last_part_of_a_composite_object_is_refused(store, make_env, syncd, tmp_path):
    """The store's copy changed after the upload (its checksums kept): the last part is checked too."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    env = make_env(store)
    key = f"{env.prefix}/big.bin"
    _upload_file(store, key, os.urandom(SIZE), tmp_path, "SHA1")
    stored = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets[store.bucket].keys[key]
    body = bytearray(stored.value)
    body[-1] ^= 0x01
    stored.value = bytes(body)
    _resync_refuses(env, syncd, "big.bin")


def _remote(env):
    from syncd.config import load_config
    from syncd.remote.s3 import S3Remote

    return S3Remote(load_config(env.config).remote)


def _count_calls(remote) -> Counter:
    calls: Counter = Counter()
    remote.client.meta.events.register("before-call.s3", lambda model, **_: calls.update([model.name]))
    return calls


@pytest.mark.parametrize("store", ["moto"], indirect=True)
def test_the_part_sizes_come_from_get_object_attributes_when_the_store_lists_them(store, make_env):
    """AWS lists the parts (ObjectParts, 1000 a request); moto 5.2.5 does not: they are added to
    its answer here, with the real sizes, and no HEAD per part is made."""
    env = make_env(store)
    parts = [os.urandom(6 * MIB), os.urandom(5 * MIB), os.urandom(MIB + 7)]
    key = f"{env.prefix}/uneven.bin"
    _multipart(store, key, parts, "CRC32C")
    remote = _remote(env)

    def object_parts(parsed, **_):
        parsed["ObjectParts"] = {"TotalPartsCount": 3, "IsTruncated": False,
                                 "Parts": [{"PartNumber": n, "Size": len(p)} for n, p in enumerate(parts, 1)]}

    remote.client.meta.events.register("after-call.s3.GetObjectAttributes", object_parts)
    calls = _count_calls(remote)
    out = io.BytesIO()
    assert remote.get(key, out).server_verified
    assert out.getvalue() == b"".join(parts)
    assert calls["GetObjectAttributes"] == 1 and calls["HeadObject"] == 0, calls


@pytest.mark.parametrize("store", ["moto"], indirect=True)
def test_a_denied_get_object_attributes_falls_back_to_a_head_per_part(store, make_env, tmp_path):
    from botocore.awsrequest import AWSResponse

    env = make_env(store)
    data = os.urandom(SIZE)
    key = f"{env.prefix}/big.bin"
    _upload_file(store, key, data, tmp_path, "SHA256")
    remote = _remote(env)
    denied = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
    remote.client.meta.events.register_first(
        "before-send.s3.GetObjectAttributes",
        lambda request, **_: AWSResponse(request.url, 403, {}, _Raw(denied)))
    calls = _count_calls(remote)
    out = io.BytesIO()
    assert remote.get(key, out).server_verified
    assert out.getvalue() == data
    assert calls["HeadObject"] == 3, calls


@pytest.mark.parametrize("store", ["moto"], indirect=True)
def test_objects_syncd_uploaded_in_parts_cost_no_extra_request_to_restore(store, make_env, syncd):
    """Their syncd-sha256 is the check: the composite SHA-256 of syncd's own parts is not looked at."""
    env = make_env(store, remote={"multipart_threshold_mb": 5, "multipart_chunk_mb": 5})
    env.root.mkdir(parents=True)
    data = os.urandom(SIZE)
    (env.root / "own.bin").write_bytes(data)
    assert syncd("--config", str(env.config), "resync").code == 0
    assert _checksum_type(store, f"{env.prefix}/own.bin") == "COMPOSITE"
    remote = _remote(env)
    calls = _count_calls(remote)
    out = io.BytesIO()
    assert remote.get(f"{env.prefix}/own.bin", out).info.sha256
    assert out.getvalue() == data
    assert dict(calls) == {"GetObject": 1}


class _Raw:
    """The raw body of a made-up AWSResponse."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, *_, **__):
        yield self.data
