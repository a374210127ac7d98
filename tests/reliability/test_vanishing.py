"""Files that vanish at awkward moments: between event and upload, during the upload, and after
an upload a crash cut off. Nothing may be reported failed for it, and no object may be left in
the bucket without a ledger row (it would never be deleted nor restored)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from syncd import fsutil
from syncd.config import load_config
from syncd.fsutil import SMALL_FILE
from syncd.ledger import Ledger
from syncd.remote.local import LocalRemote
from syncd.scanner import Scanner
from tests.conftest import Store


@pytest.fixture
def env(tmp_path, make_env):
    root = tmp_path / "remote"
    return make_env(Store(kind="file", url=f"file://{root}", root=root), watch={"on_delete": "mirror"})


def rows(env) -> dict[str, tuple]:
    con = sqlite3.connect(env.ledger)
    try:
        return {r[0]: r[1:] for r in con.execute("SELECT path, state, op FROM files")}
    finally:
        con.close()


def record_deletions(env) -> None:
    """What the daemon's recorder does when it sees deletions (missing = "delete")."""
    cfg = load_config(env.config)
    ledger = Ledger(cfg.ledger)
    try:
        Scanner(ledger, cfg.watches[0], cfg.remote.prefix, settle=0, missing="delete").run()
    finally:
        ledger.close()


def test_vanishes_between_scan_and_hash(env, syncd, monkeypatch, figures):
    (env.root / "d").mkdir(parents=True)
    (env.root / "d/flash.bin").write_bytes(b"gone soon")
    (env.root / "d/stays.bin").write_bytes(b"stays")
    real = fsutil.read_small

    def read_after_delete(path, limit):
        if str(path).endswith("flash.bin"):
            Path(path).unlink(missing_ok=True)
        return real(path, limit)

    monkeypatch.setattr(fsutil, "read_small", read_after_delete)
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert env.store.object_keys() == ["uploads/d/stays.bin"]
    assert "flash.bin" not in rows(env)
    figures.add("hostile: vanishes before upload", hostile_cases=1, files_verified=1)


def test_deleted_while_its_upload_finishes_leaves_no_orphan(env, syncd, monkeypatch, figures):
    """The recorder sees the deletion while the PUT is on the wire: the object must go too."""
    (env.root).mkdir(parents=True)
    (env.root / "doomed.bin").write_bytes(b"doomed")
    (env.root / "other.bin").write_bytes(b"other")
    real = LocalRemote.put

    def put_then_delete(self, key, path, **kw):
        real(self, key, path, **kw)
        if key.endswith("doomed.bin"):
            Path(path).unlink()
            record_deletions(env)

    monkeypatch.setattr(LocalRemote, "put", put_then_delete)
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert env.store.object_keys() == ["uploads/other.bin"]
    assert rows(env)["doomed.bin"] == ("deleted", None)
    figures.add("hostile: deleted during its upload", hostile_cases=1, files_verified=1)


@pytest.mark.parametrize("reached_remote", [True, False])
def test_upload_cut_off_by_a_crash_then_file_deleted(env, syncd, figures, reached_remote):
    """kill -9 between the PUT and the ledger update, then the file is deleted while syncd is
    down: at start it is restored when the object got there (SPEC §4.5), else forgotten quietly."""
    env.root.mkdir(parents=True)
    (env.root / "a.bin").write_bytes(b"first version")
    assert syncd("--config", str(env.config), "resync").code == 0
    # the state a kill leaves: the row still `uploading`, the remote's content unknown to the ledger
    con = sqlite3.connect(env.ledger)
    con.execute("UPDATE files SET state='uploading', op='put', remote_sha256=NULL, lease_until=1")
    con.commit()
    con.close()
    (env.root / "a.bin").unlink()
    if not reached_remote:
        (env.store.root / "uploads/a.bin").unlink()
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err + r.out
    if reached_remote:
        assert (env.root / "a.bin").read_bytes() == b"first version"
        assert rows(env)["a.bin"] == ("synced", None)
    else:
        assert not (env.root / "a.bin").exists()
        assert "a.bin" not in rows(env)
    figures.add("hostile: upload cut off by a crash", hostile_cases=1, files_verified=int(reached_remote))


