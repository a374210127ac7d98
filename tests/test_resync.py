"""`syncd resync` / `restore` end to end, against file://, moto in-process and moto over HTTP."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import pytest

from syncd import fsutil
from tests.conftest import Store

MIB = 1024 * 1024


def build_tree(root: Path) -> dict[str, bytes]:
    files = {
        "a.txt": b"hello\n",
        "nested/deeper/still/deep.txt": b"deep" * 100,
        "with space/file name.txt": b"spaces",
        "unicodé/файл-😀.txt": "unicode ✓".encode(),
        "empty.bin": b"",
        "big/twenty.bin": os.urandom(20 * MIB),
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts hashes and PUTs (uploads and server-side copies) of every remote kind."""
    from syncd.remote.local import LocalRemote
    from syncd.remote.s3 import S3Remote

    counts = {"hash": 0, "put": 0}
    real_hash, real_read = fsutil.sha256_file, fsutil.read_small

    def hash_counted(path):
        counts["hash"] += 1
        return real_hash(path)

    def read_counted(path, limit):  # a small file is read once and hashed from memory
        counts["hash"] += 1
        return real_read(path, limit)

    monkeypatch.setattr(fsutil, "sha256_file", hash_counted)
    monkeypatch.setattr(fsutil, "read_small", read_counted)
    for cls in (LocalRemote, S3Remote):
        for name in ("put", "copy"):
            real = getattr(cls, name)

            def wrapped(self, *a, _real=real, **kw):
                counts["put"] += 1
                return _real(self, *a, **kw)

            monkeypatch.setattr(cls, name, wrapped)
    return counts


def test_uploads_tree_byte_identical_with_metadata(store, make_env, syncd):
    env = make_env(store, remote={"multipart_threshold_mb": 5, "multipart_chunk_mb": 5})
    files = build_tree(env.root)
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert r.out.strip().splitlines()[-1] == f"uploaded {len(files)}, restored 0, unchanged 0, failed 0"
    assert store.object_keys() == sorted(f"{env.prefix}/{rel}" for rel in files)
    for rel, data in files.items():
        key = f"{env.prefix}/{rel}"
        assert store.read(key) == data, rel
        mtime_ns = (env.root / rel).stat().st_mtime_ns
        if store.kind == "file":
            assert (store.root / key).stat().st_mtime_ns == mtime_ns
            continue
        head = store.client.head_object(Bucket=store.bucket, Key=key, ChecksumMode="ENABLED")
        assert head["Metadata"]["syncd-sha256"] == hashlib.sha256(data).hexdigest()
        assert head["Metadata"]["syncd-mtime-ns"] == str(mtime_ns)
        if store.kind == "s3rver":
            continue  # s3rver keeps no flexible checksums (the syncd-sha256 metadata is checked above)
        if len(data) >= 5 * MIB:  # multipart: a composite of per-part SHA-256 checksums
            assert head["ChecksumSHA256"]
        else:
            assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()


