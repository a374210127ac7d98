"""`syncd url PATH [--expires]`: a presigned GET of a synced file (SPEC §3), against moto's server."""

from __future__ import annotations

import os
import urllib.parse
import urllib.request

import boto3
import pytest

from tests.conftest import Store, _new_bucket


@pytest.fixture
def server_store(moto_server, monkeypatch) -> Store:
    # a presigned URL carries the access key id (never the secret): these tests sign with an id
    # of their own, so the session's check that its fake key id is in no output still holds
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASYNCDURLTESTS001")
    client = boto3.client("s3", region_name="us-east-1", endpoint_url=moto_server)
    bucket = _new_bucket(client)
    return Store(kind="moto_server", url=f"s3://{bucket}/backups", endpoint_url=moto_server, bucket=bucket,
                 client=client)


def test_url_of_a_synced_file_is_a_working_presigned_get(server_store, make_env, syncd, monkeypatch):
    env = make_env(server_store)
    data = os.urandom(5000)
    (env.root / "sub").mkdir(parents=True)
    (env.root / "sub" / "photo é 1.jpg").write_bytes(data)
    assert syncd("--config", str(env.config), "resync").code == 0
    monkeypatch.chdir(env.root / "sub")  # a path relative to the current directory
    r = syncd("--config", str(env.config), "url", "photo é 1.jpg")
    assert r.code == 0, r.err
    url = r.out.strip()
    assert len(r.out.splitlines()) == 1
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["3600"]
    with urllib.request.urlopen(url, timeout=10) as resp:  # no credentials: only the signature
        assert resp.read() == data
    r = syncd("--config", str(env.config), "url", "--expires", "604800", str(env.root / "sub" / "photo é 1.jpg"))
    assert r.code == 0, r.err
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(r.out.strip()).query)["X-Amz-Expires"] == ["604800"]


def test_url_exit_1_for_a_file_not_synced_and_2_for_usage(server_store, make_env, syncd):
    env = make_env(server_store)
    env.root.mkdir(parents=True)
    (env.root / "a.txt").write_text("a")
    assert syncd("--config", str(env.config), "resync").code == 0
    (env.root / "new.txt").write_text("not yet")
    r = syncd("--config", str(env.config), "url", str(env.root / "new.txt"))
    assert r.code == 1
    assert "not synced" in r.err and "new.txt" in r.err
    r = syncd("--config", str(env.config), "url", "--expires", "604801", str(env.root / "a.txt"))
    assert r.code == 2
    r = syncd("--config", str(env.config), "url", str(env.tmp / "elsewhere.txt"))
    assert r.code == 2 and "not inside any watched directory" in r.err


def test_url_exit_1_before_any_ledger_exists(server_store, make_env, syncd):
    env = make_env(server_store)
    env.root.mkdir(parents=True)
    (env.root / "a.txt").write_text("a")
    r = syncd("--config", str(env.config), "url", str(env.root / "a.txt"))
    assert r.code == 1 and "not synced" in r.err
    assert not env.ledger.exists()  # asking does not create a ledger


def test_url_exit_2_for_a_file_remote(tmp_path, make_env, syncd):
    env = make_env(Store(kind="file", url=f"file://{tmp_path / 'remote'}", root=tmp_path / "remote"))
    env.root.mkdir(parents=True)
    (env.root / "a.txt").write_text("a")
    assert syncd("--config", str(env.config), "resync").code == 0
    r = syncd("--config", str(env.config), "url", str(env.root / "a.txt"))
    assert r.code == 2
    assert "needs an S3 remote" in r.err
