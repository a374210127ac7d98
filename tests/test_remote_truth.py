"""The remote is the truth (issue 12): `resync` compares with a listing every time (SPEC §3),
remote tombstones under `keep` (§4.5), shared watches (§4.12). One-shot commands in-process,
against the file:// remote and moto over HTTP."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from syncd.config import load_config as load
from syncd.ledger import Ledger
from syncd.remote.base import ObjectInfo
from syncd.remote.local import LocalRemote
from tests.test_resync import tree

both = pytest.mark.parametrize("store", ["file", "moto_server", "moto_server+botocore"], indirect=True)


def write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def rows(env) -> dict[str, tuple]:
    ledger = Ledger(env.ledger)
    try:
        return {r["path"]: (r["state"], r["op"]) for r in ledger.query("SELECT * FROM files")}
    finally:
        ledger.close()


def delete_object(store, key: str) -> None:
    if store.kind == "file":
        LocalRemote(store.root).delete(key)
    else:
        store.client.delete_object(Bucket=store.bucket, Key=key)


@both
def test_resync_with_a_ledger_restores_an_object_another_tool_put(store, make_env, syncd):
    env = make_env(store)
    write(env.root, {"a.txt": b"a"})
    assert syncd("--config", str(env.config), "resync").code == 0
    store.put_raw(f"{env.prefix}/from-elsewhere/b.txt", b"put by aws s3 sync")
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert "restored 1" in r.out
    assert (env.root / "from-elsewhere/b.txt").read_bytes() == b"put by aws s3 sync"
    assert rows(env)["from-elsewhere/b.txt"] == ("synced", None)
    r = syncd("--config", str(env.config), "status", "--json")
    assert '"last_listing": "20' in r.out


@pytest.mark.parametrize("store", ["moto_server", "moto_server+botocore"], indirect=True)
def test_resync_with_a_ledger_refuses_a_hostile_key_put_later(store, make_env, syncd):
    env = make_env(store)
    write(env.root, {"a.txt": b"a"})
    assert syncd("--config", str(env.config), "resync").code == 0
    store.put_hostile("backups/uploads/x/../../../evil.txt", b"evil")
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 1
    assert "unsafe key" in r.err
    assert not [p for p in env.tmp.rglob("evil.txt")]


@both
def test_backup_resync_uploads_again_a_synced_file_whose_object_vanished(store, make_env, syncd):
    env = make_env(store)
    write(env.root, {"a.txt": b"a", "d/b.txt": b"b"})
    assert syncd("--config", str(env.config), "resync").code == 0
    delete_object(store, f"{env.prefix}/d/b.txt")
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert "uploaded 1" in r.out
    assert store.read(f"{env.prefix}/d/b.txt") == b"b"


@both
def test_resync_of_unchanged_files_with_a_ledger_costs_the_listing_only(store, make_env, syncd, monkeypatch):
    from syncd.remote.local import LocalRemote as LR
    from syncd.remote.s3 import S3Remote

    env = make_env(store)
    write(env.root, {f"d{i % 3}/f{i}.txt": b"x" * i for i in range(30)})
    assert syncd("--config", str(env.config), "resync").code == 0
    calls: list[str] = []
    for cls in (LR, S3Remote):
        for name in ("head", "get", "put", "copy", "delete"):
            real = getattr(cls, name)

            def counted(self, *a, _real=real, _name=name, **kw):
                calls.append(_name)
                return _real(self, *a, **kw)

            monkeypatch.setattr(cls, name, counted)
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert calls == []


@both
def test_keep_tombstones_stop_a_lost_ledger_bringing_deleted_files_back(store, make_env, syncd):
    """The container case: the app deleted files while syncd ran (tombstones written, SPEC
    §4.5); then the uploads dir and the ledger are lost; the restart restores the rest only."""
    from syncd.scanner import Scanner

    env = make_env(store, watch={"on_delete": "keep"})
    files = {f"p/{i}.jpg": bytes([i]) * (100 + i) for i in range(8)}
    write(env.root, files)
    assert syncd("--config", str(env.config), "resync").code == 0
    deleted = ["p/1.jpg", "p/4.jpg", "p/6.jpg"]
    for rel in deleted:
        (env.root / rel).unlink()
    cfg = load(env.config)
    ledger = Ledger(env.ledger)
    try:  # what the running daemon's watcher or rescan does with a deletion
        Scanner(ledger, cfg.watches[0], cfg.remote.prefix, settle=0, missing="delete").run()
    finally:
        ledger.close()
    assert syncd("--config", str(env.config), "resync").code == 0  # drains the tombstone writes
    keys = store.object_keys()
    assert all(f"{env.prefix}/.syncd/tombstones/{rel}" in keys for rel in deleted)
    assert all(f"{env.prefix}/{rel}" in keys for rel in deleted)  # keep: the objects stay
    # the container restarts with nothing
    for p in sorted(env.root.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    for suffix in ("", "-wal", "-shm"):
        Path(str(env.ledger) + suffix).unlink(missing_ok=True)
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert tree(env.root) == {k: v for k, v in files.items() if k not in deleted}
    # the app writes a deleted path again: uploaded, and its tombstone goes
    write(env.root, {"p/4.jpg": b"new four"})
    assert syncd("--config", str(env.config), "resync").code == 0
    keys = store.object_keys()
    assert f"{env.prefix}/.syncd/tombstones/p/4.jpg" not in keys
    assert f"{env.prefix}/.syncd/tombstones/p/1.jpg" in keys
    assert store.read(f"{env.prefix}/p/4.jpg") == b"new four"


@both
def test_iam_policy_lets_keep_lift_its_tombstones(store, make_env, syncd):
    import json

    env = make_env(store, watch={"on_delete": "keep"})
    pol = json.loads(syncd("--config", str(env.config), "iam-policy").out)
    st = {s["Sid"]: s for s in pol["Statement"]}
    assert st["SyncdTombstones"]["Action"] == ["s3:DeleteObject"]
    assert st["SyncdTombstones"]["Resource"][0].endswith("uploads/.syncd/tombstones/*")


def shared_env(store, make_env, **syncd_opts):
    return make_env(store, watch={"mode": "shared", "on_delete": "mirror"}, syncd=syncd_opts)


@both
def test_shared_resync_replaces_an_unchanged_local_copy_and_keeps_a_local_change(store, make_env, syncd):
    env = shared_env(store, make_env)
    write(env.root, {"same.txt": b"v1", "edited.txt": b"e1"})
    assert syncd("--config", str(env.config), "resync").code == 0
    store.put_raw(f"{env.prefix}/same.txt", b"v2 from another host")
    store.put_raw(f"{env.prefix}/edited.txt", b"e2 from another host")
    (env.root / "edited.txt").write_bytes(b"e1 edited here, not uploaded yet")
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert (env.root / "same.txt").read_bytes() == b"v2 from another host"
    assert (env.root / "edited.txt").read_bytes() == b"e1 edited here, not uploaded yet"
    assert store.read(f"{env.prefix}/edited.txt") == b"e1 edited here, not uploaded yet"
    r = syncd("--config", str(env.config), "resync")  # no ping-pong: the replaced file is not sent back
    assert r.out.strip().splitlines()[-1].startswith("uploaded 0, restored 0")


@both
def test_shared_resync_deletes_locally_what_was_deleted_remotely(store, make_env, syncd):
    env = shared_env(store, make_env)
    write(env.root, {"a.txt": b"a", "b.txt": b"b", "c.txt": b"c"})
    assert syncd("--config", str(env.config), "resync").code == 0
    delete_object(store, f"{env.prefix}/b.txt")
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert sorted(tree(env.root)) == ["a.txt", "c.txt"]
    assert rows(env)["b.txt"] == ("deleted", None)


@both
def test_shared_emptied_bucket_deletes_nothing_locally(store, make_env, syncd):
    env = shared_env(store, make_env)
    files = {f"f{i}.txt": b"x" * i for i in range(6)}
    write(env.root, files)
    assert syncd("--config", str(env.config), "resync").code == 0
    for k in store.object_keys():
        delete_object(store, k)
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert tree(env.root) == files
    # the hosts fill the wiped bucket again
    assert sorted(store.object_keys()) == sorted(f"{env.prefix}/{rel}" for rel in files)


@both
def test_shared_more_remote_deletions_than_max_deletes_pause_local_deletion(store, make_env, syncd):
    env = shared_env(store, make_env, max_deletes=2)
    files = {f"f{i}.txt": b"x" * (i + 1) for i in range(6)}
    write(env.root, files)
    assert syncd("--config", str(env.config), "resync").code == 0
    for i in range(3):
        delete_object(store, f"{env.prefix}/f{i}.txt")
    r = syncd("--config", str(env.config), "resync")
    assert tree(env.root) == files  # nothing deleted locally
    ledger = Ledger(env.ledger)
    try:
        assert "3 local deletions" in (ledger.get_meta("deletes_paused") or "")
    finally:
        ledger.close()
    assert syncd("--config", str(env.config), "retry", "--deletes").code == 0
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert sorted(tree(env.root)) == ["f3.txt", "f4.txt", "f5.txt"]


def test_apply_remote_change_is_one_listing_decision(tmp_path, make_env, request):
    """The entry point of the event consumer: a put restores, its own etag is a no-op, a
    deletion of an unchanged file queues a local deletion."""
    from syncd.changes import apply_remote_change, watch_for_key
    from syncd.keys import UnsafeKey
    from tests.conftest import Store

    root = tmp_path / "remote"
    env = make_env(Store(kind="file", url=f"file://{root}", root=root),
                   watch={"mode": "shared", "on_delete": "mirror"})
    cfg = load(env.config)
    w = cfg.watches[0]
    w.path.mkdir(parents=True)
    ledger = Ledger(env.ledger)
    try:
        ledger.ensure_watch(w.prefix, str(w.path))
        info = ObjectInfo(key="uploads/n.txt", size=3, etag="e1", mtime_ns=1)
        assert apply_remote_change(ledger, cfg, w, "n.txt", info, seen_at=0) == "restore"
        assert ledger.get("uploads", "n.txt")["op"] == "get"
        (w.path / "n.txt").write_bytes(b"abc")
        st = os.stat(w.path / "n.txt")
        ledger.update(ledger.get("uploads", "n.txt")["id"], state="synced", op=None, remote_etag="e1",
                      size=3, mtime_ns=st.st_mtime_ns, updated_at=0)
        assert apply_remote_change(ledger, cfg, w, "n.txt", info, seen_at=1) is None
        assert apply_remote_change(ledger, cfg, w, "n.txt", None, seen_at=1) == "unlink"
        assert apply_remote_change(ledger, cfg, w, ".syncd/tombstones/n.txt", info, seen_at=1) is None
        assert watch_for_key(cfg, "uploads/d/n.txt") == (w, "d/n.txt")
        assert watch_for_key(cfg, "elsewhere/n.txt") is None
        with pytest.raises(UnsafeKey):
            watch_for_key(cfg, "uploads/../n.txt")
    finally:
        ledger.close()


def test_file_remote_lists_in_s3_key_order(tmp_path):
    remote = LocalRemote(tmp_path)
    for key in ["p/a-b", "p/a/x", "p/a.txt", "p/a0", "p/b", "p/é", "p/Z"]:
        f = tmp_path.joinpath(*key.split("/"))
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"1")
    keys = [o.key for o in remote.list("p/")]
    assert keys == sorted(keys, key=lambda k: k.encode())
    assert len(keys) == 7


def test_shared_replace_keeps_a_local_write_made_during_the_download(tmp_path, make_env, syncd, monkeypatch):
    from tests.conftest import Store

    root = tmp_path / "remote"
    store = Store(kind="file", url=f"file://{root}", root=root)
    env = shared_env(store, make_env)
    write(env.root, {"doc.txt": b"v1"})
    assert syncd("--config", str(env.config), "resync").code == 0
    store.put_raw("uploads/doc.txt", b"v2 from another host")
    real_get = LocalRemote.get

    def get_while_the_app_writes(self, key, dest):
        fetched = real_get(self, key, dest)
        (env.root / "doc.txt").write_bytes(b"v3 written here meanwhile")
        return fetched

    monkeypatch.setattr(LocalRemote, "get", get_while_the_app_writes)
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert (env.root / "doc.txt").read_bytes() == b"v3 written here meanwhile"
    assert store.read("uploads/doc.txt") == b"v3 written here meanwhile"


def test_run_reports_a_failing_listing_and_retries_it_without_exiting(tmp_path, make_env, caplog):
    """A listing denied after READY is logged (with its cause, once) and retried with backoff;
    the daemon keeps running and restores the object once the listing works again."""
    import logging
    import threading

    from syncd.daemon import Daemon
    from syncd.remote.base import DENIED, RemoteError
    from tests.conftest import Store, wait_for

    root = tmp_path / "remote"
    env = make_env(Store(kind="file", url=f"file://{root}", root=root),
                   syncd={"remote_rescan_interval": 0.2})
    write(env.root, {"a.txt": b"a"})
    denied = {"on": False, "calls": 0}
    real_list = LocalRemote.list

    def listing(self, prefix):
        if denied["on"]:
            denied["calls"] += 1
            raise RemoteError(DENIED, "list denied", code="AccessDenied", action="s3:ListBucket")
        return real_list(self, prefix)

    import pytest as _pytest

    mp = _pytest.MonkeyPatch()
    mp.setattr(LocalRemote, "list", listing)
    stop = threading.Event()
    d = Daemon(load(env.config), stop=stop)
    t = threading.Thread(target=d.run, name="test-daemon")
    caplog.set_level(logging.INFO)
    t.start()
    try:
        wait_for(lambda: d.phase == "running", timeout=30, what="ready")
        denied["on"] = True
        wait_for(lambda: denied["calls"] >= 3, timeout=30, what="listings retried")
        assert t.is_alive()
        failures = [r for r in caplog.records if "remote listing failed" in r.getMessage()]
        assert len(failures) == 1 and "AccessDenied" in failures[0].getMessage()
        write(root / "uploads", {"later.txt": b"later"})
        denied["on"] = False
        wait_for(lambda: (env.root / "later.txt").exists(), timeout=30, what="restored after the failure")
    finally:
        stop.set()
        t.join(20)
        mp.undo()


def test_a_rescan_leaves_a_queued_remote_change_to_an_unchanged_file_alone(tmp_path, make_env, syncd):
    """A periodic rescan (or a watcher event) between a listing and its worker must not turn a
    queued replace or local deletion of an unchanged file into an upload of the old copy."""
    from syncd.scanner import Scanner
    from tests.conftest import Store

    root = tmp_path / "remote"
    env = shared_env(Store(kind="file", url=f"file://{root}", root=root), make_env)
    write(env.root, {"r.txt": b"r", "u.txt": b"u", "edited.txt": b"e"})
    assert syncd("--config", str(env.config), "resync").code == 0
    cfg = load(env.config)
    ledger = Ledger(env.ledger)
    try:
        ids = {r["path"]: r["id"] for r in ledger.query("SELECT id, path FROM files")}
        ledger.update(ids["r.txt"], state="pending", op="get", overwrite=1)
        ledger.update(ids["u.txt"], state="deleting", op="unlink")
        ledger.update(ids["edited.txt"], state="pending", op="get", overwrite=1)
        (env.root / "edited.txt").write_bytes(b"edited here")
        Scanner(ledger, cfg.watches[0], cfg.remote.prefix, settle=0, missing="delete").run()
        got = {r["path"]: (r["state"], r["op"]) for r in ledger.query("SELECT path, state, op FROM files")}
    finally:
        ledger.close()
    assert got == {"r.txt": ("pending", "get"), "u.txt": ("deleting", "unlink"), "edited.txt": ("pending", "put")}


@pytest.mark.parametrize("store", ["file"], indirect=True)
def test_resync_restores_while_its_listing_goes_on(store, make_env, syncd, monkeypatch):
    """Restores start on the first rows a listing queues, not after its last page: where S3 is
    tens of milliseconds away a listing of a large prefix takes seconds."""
    import time

    env = make_env(store)
    n = 1200  # more than two batches of the listing (reconcile.BATCH)
    for i in range(n):
        store.put_raw(f"{env.prefix}/d/f{i:04d}.txt", b"x")
    real_list = LocalRemote.list
    restored_during = []

    def listing(self, prefix, **kw):
        for i, obj in enumerate(real_list(self, prefix, **kw)):
            if i == n - 1 and ".syncd" not in prefix:  # the last object: wait for a restore
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and not any((env.root / "d").glob("f*.txt")):
                    time.sleep(0.01)
                restored_during.append(sum(1 for _ in (env.root / "d").glob("f*.txt")))
            yield obj

    monkeypatch.setattr(LocalRemote, "list", listing)
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert f"restored {n}" in r.out
    assert restored_during and restored_during[0] > 0, "nothing was restored before the listing ended"
    assert sum(1 for _ in (env.root / "d").glob("f*.txt")) == n
