"""`check`'s bucket hygiene lines (SPEC §3): ok / advice / unknown, never a change of exit code."""

from __future__ import annotations

import json

import boto3
import pytest

from syncd.hygiene import PUBLIC_ACCESS_SETTINGS, hygiene
from syncd.remote.base import DENIED, RemoteError
from tests.conftest import Store, _new_bucket, write_config
from tests.ops.test_check_iam import iam_user  # noqa: F401 - fixture

NAMES = ["versioning", "default encryption", *PUBLIC_ACCESS_SETTINGS, "abort incomplete uploads"]


def hygiene_lines(out: str) -> dict[str, str]:
    lines = out.splitlines()
    start = lines.index("hygiene (advice only; the exit code does not depend on it):") + 1
    got = {}
    for line in lines[start:start + len(NAMES)]:
        name, outcome = line[:24].rstrip(), line[25:]
        got[name] = outcome
    return got


@pytest.fixture
def moto_store():
    from moto import mock_aws

    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        bucket = _new_bucket(client)
        yield Store(kind="moto", url=f"s3://{bucket}/backups", bucket=bucket, client=client)


def test_check_prints_one_hygiene_line_per_setting_and_versioning_turns_ok(moto_store, make_env, syncd):
    env = make_env(moto_store)
    r = syncd("--config", str(env.config), "check")
    assert r.code == 0, r.out + r.err
    lines = hygiene_lines(r.out)
    assert list(lines) == NAMES
    assert all(v.startswith("advice: ") for v in lines.values()), lines
    assert r.out.rstrip().endswith("all checks passed")

    c, b = moto_store.client, moto_store.bucket
    c.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    r = syncd("--config", str(env.config), "check")
    assert r.code == 0
    lines = hygiene_lines(r.out)
    assert lines["versioning"] == "ok"
    assert all(v.startswith("advice: ") for k, v in lines.items() if k != "versioning")

    c.put_bucket_encryption(Bucket=b, ServerSideEncryptionConfiguration={
        "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
    c.put_public_access_block(Bucket=b, PublicAccessBlockConfiguration={
        "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True, "RestrictPublicBuckets": False})
    c.put_bucket_lifecycle_configuration(Bucket=b, LifecycleConfiguration={"Rules": [
        {"ID": "abort", "Status": "Enabled", "Filter": {"Prefix": ""},
         "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7}}]})
    r = syncd("--config", str(env.config), "check")
    assert r.code == 0
    lines = hygiene_lines(r.out)
    assert lines["RestrictPublicBuckets"] == "advice: off; turn it on"
    assert all(v == "ok" for k, v in lines.items() if k != "RestrictPublicBuckets"), lines


def test_lifecycle_rule_for_another_prefix_is_still_advice(moto_store, make_env, syncd):
    env = make_env(moto_store)
    moto_store.client.put_bucket_lifecycle_configuration(Bucket=moto_store.bucket, LifecycleConfiguration={"Rules": [
        {"ID": "logs", "Status": "Enabled", "Filter": {"Prefix": "logs/"},
         "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}}]})
    lines = hygiene_lines(syncd("--config", str(env.config), "check").out)
    assert lines["abort incomplete uploads"].startswith("advice: ")


def test_hygiene_advice_does_not_hide_a_probe_failure_exit_3(moto_store, make_env, syncd, monkeypatch):
    from syncd.remote.s3 import S3Remote

    def denied_put(self, key, *a, **kw):
        raise RemoteError(DENIED, "s3:PutObject denied", code="AccessDenied", action="s3:PutObject")

    monkeypatch.setattr(S3Remote, "put", denied_put)
    env = make_env(moto_store)
    r = syncd("--config", str(env.config), "check")
    assert r.code == 3
    assert list(hygiene_lines(r.out)) == NAMES
    json.loads(r.out[r.out.index("{"):])  # the policy stays the last thing printed


def test_denied_reads_are_unknown_access_denied_not_failures(tmp_path, syncd, moto_server, iam_user):  # noqa: F811
    # the user holds exactly syncd's least-privilege policy: every probe passes, the hygiene
    # reads it does not grant are denied (moto checks GetBucketVersioning and
    # GetLifecycleConfiguration; it maps the encryption and public-access reads to ListBucket)
    root = tmp_path / "up"
    cfg = write_config(tmp_path / "s.toml",
                       remote={"url": f"s3://{iam_user['bucket']}/backups", "endpoint_url": moto_server},
                       watches=[{"path": str(root), "prefix": "uploads"}],
                       syncd={"ledger": str(tmp_path / "l.db"), "settle_seconds": 0, "health_listen": ""})
    iam_user["grant"](json.loads(syncd("--config", str(cfg), "iam-policy").out))
    r = syncd("--config", str(cfg), "check")
    assert r.code == 0, r.out + r.err
    lines = hygiene_lines(r.out)
    assert lines["versioning"] == "unknown (AccessDenied)"
    assert lines["abort incomplete uploads"] == "unknown (AccessDenied)"


class FakeBucket:
    """A remote whose bucket-setting reads all fail with one error."""

    def __init__(self, err: RemoteError) -> None:
        self.err = err

    def bucket_setting(self, name: str):
        raise self.err


def test_every_denied_setting_reads_unknown_with_the_code(tmp_path):
    from syncd.config import load_config

    cfg = load_config(write_config(tmp_path / "s.toml", remote={"url": "s3://bkt/p"},
                                   watches=[{"path": str(tmp_path / "u")}]))
    lines = hygiene(cfg, FakeBucket(RemoteError(DENIED, "denied", code="AccessDenied")))
    assert [line.name for line in lines] == NAMES
    assert {line.outcome for line in lines} == {"unknown (AccessDenied)"}
    lines = hygiene(cfg, FakeBucket(RemoteError("invalid", "not implemented", code="NotImplemented")))
    assert {line.outcome for line in lines} == {"unknown (NotImplemented)"}


def test_file_remote_skips_hygiene_in_one_line(tmp_path, make_env, syncd):
    env = make_env(Store(kind="file", url=f"file://{tmp_path / 'remote'}", root=tmp_path / "remote"))
    r = syncd("--config", str(env.config), "check")
    assert r.code == 0, r.out + r.err
    assert [ln for ln in r.out.splitlines() if ln.startswith("hygiene")] == \
        [f"hygiene skipped: file://{tmp_path / 'remote'} is a directory, not a bucket"]
