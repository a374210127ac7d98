"""Exit 3 when the remote cannot be used at all, with one clear line (SPEC §3)."""

from __future__ import annotations

import boto3
import pytest

from tests.conftest import free_port, write_config


def test_nothing_listening_at_the_endpoint_exits_3(tmp_path, syncd):
    cfg = write_config(tmp_path / "s.toml", remote={"url": "s3://bkt/p", "endpoint_url": f"http://127.0.0.1:{free_port()}"},
                       watches=[{"path": str(tmp_path / "w")}], syncd={"ledger": str(tmp_path / "l.db")})
    r = syncd("--config", str(cfg), "resync")
    assert r.code == 3
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "cannot reach" in lines[0] and "endpoint_url" in lines[0]


def test_missing_bucket_exits_3(tmp_path, syncd, moto_server):
    cfg = write_config(tmp_path / "s.toml", remote={"url": "s3://no-such-bucket-syncd/p", "endpoint_url": moto_server},
                       watches=[{"path": str(tmp_path / "w")}], syncd={"ledger": str(tmp_path / "l.db")})
    r = syncd("--config", str(cfg), "resync")
    assert r.code == 3 and "bucket does not exist" in r.err and len(r.err.strip().splitlines()) == 1


@pytest.fixture
def enforced_auth(monkeypatch):
    """moto checks credentials (and IAM policies) for every request from now on."""
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)


def test_rejected_credentials_exit_3(tmp_path, syncd, moto_server, monkeypatch):
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    client.create_bucket(Bucket="creds-test-bkt")
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret-value")
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    cfg = write_config(tmp_path / "s.toml", remote={"url": "s3://creds-test-bkt/p", "endpoint_url": moto_server},
                       watches=[{"path": str(tmp_path / "w")}], syncd={"ledger": str(tmp_path / "l.db")})
    r = syncd("--config", str(cfg), "resync")
    assert r.code == 3, r.err
    assert "credentials rejected" in r.err and len(r.err.strip().splitlines()) == 1
    assert "not-a-real-secret-value" not in r.err


def test_second_process_on_the_same_ledger_is_refused(tmp_path, syncd):
    from syncd.lock import LedgerLock

    cfg = write_config(tmp_path / "s.toml", remote={"url": f"file://{tmp_path / 'r'}"},
                       watches=[{"path": str(tmp_path / "w")}], syncd={"ledger": str(tmp_path / "l.db")})
    lock = LedgerLock(tmp_path / "l.db")
    lock.acquire("run")
    try:
        r = syncd("--config", str(cfg), "resync")
        assert r.code == 2 and "another syncd" in r.err
    finally:
        lock.release()


def test_service_is_windows_only(tmp_path, syncd):
    cfg = write_config(tmp_path / "s.toml", remote={"url": f"file://{tmp_path / 'r'}"},
                       watches=[{"path": str(tmp_path / "w")}])
    r = syncd("--config", str(cfg), "service", "install")
    assert r.code == 2 and "Windows-only" in r.err and len(r.err.strip().splitlines()) == 1


def test_unknown_aws_profile_is_a_config_error_naming_the_key(tmp_path, syncd, monkeypatch):
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    cfg = write_config(tmp_path / "s.toml", remote={"url": "s3://bkt/p", "profile": "nope",
                                                    "endpoint_url": f"http://127.0.0.1:{free_port()}"},
                       watches=[{"path": str(tmp_path / "w")}], syncd={"ledger": str(tmp_path / "l.db")})
    for command in ("resync", "check"):
        r = syncd("--config", str(cfg), command)
        assert r.code == 2, (command, r.err)
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and "remote.profile" in lines[0] and "'nope'" in lines[0]


def test_the_command_exits_with_its_code_and_all_its_output(tmp_path):
    """`python -m syncd` (and the `syncd` script) skip the interpreter's teardown: the exit code
    and every line written must still come through."""
    import json
    import subprocess
    import sys

    good = write_config(tmp_path / "s.toml", remote={"url": f"file://{tmp_path / 'remote'}"},
                        watches=[{"path": str(tmp_path / "w")}], syncd={"ledger": str(tmp_path / "l.db")})
    (tmp_path / "w").mkdir()
    for i in range(50):
        (tmp_path / "w" / f"f{i}.txt").write_text(str(i))
    r = subprocess.run([sys.executable, "-m", "syncd", "--config", str(good), "resync"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("uploaded 50, restored 0, unchanged 0, failed 0")
    r = subprocess.run([sys.executable, "-m", "syncd", "--config", str(good), "status", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["watches"][0]["counts"]["synced"] == 50
    r = subprocess.run([sys.executable, "-m", "syncd", "--config", str(tmp_path / "missing.toml"), "status"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("syncd: error:") and len(r.stderr.strip().splitlines()) == 1


def test_retry_of_a_path_the_ledger_does_not_know_is_a_usage_error_naming_it(tmp_path, syncd):
    """Issue 25: "re-queued 0" and exit 0 for a typo let an operator believe the file was retried."""
    watch = tmp_path / "w"
    (watch / "d").mkdir(parents=True)
    (watch / "d" / "a.txt").write_text("a")
    cfg = write_config(tmp_path / "s.toml", remote={"url": f"file://{tmp_path / 'r'}"},
                       watches=[{"path": str(watch)}], syncd={"ledger": str(tmp_path / "l.db"), "health_listen": ""})
    assert syncd("--config", str(cfg), "resync").code == 0
    r = syncd("--config", str(cfg), "retry", str(watch / "d" / "typo.txt"))
    assert r.code == 2, r.out + r.err
    assert str(watch / "d" / "typo.txt") in r.err and "re-queued" not in r.out
    assert len(r.err.strip().splitlines()) == 1
    for known in (watch / "d" / "a.txt", watch / "d", watch):  # known, nothing failed: nothing to do
        r = syncd("--config", str(cfg), "retry", str(known))
        assert r.code == 0 and "re-queued 0" in r.out, r.out + r.err
