"""A `file://` remote under a service manager (issue 14, finding 19): the messages point at the
directory, root's runs leave nothing the service's user cannot write, killed uploads leave no
temps behind forever."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from syncd.remote.local import META_DIR, LocalRemote
from tests.conftest import write_config

NOBODY = 65534


def config(tmp_path: Path, remote: Path) -> Path:
    return write_config(tmp_path / "syncd.toml", remote={"url": f"file://{remote}"},
                        watches=[{"path": str(tmp_path / "uploads"), "prefix": "uploads"}],
                        syncd={"ledger": str(tmp_path / "state" / "ledger.db"), "health_listen": ""})


def test_an_unusable_remote_directory_says_what_to_do_about_a_directory(tmp_path: Path, syncd) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    r = syncd("--config", str(config(tmp_path, blocker / "remote")), "resync")
    assert r.code == 3, r.err
    assert "ReadWritePaths=" in r.err and "endpoint_url" not in r.err, r.err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root (chown)")
def test_check_run_as_root_leaves_nothing_the_remote_owner_cannot_write(tmp_path: Path, syncd) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    os.chown(remote, NOBODY, NOBODY)  # the service's user owns the remote directory
    r = syncd("--config", str(config(tmp_path, remote)), "check")
    assert r.code == 0, r.out + r.err
    made = [p for p in remote.rglob("*")]
    assert any(p.name == META_DIR for p in made) and any(p.name == ".syncd-check" for p in made)
    assert [str(p) for p in made if p.lstat().st_uid != NOBODY] == []


def test_temps_of_a_killed_upload_are_removed_at_the_next_start(tmp_path: Path) -> None:
    remote = LocalRemote(tmp_path / "remote")
    tmp = tmp_path / "remote" / META_DIR / ".tmp"
    tmp.mkdir(parents=True)
    old, live = tmp / "put-killed", tmp / "put-live"
    old.write_bytes(b"partial")
    live.write_bytes(b"being written")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    remote.probe("uploads/")
    assert not old.exists()
    assert live.exists()  # a concurrent upload's temp is left alone
