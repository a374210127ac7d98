"""Config validation (SPEC §2): every bad case exits 2 with one line naming the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncd.config import DEFAULT_EXCLUDE, load_config

GOOD_REMOTE = 'url = "file:///tmp/syncd-test-remote"'


def cfg_text(tmp: Path, syncd: str = "", remote: str = GOOD_REMOTE, watches: str | None = None) -> str:
    if watches is None:
        watches = f'[[watch]]\npath = "{tmp / "up"}"\n'
    return f"[syncd]\nledger = \"{tmp / 'l.db'}\"\n{syncd}\n[remote]\n{remote}\n\n{watches}"


BAD = {
    "unknown key": (dict(syncd="colour = 'blue'"), "syncd.colour: unknown key"),
    "unknown section": (dict(syncd="[extra]\nx = 1"), "extra: unknown key"),
    "wrong type": (dict(syncd="workers = 'eight'"), "syncd.workers: must be an integer"),
    "bool for int": (dict(syncd="workers = true"), "syncd.workers: must be an integer"),
    "bad choice": (dict(syncd="log_level = 'loud'"), "syncd.log_level: must be one of"),
    "bad remote url": (dict(remote='url = "ftp://x"'), "remote.url: must start with s3://"),
    "missing remote url": (dict(remote='region = "x"'), "remote.url: is required"),
    "bad on_delete": (dict(watches='[[watch]]\npath = "/tmp/x-syncd"\non_delete = "nuke"'),
                      "watch[0].on_delete"),
    "no watch": (dict(watches=""), "watch: at least one"),
    "secret key": (dict(remote=GOOD_REMOTE + '\naws_secret_access_key = "hunter2secret"'),
                   "remote.aws_secret_access_key: secrets must not be written"),
    "secret in watch": (dict(watches='[[watch]]\npath = "/tmp/x-syncd"\nsecret_key = "hunter2secret"'),
                        "watch[0].secret_key: secrets"),
    "password in url": (dict(remote='url = "s3://b/p"\nendpoint_url = "http://user:hunter2secret@h:9000"'),
                        "remote.endpoint_url: a password inside a URL"),
    "bad health_listen": (dict(syncd="health_listen = 'nope'"), "syncd.health_listen"),
    "ipv6 listen without brackets": (dict(syncd="health_listen = '::1:9750'"),
                                     "syncd.health_listen: an IPv6 address goes in brackets ([::1]:9750)"),
    "bad ipv6 listen": (dict(syncd="health_listen = '[::g]:9750'"), "syncd.health_listen: '[::g]' is not an IPv6"),
    "http_hosts not a list": (dict(syncd="http_hosts = 'syncd.lan'"), "syncd.http_hosts: must be a list"),
    "http_hosts with a port": (dict(syncd="http_hosts = ['ok.lan', 'syncd.lan:9750']"),
                               "syncd.http_hosts[1]: must be a host name"),
    "http_hosts wildcard": (dict(syncd="http_hosts = ['*']"), "syncd.http_hosts[0]: must be a host name"),
    "http_hosts not a string": (dict(syncd="http_hosts = [7]"), "syncd.http_hosts[0]: must be a host name"),
    "small chunk": (dict(remote=GOOD_REMOTE + "\nmultipart_chunk_mb = 1"), "remote.multipart_chunk_mb"),
    "bad transfers": (dict(remote=GOOD_REMOTE + "\ntransfers = 'fast'"),
                      "remote.transfers: must be one of 'botocore', 'crt', 'auto'"),
    "crt under a bwlimit": (dict(syncd="bwlimit = '8M'", remote=GOOD_REMOTE + "\ntransfers = 'crt'"),
                            "remote.transfers: \"crt\" cannot hold transfers to syncd.bwlimit"),
    "crt without a checksum": (dict(remote=GOOD_REMOTE + "\ntransfers = 'crt'\nchecksum = 'none'"),
                               "remote.transfers: \"crt\" sends a checksum the server verifies"),
    "bad prefix": (dict(watches='[[watch]]\npath = "/tmp/x-syncd"\nprefix = "a/../b"'), "watch[0].prefix"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_exits_2_naming_key_and_file(case, tmp_path, syncd):
    kwargs, expected = BAD[case]
    f = tmp_path / "syncd.toml"
    f.write_text(cfg_text(tmp_path, **kwargs))
    r = syncd("--config", str(f), "status")
    assert r.code == 2, (r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert expected in lines[0]
    assert str(f) in lines[0]
    assert "hunter2secret" not in r.err
    assert "Traceback" not in r.err


def test_overlapping_watches_and_prefixes(tmp_path, syncd):
    f = tmp_path / "syncd.toml"
    a, b = tmp_path / "a", tmp_path / "a" / "b"
    f.write_text(cfg_text(tmp_path, watches=f'[[watch]]\npath = "{a}"\n[[watch]]\npath = "{b}"\n'))
    r = syncd("--config", str(f), "status")
    assert r.code == 2 and "watch[1].path" in r.err and "overlaps" in r.err
    f.write_text(cfg_text(tmp_path, watches=f'[[watch]]\npath = "{tmp_path / "x"}"\nprefix = "media"\n'
                                            f'[[watch]]\npath = "{tmp_path / "y"}"\nprefix = "media/thumbs"\n'))
    r = syncd("--config", str(f), "status")
    assert r.code == 2 and "watch[1].prefix" in r.err and "overlaps" in r.err
    # a shared start that is not a path segment is fine
    f.write_text(cfg_text(tmp_path, watches=f'[[watch]]\npath = "{tmp_path / "x"}"\nprefix = "media"\n'
                                            f'[[watch]]\npath = "{tmp_path / "y"}"\nprefix = "media2"\n'))
    assert syncd("--config", str(f), "status").code == 0


def test_watch_path_that_is_a_file_is_an_error(tmp_path, syncd):
    (tmp_path / "afile").write_text("x")
    f = tmp_path / "syncd.toml"
    f.write_text(cfg_text(tmp_path, watches=f'[[watch]]\npath = "{tmp_path / "afile"}"\n'))
    r = syncd("--config", str(f), "status")
    assert r.code == 2 and "is not a directory" in r.err and "watch[0].path" in r.err


def test_not_toml_and_missing_file(tmp_path, syncd):
    f = tmp_path / "syncd.toml"
    f.write_text("[syncd\n")
    r = syncd("--config", str(f), "status")
    assert r.code == 2 and "not valid TOML" in r.err and str(f) in r.err
    r = syncd("--config", str(tmp_path / "nope.toml"), "status")
    assert r.code == 2 and "not found" in r.err


def test_defaults_and_relative_paths(tmp_path):
    f = tmp_path / "syncd.toml"
    f.write_text('[remote]\nurl = "file://./remote"\n[[watch]]\npath = "media/up"\n')
    cfg = load_config(f)
    assert cfg.ledger == tmp_path / "syncd-ledger.db"
    assert cfg.remote.root == tmp_path / "remote"
    w = cfg.watches[0]
    assert w.path == tmp_path / "media/up" and w.prefix == "up"
    assert w.exclude == DEFAULT_EXCLUDE and w.on_delete == "keep" and w.restore
    assert cfg.settle_seconds == 2.0 and cfg.workers == 8 and cfg.health_listen == "127.0.0.1:9750"


def test_config_lookup_order(tmp_path, monkeypatch, syncd):
    f = tmp_path / "env.toml"
    f.write_text('[remote]\nurl = "file:///tmp/r-syncd"\n[[watch]]\npath = "w"\nprefix = "from-env"\n')
    monkeypatch.setenv("SYNCD_CONFIG", str(f))
    monkeypatch.chdir(tmp_path)
    assert load_config(None).watches[0].prefix == "from-env"
    monkeypatch.delenv("SYNCD_CONFIG")
    (tmp_path / "syncd.toml").write_text('[remote]\nurl = "file:///tmp/r-syncd"\n[[watch]]\npath = "w"\n'
                                        'prefix = "from-cwd"\n')
    assert load_config(None).watches[0].prefix == "from-cwd"


def test_s3_url_parsing(tmp_path):
    f = tmp_path / "syncd.toml"
    f.write_text('[remote]\nurl = "s3://bucket/some/prefix/"\n[[watch]]\npath = "w"\n')
    r = load_config(f).remote
    assert (r.scheme, r.bucket, r.prefix) == ("s3", "bucket", "some/prefix")
