"""The remote ends right when syncd's own steps race or the store misleads it (issue 14: 5, 7, 8, 9, 11).

- 5: a ledger describes one remote; pointed at another, it compares and uploads everything again.
- 7: an object without `syncd-sha256` is checked against the SHA-256 the ledger knows, or restored
  with a warning that it is unverified.
- 8: a deletion recorded while the file's upload is in flight deletes what that upload lands.
- 9: a CRC32C-only object is checked (botocore[crt]) or not called verified.
- 11: a rename's old key is deleted only after the new path was copied from it.
"""

from __future__ import annotations

import base64
import os
import sqlite3
import time

import pytest

from tests.conftest import wait_for
from tests.reliability.faultproxy import FaultProxy, Rates
from tests.reliability.util import PREFIX, Rig, port_of

MIB = 1024 * 1024


def _row(ledger, path: str) -> tuple | None:
    if not ledger.exists():
        return None
    con = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute("SELECT state, op, remote_sha256 FROM files WHERE path=?", (path,)).fetchone()
    finally:
        con.close()


def test_deletion_during_an_in_flight_upload_deletes_what_that_upload_lands(tmp_path, moto_server):
    """Finding 8, the exact sequence: a 2 MiB file over a link that takes ~4 s to upload it, appended
    to 1.5 s into the upload and unlinked at 3.0 s, under on_delete = "mirror"."""
    rate = 512 * 1024  # 2 MiB in ~4 s
    with FaultProxy(port_of(moto_server), seed=0, rates=Rates(), slow=b"/backups/uploads/big.bin ",
                    slow_rate=rate) as proxy:
        rig = Rig(tmp_path, proxy.url, direct=moto_server, watch={"on_delete": "mirror"})
        d = rig.daemon()
        try:
            d.wait_ready()
            big = rig.root / "big.bin"
            big.write_bytes(os.urandom(2 * MIB))
            sent = lambda: sum(proxy.progress.values())  # noqa: E731
            bucket = rig.keys  # the keys under the watch's prefix, now
            wait_for(lambda: sent() >= 1.5 * rate, timeout=30, what="upload 1.5 s in")
            with open(big, "ab") as f:
                f.write(b"appended while uploading")
            wait_for(lambda: sent() >= 3.0 * rate, timeout=30, what="upload 3.0 s in")
            big.unlink()
            # the end: the upload has landed and the ledger settled the row (deleted, or dropped)
            wait_for(lambda: sent() >= 2 * MIB and (
                (_row(rig.ledger, "big.bin") or ("",))[0] == "deleted"
                or (_row(rig.ledger, "big.bin") is None and f"{PREFIX}/big.bin" in bucket())),
                timeout=60, what="the upload landed and the deletion was settled")
            row = _row(rig.ledger, "big.bin")
            assert row is not None, "the row was dropped while its upload was in flight"
            assert row[:2] == ("deleted", None)
            assert f"{PREFIX}/big.bin" not in bucket()
        finally:
            d.stop()
        assert not big.exists()


def _engine(env):
    from syncd.config import load_config
    from syncd.engine import Engine
    from syncd.ledger import Ledger
    from syncd.remote import open_remote

    cfg = load_config(env.config)
    ledger = Ledger(cfg.ledger)
    return cfg, ledger, Engine(cfg, ledger, open_remote(cfg), oneshot=False)


@pytest.mark.parametrize("store", ["file", "moto"], indirect=True)
def test_a_renames_old_key_is_deleted_only_after_the_new_path_was_copied_from_it(store, make_env, syncd):
    """Finding 11: the deletion of the old path is claimed first (a worker is free before the new
    path is hashed); it must wait, so the new path is a server-side copy, not a full upload."""
    from syncd.scanner import Scanner

    env = make_env(store, watch={"on_delete": "mirror"})
    env.root.mkdir(parents=True)
    (env.root / "old.txt").write_bytes(b"renamed content")
    assert syncd("--config", str(env.config), "resync").code == 0
    os.rename(env.root / "old.txt", env.root / "new.txt")
    cfg, ledger, engine = _engine(env)
    try:
        w = cfg.watches[0]
        Scanner(ledger, w, cfg.remote.prefix, settle=0, missing="delete").run()  # what the watcher records
        t = engine.transfers
        (deletion,) = ledger.claim(("delete",), time.time())
        t.handle(deletion)  # first: it must not delete the copy source yet
        (put,) = ledger.claim(("put",), time.time())
        t.handle(put)

        def deletion_done() -> bool:  # the deletion waits a moment after the copy: claim it when due
            for r in ledger.claim(("delete",), time.time()):
                t.handle(r)
            return ledger.get(w.prefix, "old.txt")["state"] == "deleted"

        wait_for(deletion_done, timeout=10, what="old key deleted")
        assert engine.stats.copied == 1 and engine.stats.uploaded == 1
        assert store.object_keys() == [f"{env.prefix}/new.txt"]
        assert store.read(f"{env.prefix}/new.txt") == b"renamed content"
    finally:
        engine.remote.close()
        ledger.close()


