"""`syncd check` and `syncd iam-policy` (SPEC §3), against moto with IAM enforced."""

from __future__ import annotations

import json

import boto3
import pytest

from tests.conftest import write_config

READ_ONLY = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": "*"},
        {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": "*"},
    ],
}


@pytest.fixture
def iam_user(moto_server, monkeypatch):
    """An IAM user with a read-only policy; its keys in the environment; moto enforcing IAM."""
    iam = boto3.client("iam", endpoint_url=moto_server, region_name="us-east-1")
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    name = f"syncd-user-{id(monkeypatch)}"
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="base", PolicyDocument=json.dumps(READ_ONLY))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    bucket = f"iam-bkt-{id(monkeypatch) % 100000}"
    s3.create_bucket(Bucket=bucket)
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)

    def grant(policy: dict) -> None:
        monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
        iam.put_user_policy(UserName=name, PolicyName="base", PolicyDocument=json.dumps(policy))
        monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)

    return {"bucket": bucket, "grant": grant}


def test_check_reports_denied_put_and_the_printed_policy_fixes_it(tmp_path, syncd, moto_server, iam_user):
    root = tmp_path / "up"
    root.mkdir()
    (root / "a.txt").write_text("a")
    cfg = write_config(tmp_path / "s.toml",
                       remote={"url": f"s3://{iam_user['bucket']}/backups", "endpoint_url": moto_server},
                       watches=[{"path": str(root), "prefix": "uploads"}],
                       syncd={"ledger": str(tmp_path / "l.db"), "settle_seconds": 0, "health_listen": ""})
    r = syncd("--config", str(cfg), "check")
    assert r.code == 3, r.out + r.err
    lines = r.out.splitlines()
    assert "list    ok" in lines
    assert "put     denied (AccessDenied)" in lines
    assert "head    skipped" in lines and "get     skipped" in lines
    assert "missing permission: s3:PutObject" in r.out
    printed = json.loads(r.out[r.out.index("{"):])
    iam_user["grant"](printed)
    r = syncd("--config", str(cfg), "check")
    assert r.code == 0, r.out + r.err
    assert "all checks passed" in r.out
    r = syncd("--config", str(cfg), "resync")
    assert r.code == 0, r.err
    assert "uploaded 1" in r.out


def test_denied_put_during_resync_is_a_file_failure_exit_1(tmp_path, syncd, moto_server, iam_user):
    root = tmp_path / "up"
    root.mkdir()
    for i in range(5):
        (root / f"f{i}.txt").write_text(str(i))
    cfg = write_config(tmp_path / "s.toml",
                       remote={"url": f"s3://{iam_user['bucket']}/backups", "endpoint_url": moto_server},
                       watches=[{"path": str(root), "prefix": "uploads"}],
                       syncd={"ledger": str(tmp_path / "l.db"), "settle_seconds": 0, "health_listen": ""})
    r = syncd("--config", str(cfg), "resync")
    assert r.code == 1
    assert "AccessDenied: s3:PutObject" in r.err
    # logged once per distinct cause, not once per file
    assert r.err.count("further files with this cause are counted") <= 1
    st = json.loads(syncd("--config", str(cfg), "status", "--json").out)["watches"][0]
    assert st["counts"]["failed"] == 5 and st["failures_total"] == 5
    assert st["failures"][0]["error"] == "AccessDenied: s3:PutObject"


def cfg_for(tmp_path, url: str, watches: list[dict], **remote) -> str:
    return str(write_config(tmp_path / "p.toml", remote={"url": url, **remote}, watches=watches))


def statements(out: str) -> dict[str, dict]:
    return {s["Sid"]: s for s in json.loads(out)["Statement"]}


def test_iam_policy_one_prefix_keep(tmp_path, syncd):
    r = syncd("--config", cfg_for(tmp_path, "s3://bkt/backups", [{"path": str(tmp_path / "u"),
                                                                 "prefix": "uploads"}]), "iam-policy")
    assert r.code == 0
    st = statements(r.out)
    assert st["SyncdList"]["Resource"] == "arn:aws:s3:::bkt"
    assert st["SyncdList"]["Condition"]["StringLike"]["s3:prefix"] == ["backups/uploads/*",
                                                                       "backups/.syncd-check/*"]
    assert "s3:DeleteObject" not in st["SyncdObjects"]["Action"]
    assert {"s3:PutObject", "s3:GetObject", "s3:GetObjectAttributes", "s3:AbortMultipartUpload",
            "s3:ListMultipartUploadParts"} <= set(st["SyncdObjects"]["Action"])
    assert st["SyncdObjects"]["Resource"] == ["arn:aws:s3:::bkt/backups/uploads/*",
                                              "arn:aws:s3:::bkt/backups/.syncd-check/*"]
    assert "SyncdKms" not in st


def test_iam_policy_several_watches_mirror(tmp_path, syncd):
    ws = [{"path": str(tmp_path / "a"), "prefix": "media", "on_delete": "mirror"},
          {"path": str(tmp_path / "b"), "prefix": "docs"}]
    st = statements(syncd("--config", cfg_for(tmp_path, "s3://bkt/p", ws), "iam-policy").out)
    assert "s3:DeleteObject" in st["SyncdObjects"]["Action"]
    assert st["SyncdObjects"]["Resource"] == ["arn:aws:s3:::bkt/p/media/*", "arn:aws:s3:::bkt/p/docs/*",
                                              "arn:aws:s3:::bkt/p/.syncd-check/*"]


def test_iam_policy_no_remote_prefix_and_trash(tmp_path, syncd):
    ws = [{"path": str(tmp_path / "a"), "prefix": "media", "on_delete": "trash"}]
    st = statements(syncd("--config", cfg_for(tmp_path, "s3://bkt", ws), "iam-policy").out)
    assert st["SyncdList"]["Condition"]["StringLike"]["s3:prefix"] == ["media/*", ".syncd-check/*"]
    assert "s3:DeleteObject" in st["SyncdObjects"]["Action"]


def test_iam_policy_kms(tmp_path, syncd):
    arn = "arn:aws:kms:eu-west-1:123456789012:key/abcd"
    ws = [{"path": str(tmp_path / "a"), "prefix": "media"}]
    st = statements(syncd("--config", cfg_for(tmp_path, "s3://bkt/p", ws, sse="aws:kms", sse_kms_key_id=arn),
                          "iam-policy").out)
    assert st["SyncdKms"]["Action"] == ["kms:GenerateDataKey", "kms:Decrypt"]
    assert st["SyncdKms"]["Resource"] == arn


def test_check_on_a_file_remote(tmp_path, syncd):
    cfg = cfg_for(tmp_path, f"file://{tmp_path / 'remote'}", [{"path": str(tmp_path / "a"), "prefix": "m"}])
    r = syncd("--config", cfg, "check")
    assert r.code == 0, r.out + r.err
    assert "delete  not needed" in r.out


def test_every_command_has_help(syncd):
    from syncd.cli import cli

    for name in cli.commands:
        r = syncd(name, "--help")
        assert r.code == 0 and "Usage:" in r.out, name