def test_restore_temp_left_by_a_kill_is_removed_at_next_start(env, syncd, figures):
    """kill -9 during a restore leaves `.syncd-restore-*` behind (the cleanup never ran)."""
    (env.root / "d").mkdir(parents=True)
    (env.root / "d/real.bin").write_bytes(b"real")
    stale = env.root / "d/.syncd-restore-k1ll3d"
    stale.write_bytes(b"half a restore")
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert not stale.exists()
    assert env.store.object_keys() == ["uploads/d/real.bin"]
    figures.add("hostile: restore temp left by a kill", hostile_cases=1, files_verified=1)


def test_copy_source_overwritten_meanwhile_is_not_copied(store, make_env, syncd, monkeypatch, figures):
    """A new file whose content is already remote (a rename, a duplicate) becomes a server-side
    copy of that key; if the key is overwritten right then (its own file changed and was
    uploaded), the copy must not carry the new content under the old checksum."""
    from syncd.ledger import Ledger as LedgerClass
    from syncd.remote import open_remote

    env = make_env(store)
    env.root.mkdir(parents=True)
    same = os.urandom(SMALL_FILE + 1)  # streamed from the file, not from memory
    (env.root / "first.bin").write_bytes(same)
    assert syncd("--config", str(env.config), "resync").code == 0
    (env.root / "second.bin").write_bytes(same)
    other = env.tmp / "other.bin"
    other.write_bytes(b"first.bin's next version, uploaded just now")
    real = LedgerClass.find_remote_copy
    copies: list[str] = []

    def find_then_overwrite(self, sha256, exclude_id):
        src = real(self, sha256, exclude_id)
        if src is not None:  # first.bin's key gets another content before the copy
            copies.append(src["key"])
            remote = open_remote(load_config(env.config))
            remote.put(src["key"], other, size=other.stat().st_size,
                       sha256=fsutil.sha256_file(other), mtime_ns=other.stat().st_mtime_ns)
            remote.close()
        return src

    monkeypatch.setattr(LedgerClass, "find_remote_copy", find_then_overwrite)
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert copies, "the duplicate was not sent as a copy"
    assert store.read(f"{env.prefix}/second.bin") == same
    figures.add(f"hostile: copy source overwritten ({store.kind})", hostile_cases=1, files_verified=1)


def test_deletion_recorded_for_a_row_a_worker_just_dropped(env, syncd, figures):
    """The recorder reads a row being uploaded; the worker finds the file gone and drops the row;
    the recorder then writes the deletion: it re-creates the row, which must carry its key (a
    keyless 'deleting' row failed forever with ParamValidationError)."""
    env.root.mkdir(parents=True)
    (env.root / "gone.bin").write_bytes(b"x")
    cfg = load_config(env.config)
    ledger = Ledger(cfg.ledger)
    try:
        ledger.ensure_watch("uploads", str(env.root))
        sc = Scanner(ledger, cfg.watches[0], cfg.remote.prefix, settle=0, missing="delete")
        sc.run()  # queues gone.bin
        row = ledger.claim(("put",), now=9e9)[0]  # a worker takes it ('uploading')
        (env.root / "gone.bin").unlink()
        stale = ledger.get("uploads", "gone.bin")
        ledger.forget(row)  # the worker: vanished before upload
        sc.on_missing(stale)  # the recorder, with what it read before
        sc.flush()
        assert ledger.get("uploads", "gone.bin")["key"] == "uploads/gone.bin"
    finally:
        ledger.close()
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert rows(env)["gone.bin"] == ("deleted", None)
    figures.add("hostile: deletion racing a dropped row", hostile_cases=1)