@pytest.mark.parametrize("store", ["file", "moto"], indirect=True)
def test_an_object_without_syncd_sha256_is_checked_against_the_ledgers_sha256(store, make_env, syncd):
    """Finding 7: the body of an aborted PUT that a store kept (s3rver does) has no syncd-sha256
    and a server checksum of its own short body; the ledger knows what was uploaded there."""
    env = make_env(store)
    env.root.mkdir(parents=True)
    data = os.urandom(100_000)
    (env.root / "photo.jpg").write_bytes(data)
    assert syncd("--config", str(env.config), "resync").code == 0
    store.put_raw(f"{env.prefix}/photo.jpg", data[:40_000])  # what an aborted PUT leaves
    (env.root / "photo.jpg").unlink()
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 1, r.out + r.err
    assert "does not match the SHA-256 the ledger recorded" in r.out + r.err
    assert not (env.root / "photo.jpg").exists()


@pytest.mark.parametrize("store", ["file", "moto"], indirect=True)
def test_an_object_nothing_can_check_is_restored_with_a_warning(store, make_env, syncd):
    """Finding 7 without a ledger: nothing says what the bytes should be; restored, and said so
    (file://: no checksum at all); an object with a store checksum botocore checks is verified."""
    env = make_env(store)
    if store.kind == "file":
        store.put_raw(f"{env.prefix}/other-tool.txt", b"written by another tool")
    else:
        store.client.put_object(Bucket=store.bucket, Key=f"{env.prefix}/other-tool.txt",
                                Body=b"written by another tool", ChecksumAlgorithm="SHA256")
    r = syncd("--config", str(env.config), "restore", "--to", str(env.tmp / "out"))
    assert r.code == 0, r.out + r.err
    assert (env.tmp / "out/uploads/other-tool.txt").read_bytes() == b"written by another tool"
    warned = "unverified" in r.err
    assert warned == (store.kind == "file"), r.err


def _crc32c(data: bytes) -> str:
    """CRC32C (Castagnoli), base64 as S3 sends it: computed here so the test needs no awscrt."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return base64.b64encode((crc ^ 0xFFFFFFFF).to_bytes(4, "big")).decode()


def _crc32c_only_object(store, env, data: bytes) -> str:
    """An object as AWS's own tools write it now: a CRC32C checksum, no syncd-sha256."""
    key = f"{env.prefix}/crc.bin"
    store.client.put_object(Bucket=store.bucket, Key=key, Body=data, ChecksumAlgorithm="CRC32C",
                            ChecksumCRC32C=_crc32c(data))
    return key


@pytest.mark.parametrize("store", ["moto_server", "moto_server+botocore"], indirect=True)
def test_a_byte_flipped_in_a_crc32c_only_download_is_refused(store, make_env, syncd):
    """Finding 9: botocore checks CRC32C only with awscrt (botocore[crt], a dependency now)."""
    data = os.urandom(3000)
    with FaultProxy(port_of(store.endpoint_url), seed=0, rates=Rates(), corrupt=b"/backups/uploads/crc.bin ") as proxy:
        env = make_env(store, remote={"endpoint_url": proxy.url})
        _crc32c_only_object(store, env, data)
        r = syncd("--config", str(env.config), "resync")
        assert proxy.corrupted >= 1
    assert r.code == 1, r.out + r.err
    assert "checksum mismatch" in r.out + r.err
    assert not (env.root / "crc.bin").exists()


