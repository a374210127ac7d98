"""Objects that cannot become files (SPEC §4.14): S3 lets `PREFIX/c` and `PREFIX/c/d.txt` both
exist, a file system does not; and a local directory (or file) may hold the name a restore needs.
Each such restore is a failure that names the path (exit 1, `status`), kept queued so that it is
restored once the obstacle is gone; of a file and a directory that both come from the remote,
the one restored first stays. Never a silent success, never a
temp file left behind."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from pathlib import Path

import pytest

from syncd.config import load_config
from syncd.daemon import Daemon
from syncd.keys import RESTORE_TEMP_PREFIX
from syncd.ledger import Ledger
from tests.conftest import wait_for

moto = pytest.mark.parametrize("store", ["moto"], indirect=True)
file_and_moto = pytest.mark.parametrize("store", ["file", "moto"], indirect=True)


def row(env, rel: str) -> dict | None:
    ledger = Ledger(env.ledger)
    try:
        found = ledger.query("SELECT state, op, last_error FROM files WHERE watch='uploads' AND path=?", [rel])
        return dict(found[0]) if found else None
    finally:
        ledger.close()


def temps(root: Path) -> list[Path]:
    return [p for p in root.rglob(RESTORE_TEMP_PREFIX + "*")]


def failed_lines(r) -> list[str]:
    return [ln for ln in r.err.splitlines() if ln.startswith("failed: ")]


def failed_as_a_directory(r, env, rel: str) -> None:
    """The resync failed `rel` alone, by name, because a directory holds its name; its row says so."""
    assert r.code == 1, r.out + r.err
    assert r.out.strip().endswith("failed 1")
    lines = failed_lines(r)
    assert len(lines) == 1 and lines[0].startswith(f"failed: uploads/{rel}: ")
    assert f"{env.root / rel} is a directory" in lines[0]
    assert row(env, rel)["state"] == "failed" and row(env, rel)["op"] == "get"


@moto
def test_a_remote_file_whose_name_a_restored_directory_holds_is_a_failure_that_names_it(store, make_env, syncd):
    env = make_env(store)
    env.root.mkdir(parents=True)
    store.put_raw(f"{env.prefix}/c/d.txt", b"d")
    assert syncd("--config", str(env.config), "resync").code == 0
    store.put_raw(f"{env.prefix}/c", b"c")  # restored after the directory c/ exists
    for _ in range(2):  # every resync says it again: not a success the second time either
        failed_as_a_directory(syncd("--config", str(env.config), "resync"), env, "c")
    assert (env.root / "c/d.txt").read_bytes() == b"d"
    assert not temps(env.root)


@moto
def test_a_remote_key_under_a_restored_file_is_a_failure_that_names_its_parent(store, make_env, syncd):
    env = make_env(store)
    env.root.mkdir(parents=True)
    store.put_raw(f"{env.prefix}/c", b"c")
    assert syncd("--config", str(env.config), "resync").code == 0
    store.put_raw(f"{env.prefix}/c/d.txt", b"d")  # restored after the file c exists
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 1, r.out + r.err
    assert r.out.strip().endswith("failed 1")
    lines = failed_lines(r)
    assert len(lines) == 1 and lines[0].startswith("failed: uploads/c/d.txt: ")
    assert f"a parent of {env.root / 'c/d.txt'} is a file ({env.root / 'c'})" in lines[0]
    assert row(env, "c/d.txt")["state"] == "failed" and row(env, "c/d.txt")["op"] == "get"
    assert (env.root / "c").read_bytes() == b"c"
    assert not temps(env.root)
    r = syncd("--config", str(env.config), "resync")  # still failed: not a success the second time
    assert r.code == 1 and r.out.strip().endswith("failed 1") and len(failed_lines(r)) == 1


@moto
def test_a_file_and_a_directory_of_one_name_in_one_listing_restore_one_and_fail_the_other(store, make_env,
                                                                                            syncd):
    env = make_env(store)
    env.root.mkdir(parents=True)
    store.put_raw(f"{env.prefix}/c", b"c")
    store.put_raw(f"{env.prefix}/c/d.txt", b"d")
    store.put_raw(f"{env.prefix}/e.txt", b"e")
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 1, r.out + r.err
    assert r.out.strip().splitlines()[-1] == "uploaded 0, restored 2, unchanged 0, failed 1"
    lines = failed_lines(r)
    assert len(lines) == 1
    if (env.root / "c").is_file():  # the file came first: its key under it fails
        assert (env.root / "c").read_bytes() == b"c"
        assert lines[0].startswith("failed: uploads/c/d.txt: ") and "is a file" in lines[0]
    else:  # the directory came first: the file of its name fails
        assert (env.root / "c/d.txt").read_bytes() == b"d"
        assert lines[0].startswith("failed: uploads/c: ") and "is a directory" in lines[0]
    assert (env.root / "e.txt").read_bytes() == b"e"
    assert not temps(env.root)
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 1 and r.out.strip().endswith("failed 1")


@file_and_moto
def test_a_local_directory_where_the_remote_has_a_file_is_a_failure_that_names_it(store, make_env, syncd):
    env = make_env(store)
    (env.root / "c").mkdir(parents=True)  # an empty directory: nothing to upload, the name is taken
    store.put_raw(f"{env.prefix}/c", b"c")
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 1, r.out + r.err
    assert r.out.strip().endswith("failed 1")
    lines = failed_lines(r)
    assert len(lines) == 1 and lines[0].startswith("failed: uploads/c: ")
    assert f"{env.root / 'c'} is a directory" in lines[0]
    assert (env.root / "c").is_dir() and not temps(env.root)
    data = json.loads(syncd("--config", str(env.config), "status", "--json").out)
    (watch,) = data["watches"]
    assert [(f["path"], "is a directory" in f["error"]) for f in watch["failures"]] == [("c", True)]
    (env.root / "c").rmdir()  # the obstacle gone, the next resync restores the file
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert (env.root / "c").read_bytes() == b"c"


@file_and_moto
def test_a_local_file_where_a_remote_key_needs_a_directory_is_a_failure_that_names_it(store, make_env, syncd):
    env = make_env(store)
    env.root.mkdir(parents=True)
    (env.root / "c").write_bytes(b"local")  # not uploaded: --no-upload, the file:// remote has c/ there
    store.put_raw(f"{env.prefix}/c/d.txt", b"d")
    r = syncd("--config", str(env.config), "resync", "--no-upload")
    assert r.code == 1, r.out + r.err
    lines = failed_lines(r)
    assert len(lines) == 1 and lines[0].startswith("failed: uploads/c/d.txt: ")
    assert f"a parent of {env.root / 'c/d.txt'} is a file" in lines[0]
    assert (env.root / "c").read_bytes() == b"local" and not temps(env.root)
    assert row(env, "c/d.txt")["op"] == "get"  # queued still: restored once the file is gone
    (env.root / "c").unlink()
    r = syncd("--config", str(env.config), "resync", "--no-upload")
    assert r.code == 0, r.err
    assert (env.root / "c/d.txt").read_bytes() == b"d"


@file_and_moto
def test_restore_in_place_over_a_local_directory_exits_1_naming_it(store, make_env, syncd):
    env = make_env(store)
    (env.root / "c").mkdir(parents=True)
    store.put_raw(f"{env.prefix}/c", b"c")
    store.put_raw(f"{env.prefix}/ok.txt", b"ok")
    r = syncd("--config", str(env.config), "restore")
    assert r.code == 1, r.out + r.err
    assert r.out.strip().splitlines()[-1] == "restored 1, skipped 0, failed 1"
    lines = failed_lines(r)
    assert len(lines) == 1 and lines[0].startswith("failed: uploads/c: ") and "is a directory" in lines[0]
    assert (env.root / "ok.txt").read_bytes() == b"ok" and not temps(env.root)


@file_and_moto
@pytest.mark.parametrize("overwrite", [False, True])
def test_restore_to_a_directory_with_a_directory_in_the_way_exits_1_naming_it(store, make_env, syncd, tmp_path,
                                                                                overwrite):
    env = make_env(store)
    out = tmp_path / "out"
    (out / "uploads/c").mkdir(parents=True)
    (out / "uploads/f").write_bytes(b"file in the way")
    store.put_raw(f"{env.prefix}/c", b"c")
    store.put_raw(f"{env.prefix}/f/g.txt", b"g")
    store.put_raw(f"{env.prefix}/ok.txt", b"ok")
    r = syncd("--config", str(env.config), "restore", "--to", str(out), *(["--overwrite"] if overwrite else []))
    assert r.code == 1, r.out + r.err
    assert r.out.strip().splitlines()[-1] == "restored 1, skipped 0, failed 2"
    lines = sorted(failed_lines(r))
    assert len(lines) == 2
    assert f"{out / 'uploads/c'} is a directory" in lines[0]
    assert f"a parent of {out / 'uploads/f/g.txt'} is a file" in lines[1]
    assert (out / "uploads/c").is_dir() and (out / "uploads/f").read_bytes() == b"file in the way"
    assert (out / "uploads/ok.txt").read_bytes() == b"ok" and not temps(out)


def test_run_reports_a_local_directory_in_the_way_at_every_start(tmp_path, make_env, syncd, caplog):
    """`run`: the failure with its reason in the log and in `status`, at the first start and at
    the next one (not "1 missing to restore" with nothing said)."""
    from tests.conftest import Store

    root = tmp_path / "remote"
    env = make_env(Store(kind="file", url=f"file://{root}", root=root))
    (env.root / "c").mkdir(parents=True)
    (root / "uploads").mkdir(parents=True)
    (root / "uploads/c").write_bytes(b"c")
    caplog.set_level(logging.INFO)
    for start in range(2):
        caplog.clear()
        stop = threading.Event()
        d = Daemon(load_config(env.config), stop=stop)
        t = threading.Thread(target=d.run, name="test-daemon")
        t.start()
        try:
            wait_for(lambda d=d: d.phase == "running", timeout=30, what="ready")
            wait_for(lambda: (row(env, "c") or {}).get("state") == "failed", timeout=30, what="c failed")
            wait_for(lambda: any("is a directory" in r.getMessage() for r in caplog.records
                                 if r.levelno >= logging.WARNING), timeout=30, what="the failure logged")
        finally:
            stop.set()
            t.join(20)
        assert not t.is_alive()
        assert f"{env.root / 'c'} is a directory" in row(env, "c")["last_error"], start
    status = syncd("--config", str(env.config), "status")
    assert "is a directory" in status.out
    assert (env.root / "c").is_dir() and not temps(env.root)


@moto
@pytest.mark.parametrize("to", [False, True])
def test_restore_at_a_time_over_a_local_directory_exits_1_naming_it(store, make_env, syncd, tmp_path, to):
    from datetime import UTC, datetime, timedelta

    env = make_env(store)
    store.client.put_bucket_versioning(Bucket=store.bucket, VersioningConfiguration={"Status": "Enabled"})
    store.put_raw(f"{env.prefix}/c", b"c")
    store.put_raw(f"{env.prefix}/ok.txt", b"ok")
    root = tmp_path / "out/uploads" if to else env.root
    (root / "c").mkdir(parents=True)
    when = (datetime.now(UTC) + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    r = syncd("--config", str(env.config), "restore", "--at", when, *(["--to", str(tmp_path / "out")] if to else []))
    assert r.code == 1, r.out + r.err
    lines = failed_lines(r)
    assert len(lines) == 1 and f"{root / 'c'} is a directory" in lines[0]
    assert (root / "ok.txt").read_bytes() == b"ok" and (root / "c").is_dir() and not temps(root)


@file_and_moto
def test_a_directory_made_at_a_files_name_just_after_its_restore_looked_is_a_failure_not_a_local_file(
        store, make_env, syncd, monkeypatch):
    """Another worker restoring `c/d.txt` makes the directory `c` while this worker starts the
    restore of the object `c`. Explorer seed backup-mirror:548390670: the directory appeared
    between two looks at the name (absent, then there), was taken for a local file that wins,
    and `c` ended synced with nothing restored: exit 0 with a file/directory pair in the bucket."""
    env = make_env(store)
    env.root.mkdir(parents=True)
    store.put_raw(f"{env.prefix}/c", b"c")
    target = str(env.root / "c")
    real_lstat = os.lstat
    made = threading.Event()

    def racing_lstat(path, *a, **kw):
        caller = sys._getframe(1).f_code.co_filename
        first = not made.is_set() and os.fspath(path) == target and caller.endswith(
            os.path.join("syncd", "restore.py"))
        try:
            return real_lstat(path, *a, **kw)  # FileNotFoundError while `c` is absent
        finally:
            if first:  # the restore's first look at the name: the other worker's mkdir lands now
                made.set()
                os.mkdir(target)

    with monkeypatch.context() as m:
        m.setattr(os, "lstat", racing_lstat)
        r = syncd("--config", str(env.config), "resync")
    assert made.is_set()
    failed_as_a_directory(r, env, "c")
    assert not temps(env.root)