def test_deleted_local_files_come_back_identical_with_mtime(store, make_env, syncd):
    env = make_env(store)
    files = {"x/one.txt": b"one", "two.txt": b"two" * 1000, "keep.txt": b"keep"}
    for rel, data in files.items():
        (env.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (env.root / rel).write_bytes(data)
        os.utime(env.root / rel, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    assert syncd("--config", str(env.config), "resync").code == 0
    (env.root / "x/one.txt").unlink()
    (env.root / "x").rmdir()
    (env.root / "two.txt").unlink()
    # an existing local file that differs from the remote is never overwritten
    (env.root / "keep.txt").write_bytes(b"local edit")
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert "restored 2" in r.out
    assert (env.root / "x/one.txt").read_bytes() == b"one"
    assert (env.root / "two.txt").read_bytes() == b"two" * 1000
    assert (env.root / "x/one.txt").stat().st_mtime_ns == 1_600_000_000_123_456_789
    assert (env.root / "keep.txt").read_bytes() == b"local edit"
    assert store.read(f"{env.prefix}/keep.txt") == b"local edit"
    assert not [p for p in env.tmp.rglob(".syncd-restore-*")]


def test_lost_ledger_is_rebuilt_from_the_remote_listing(store, make_env, syncd, counting):
    env = make_env(store)
    files = {"a.txt": b"a", "d/b.txt": b"b", "d/e/c.txt": b"c" * 5000}
    for rel, data in files.items():
        (env.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (env.root / rel).write_bytes(data)
    assert syncd("--config", str(env.config), "resync").code == 0
    (env.root / "d/b.txt").unlink()
    (env.root / "d/e/c.txt").unlink()
    for suffix in ("", "-wal", "-shm"):
        Path(str(env.ledger) + suffix).unlink(missing_ok=True)
    counting["put"] = 0
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert tree(env.root) == files
    assert counting["put"] == 0  # a.txt was still there and already remote: compared, not re-sent
    from syncd.ledger import Ledger

    ledger = Ledger(env.ledger)
    try:
        assert ledger.counts("uploads")["synced"] == 3
    finally:
        ledger.close()


HOSTILE = ["../x", "a/../../x", "/abs", "..\\x", "C:\\x", "nul\x00byte", "./dot", "a//b"]


def test_hostile_keys_are_refused_and_nothing_escapes_the_root(store, make_env, syncd):
    if store.kind == "file":
        pytest.skip("a directory cannot hold such names; the key checks are unit-tested")
    if store.kind == "s3rver":
        pytest.skip("s3rver normalises or refuses such keys itself; tests/reliability covers them on moto")
    env = make_env(store)
    env.root.mkdir(parents=True)
    store.put_raw("backups/uploads/good.txt", b"good")
    for k in HOSTILE:
        store.put_hostile("backups/uploads/" + k, b"evil")
    before = set(env.tmp.parent.iterdir())
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 1
    assert (env.root / "good.txt").read_bytes() == b"good"
    assert "unsafe key" in r.err
    assert "failed" in r.out
    assert set(env.tmp.parent.iterdir()) == before  # nothing written beside tmp_path
    everything = [p.relative_to(env.tmp).as_posix() for p in env.tmp.rglob("*") if p.is_file()]
    assert not [p for p in everything if Path(p).name == "x" or "abs" in p or "evil" in p]
    assert [p for p in env.root.rglob("*") if p.is_file()] == [env.root / "good.txt"]


def test_second_resync_sends_nothing_and_hashes_nothing(store, make_env, syncd, counting):
    env = make_env(store)
    for i in range(20):
        (env.root / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (env.root / f"d{i % 3}/f{i}.txt").write_bytes(f"file {i}".encode())
    assert syncd("--config", str(env.config), "resync").code == 0
    assert counting["put"] == 20 and counting["hash"] == 20
    counting.update(put=0, hash=0)
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0
    assert counting == {"put": 0, "hash": 0}
    assert "unchanged 20" in r.out
    # restored files are not uploaded back
    (env.root / "d1/f1.txt").unlink()
    assert "restored 1" in syncd("--config", str(env.config), "resync").out
    counting.update(put=0, hash=0)
    r = syncd("--config", str(env.config), "resync")
    assert counting["put"] == 0 and "uploaded 0" in r.out


def test_dry_run_changes_nothing(store, make_env, syncd):
    env = make_env(store)
    (env.root / "sub").mkdir(parents=True)
    (env.root / "sub/a.txt").write_bytes(b"a")
    (env.root / "b.txt").write_bytes(b"b")
    assert syncd("--config", str(env.config), "resync").code == 0
    (env.root / "sub/a.txt").unlink()
    (env.root / "c.txt").write_bytes(b"new")
    (env.root / "b.txt").write_bytes(b"changed")
    local_before = tree(env.root)
    remote_before = {k: store.read(k) for k in store.object_keys()}
    r = syncd("--config", str(env.config), "resync", "--dry-run")
    assert r.code == 0, r.err
    assert "would upload 2, would restore 1" in r.out
    assert tree(env.root) == local_before
    assert {k: store.read(k) for k in store.object_keys()} == remote_before
    r = syncd("--config", str(env.config), "restore", "--dry-run")
    assert "would restore 1" in r.out
    assert tree(env.root) == local_before


def test_restore_command_in_place_and_to_a_directory(store, make_env, syncd):
    env = make_env(store)
    (env.root / "p").mkdir(parents=True)
    (env.root / "p/one.jpg").write_bytes(b"1")
    (env.root / "p/two.png").write_bytes(b"2")
    assert syncd("--config", str(env.config), "resync").code == 0
    (env.root / "p/one.jpg").unlink()
    (env.root / "p/two.png").unlink()
    r = syncd("--config", str(env.config), "restore", "*.jpg")
    assert r.code == 0, r.err
    assert (env.root / "p/one.jpg").read_bytes() == b"1"
    assert not (env.root / "p/two.png").exists()
    out = env.tmp / "copy"
    r = syncd("--config", str(env.config), "restore", "--to", str(out))
    assert r.code == 0, r.err
    assert tree(out) == {"uploads/p/one.jpg": b"1", "uploads/p/two.png": b"2"}
    assert not (env.root / "p/two.png").exists()  # --to never touches the watch


def test_names_that_cannot_be_keys_are_failed_not_skipped(store, make_env, syncd):
    if store.kind != "file":
        pytest.skip("the name check does not depend on the remote")
    env = make_env(store)
    env.root.mkdir()
    (env.root / "fine.txt").write_bytes(b"ok")
    bad = os.fsencode(env.root) + b"/bad-\xff.txt"
    with open(bad, "wb") as f:
        f.write(b"latin-1 name")
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 1
    assert "not valid UTF-8" in r.err
    assert store.object_keys() == ["uploads/fine.txt"]
    r = syncd("--config", str(env.config), "status", "--json")
    import json

    st = json.loads(r.out)["watches"][0]
    assert st["counts"]["failed"] == 1
    assert st["failures"][0]["path"] == "bad-\\xff.txt"


def test_restore_to_removes_the_temps_a_killed_restore_left(tmp_path, make_env, syncd, monkeypatch):
    from syncd import restore_cmd

    env = make_env(Store(kind="file", url=f"file://{tmp_path / 'remote'}", root=tmp_path / "remote"))
    (env.root / "p").mkdir(parents=True)
    (env.root / "p/a.txt").write_bytes(b"a")
    assert syncd("--config", str(env.config), "resync").code == 0
    out = env.tmp / "copy"
    (out / "uploads/p").mkdir(parents=True)
    (out / "uploads/p/.syncd-restore-killed").write_bytes(b"half")  # what kill -9 leaves
    # a temp written within the last STALE_TEMP_SECONDS may be another restore's, still running
    assert restore_cmd.clean_stale_temps([out / "uploads/p"]) == 0
    monkeypatch.setattr(restore_cmd, "STALE_TEMP_SECONDS", -1.0)  # this one is old enough
    r = syncd("--config", str(env.config), "restore", "--to", str(out))
    assert r.code == 0, r.err
    assert tree(out) == {"uploads/p/a.txt": b"a"}