@pytest.mark.parametrize("store", ["moto"], indirect=True)
def test_a_checksum_botocore_cannot_check_is_not_called_verified(store, make_env, monkeypatch):
    """Finding 9 without awscrt: botocore skips CRC32C silently; the download is not verified."""
    import io

    import botocore.httpchecksum as hc

    from syncd.config import load_config
    from syncd.remote.s3 import S3Remote

    env = make_env(store)
    data = b"checked by nobody"
    key = _crc32c_only_object(store, env, data)
    remote = S3Remote(load_config(env.config).remote)
    assert remote.get(key, io.BytesIO()).server_verified  # awscrt installed: botocore checks it
    monkeypatch.setattr(hc, "_SUPPORTED_CHECKSUM_ALGORITHMS",
                        [a for a in hc._SUPPORTED_CHECKSUM_ALGORITHMS if a not in ("crc32c", "crc64nvme")])
    out = io.BytesIO()
    fetched = remote.get(key, out)
    assert out.getvalue() == data and not fetched.server_verified


@pytest.mark.parametrize("store", ["file", "moto"], indirect=True)
def test_a_changed_remote_url_is_a_new_remote_listed_compared_and_uploaded(store, make_env, syncd, tmp_path):
    """Finding 5: pointed at another remote, the ledger's old keys and synced states describe the
    old one; every file must reach the new one (and only once)."""
    env = make_env(store)
    env.root.mkdir(parents=True)
    files = {"a.txt": b"a", "d/b.txt": b"bb", "d/e/c.txt": b"ccc"}
    for rel, data in files.items():
        (env.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (env.root / rel).write_bytes(data)
    assert "uploaded 3" in syncd("--config", str(env.config), "resync").out
    if store.kind == "file":
        new_url, new_prefix = f"file://{tmp_path / 'elsewhere'}", "uploads"
        keys = lambda: sorted(p.relative_to(tmp_path / "elsewhere").as_posix()  # noqa: E731
                              for p in (tmp_path / "elsewhere").rglob("*") if p.is_file()
                              and ".syncd-meta" not in p.parts)
    else:
        bucket = store.client.create_bucket(Bucket=f"{store.bucket}-new") and f"{store.bucket}-new"
        new_url, new_prefix = f"s3://{bucket}/moved", "moved/uploads"
        keys = lambda: sorted(o["Key"] for o in  # noqa: E731
                              store.client.list_objects_v2(Bucket=bucket).get("Contents", ()))
    text = env.config.read_text().replace(f'url = "{store.url}"', f'url = "{new_url}"')
    assert new_url in text
    env.config.write_text(text)
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0 and "uploaded 3," in r.out, r.out + r.err
    assert "a new remote" in r.err
    assert keys() == sorted(f"{new_prefix}/{rel}" for rel in files)
    con = sqlite3.connect(env.ledger)
    try:
        assert sorted(k for (k,) in con.execute("SELECT key FROM files")) == keys()
    finally:
        con.close()
    r = syncd("--config", str(env.config), "resync")
    assert "uploaded 0, restored 0, unchanged 3" in r.out and "a new remote" not in r.err


@pytest.mark.parametrize("store", ["moto"], indirect=True)
def test_a_new_remote_that_already_holds_the_files_is_compared_not_uploaded(store, make_env, syncd):
    """Finding 5: a bucket copied to another prefix (the same bytes, the same metadata) is listed
    and compared; nothing is sent again. A ledger from before the remote was recorded whose keys
    do not fit the config's remote is taken to describe another remote too."""
    env = make_env(store)
    env.root.mkdir(parents=True)
    (env.root / "a.txt").write_bytes(b"same")
    assert "uploaded 1" in syncd("--config", str(env.config), "resync").out
    store.client.copy_object(Bucket=store.bucket, Key="copied/uploads/a.txt",
                             CopySource={"Bucket": store.bucket, "Key": f"{env.prefix}/a.txt"})
    con = sqlite3.connect(env.ledger)
    con.execute("DELETE FROM meta WHERE name='remote'")  # as a ledger of an older syncd
    con.commit()
    con.close()
    env.config.write_text(env.config.read_text().replace(store.url, f"s3://{store.bucket}/copied"))
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0 and "uploaded 0, restored 0, unchanged 1" in r.out, r.out + r.err
    assert "a new remote" in r.err
