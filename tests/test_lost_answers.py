"""A lost answer is not a failed upload (SPEC §4.5, PITFALLS §10).

A PUT (or a rename's server-side copy) reaches the bucket, then the connection closes before its
answer reaches syncd; the app deletes the file before the retry. The object is there all the
same: the deletion must reach it (`mirror`: deleted; `keep`: a tombstone), or the next listing,
another host or a host that lost its ledger brings the deleted file back.

The engine is driven in-process, step by step (what the watcher records is a `Scanner` pass, what
a worker does is `Transfers.handle` of a claimed row); the answer is lost by a botocore event
hook on syncd's own client, after the store applied the request.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import botocore.exceptions
import pytest

from tests.test_resync import tree

UPLOAD_OPS = ("put", "delete", "trash", "tomb")
in_process = pytest.mark.parametrize("store", ["moto"], indirect=True)


def write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _engine(env):
    from syncd.config import load_config
    from syncd.engine import Engine
    from syncd.ledger import Ledger
    from syncd.remote import open_remote

    cfg = load_config(env.config)
    ledger = Ledger(cfg.ledger)
    return cfg, ledger, Engine(cfg, ledger, open_remote(cfg), oneshot=False)


def lose_answer(remote, operation: str, key: str, meanwhile: Callable[[], None] | None = None) -> list[str]:
    """The next `operation` (PutObject, CopyObject) on `key` is applied by the store, then its
    answer is lost: botocore raises ConnectionClosedError as a reset before the response would.
    `meanwhile` runs between the two (what the watcher records while the request is in flight).
    Returns the keys whose answer was lost (so a test can check the fault happened)."""
    lost: list[str] = []

    def mark(params, context, **_):
        if params.get("Key") == key and not lost:
            context["lose_answer"] = True

    def drop(context, **_):
        if context.pop("lose_answer", False):
            lost.append(key)
            if meanwhile is not None:
                meanwhile()
            raise botocore.exceptions.ConnectionClosedError(endpoint_url=f"s3://{key}")

    events = remote.client.meta.events
    events.register(f"provide-client-params.s3.{operation}", mark)
    events.register(f"after-call.s3.{operation}", drop)
    return lost


def watcher_pass(cfg, ledger) -> None:
    """What the running daemon's watcher (or rescan) records: changes and deletions."""
    from syncd.scanner import Scanner

    Scanner(ledger, cfg.watches[0], cfg.remote.prefix, settle=0, missing="delete").run()


def work(ledger, transfers, ops=("put",), *, rounds: int = 1) -> None:
    """Workers claim and handle whatever of `ops` is queued, due or not (no waiting for backoff)."""
    for _ in range(rounds):
        rows = ledger.claim(ops, time.time() + 3600)
        if not rows:
            return
        for row in rows:
            transfers.handle(row)


def drain(ledger, transfers) -> None:
    work(ledger, transfers, UPLOAD_OPS, rounds=100)
    assert ledger.outstanding(UPLOAD_OPS) == 0, ledger.query("SELECT path, state, op, last_error FROM files")


def lost_upload(store, env, cfg, ledger, engine, rel: str, **lose) -> str:
    """The new file `rel` is uploaded; the PUT lands, its answer is lost. Returns its key."""
    key = f"{env.prefix}/{rel}"
    lost = lose_answer(engine.remote, "PutObject", key, **lose)
    watcher_pass(cfg, ledger)
    work(ledger, engine.transfers)
    assert lost == [key], "the fault was not injected"
    assert key in store.object_keys()  # the store has it; syncd only heard of a failure
    assert ledger.get("uploads", rel)["state"] == "pending"
    return key


@in_process
@pytest.mark.parametrize("order", ["deletion_seen_first", "retry_first"])
def test_a_file_deleted_after_a_lost_put_answer_is_deleted_remotely_under_mirror(store, make_env, syncd, order):
    env = make_env(store, watch={"on_delete": "mirror"})
    write(env.root, {"b.txt": b"kept"})
    assert syncd("--config", str(env.config), "resync").code == 0
    write(env.root, {"a.txt": b"landed, but syncd never heard so"})
    cfg, ledger, engine = _engine(env)
    try:
        key = lost_upload(store, env, cfg, ledger, engine, "a.txt")
        (env.root / "a.txt").unlink()
        if order == "retry_first":
            work(ledger, engine.transfers)  # the retry finds the file gone before the watcher says so
        watcher_pass(cfg, ledger)
        drain(ledger, engine.transfers)
        assert key not in store.object_keys()
        assert ledger.get("uploads", "a.txt")["state"] == "deleted"
    finally:
        engine.remote.close()
        ledger.close()
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert tree(env.root) == {"b.txt": b"kept"}
    assert store.object_keys() == [f"{env.prefix}/b.txt"]


@in_process
@pytest.mark.parametrize("recorded", ["during_the_upload", "after_the_failure"])
def test_a_deletion_after_a_lost_answer_stands_when_the_file_changed_during_that_upload(
        store, make_env, syncd, recorded):
    """The app writes the file again while the PUT is in flight. The watcher records the change
    during the upload (the row's gen changes, so the worker's failure is not applied), or reads
    the row during the upload and records the change after the failure was: either way the
    'maybe there' fact of the lost answer must stay."""
    from syncd.scanner import FILE, Entry, Scanner

    env = make_env(store, watch={"on_delete": "mirror"})
    write(env.root, {"a.txt": b"first version"})
    cfg, ledger, engine = _engine(env)
    seen: list = []

    def changed_meanwhile() -> None:
        (env.root / "a.txt").write_bytes(b"second version, longer")
        if recorded == "during_the_upload":
            watcher_pass(cfg, ledger)
        else:
            seen.append(ledger.get("uploads", "a.txt"))  # the watcher's read of the row

    try:
        key = lost_upload(store, env, cfg, ledger, engine, "a.txt", meanwhile=changed_meanwhile)
        if seen:  # the watcher's decision on the row it read, recorded now
            st = (env.root / "a.txt").stat()
            sc = Scanner(ledger, cfg.watches[0], cfg.remote.prefix, settle=0, missing="delete")
            sc.on_seen(seen[0], Entry("a.txt", FILE, st.st_size, st.st_mtime_ns))
            sc.flush()
        (env.root / "a.txt").unlink()
        watcher_pass(cfg, ledger)
        drain(ledger, engine.transfers)
        assert key not in store.object_keys()
    finally:
        engine.remote.close()
        ledger.close()
    assert syncd("--config", str(env.config), "resync").code == 0
    assert tree(env.root) == {}


@in_process
def test_a_file_deleted_after_a_lost_put_answer_gets_a_tombstone_under_keep(store, make_env, syncd):
    env = make_env(store, watch={"on_delete": "keep"})
    write(env.root, {"b.txt": b"kept"})
    assert syncd("--config", str(env.config), "resync").code == 0
    write(env.root, {"a.txt": b"landed, but syncd never heard so"})
    cfg, ledger, engine = _engine(env)
    try:
        key = lost_upload(store, env, cfg, ledger, engine, "a.txt")
        (env.root / "a.txt").unlink()
        watcher_pass(cfg, ledger)
        drain(ledger, engine.transfers)
    finally:
        engine.remote.close()
        ledger.close()
    keys = store.object_keys()
    assert f"{env.prefix}/.syncd/tombstones/a.txt" in keys
    assert key in keys  # keep: the object stays
    assert syncd("--config", str(env.config), "resync").code == 0
    assert tree(env.root) == {"b.txt": b"kept"}
    # the host loses its disk: a new empty ledger and an empty upload dir
    (env.root / "b.txt").unlink()
    for suffix in ("", "-wal", "-shm"):
        Path(str(env.ledger) + suffix).unlink(missing_ok=True)
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert tree(env.root) == {"b.txt": b"kept"}


@in_process
def test_the_retry_after_a_lost_answer_does_not_take_a_cut_off_body_for_the_file(store, make_env):
    """The retry asks first (HEAD). A store that kept the body of a PUT cut off mid-way keeps its
    headers too: the whole file's `syncd-sha256` on a shorter body. That is not the file."""
    import hashlib

    env = make_env(store)
    data = os.urandom(50_000)
    write(env.root, {"a.bin": data})
    cfg, ledger, engine = _engine(env)
    try:
        key = lost_upload(store, env, cfg, ledger, engine, "a.bin")
        store.client.put_object(Bucket=store.bucket, Key=key, Body=data[:20_000],
                                Metadata={"syncd-sha256": hashlib.sha256(data).hexdigest()})
        drain(ledger, engine.transfers)
        assert ledger.get("uploads", "a.bin")["state"] == "synced"
    finally:
        engine.remote.close()
        ledger.close()
    assert store.read(key) == data


@in_process
@pytest.mark.parametrize("on_delete", ["mirror", "trash", "keep"])
def test_a_deletion_after_an_upload_that_never_landed_is_done_without_a_failure(store, make_env, on_delete):
    """The connection closes before the PUT reaches the store: 'maybe there' all the same (syncd
    cannot tell); the deletion of a key that is not there is a success, not a failure."""
    env = make_env(store, watch={"on_delete": on_delete})
    write(env.root, {"a.txt": b"never landed"})
    cfg, ledger, engine = _engine(env)
    sent: list[str] = []

    def cut(request, **_):
        sent.append(request.url)
        raise botocore.exceptions.ConnectionClosedError(endpoint_url=request.url)

    try:
        engine.remote.client.meta.events.register_first("before-send.s3.PutObject", cut)
        watcher_pass(cfg, ledger)
        work(ledger, engine.transfers)
        engine.remote.client.meta.events.unregister("before-send.s3.PutObject", cut)
        assert sent and store.object_keys() == []
        (env.root / "a.txt").unlink()
        watcher_pass(cfg, ledger)
        assert ledger.get("uploads", "a.txt")["state"] == "deleting"
        failed = engine.stats.failed
        drain(ledger, engine.transfers)
        assert ledger.get("uploads", "a.txt")["state"] == "deleted"
        assert engine.stats.failed == failed
    finally:
        engine.remote.close()
        ledger.close()
    tomb = [f"{env.prefix}/.syncd/tombstones/a.txt"] if on_delete == "keep" else []
    assert store.object_keys() == tomb


@in_process
@pytest.mark.parametrize("then", ["deleted", "renamed"])
def test_a_renames_copy_whose_answer_was_lost_is_deleted_with_the_file(store, make_env, syncd, then):
    """old.txt -> new.txt is a server-side copy; the copy lands, its answer is lost; then the app
    deletes new.txt, or renames it again to newer.txt."""
    env = make_env(store, watch={"on_delete": "mirror"})
    write(env.root, {"old.txt": b"renamed content"})
    assert syncd("--config", str(env.config), "resync").code == 0
    os.rename(env.root / "old.txt", env.root / "new.txt")
    cfg, ledger, engine = _engine(env)
    try:
        new = f"{env.prefix}/new.txt"
        lost = lose_answer(engine.remote, "CopyObject", new)
        watcher_pass(cfg, ledger)
        work(ledger, engine.transfers)  # the new path's upload: a copy from old.txt's key
        assert lost == [new], "the fault was not injected"
        assert new in store.object_keys()
        if then == "deleted":
            (env.root / "new.txt").unlink()
        else:
            os.rename(env.root / "new.txt", env.root / "newer.txt")
        watcher_pass(cfg, ledger)
        drain(ledger, engine.transfers)
    finally:
        engine.remote.close()
        ledger.close()
    expected = {} if then == "deleted" else {"newer.txt": b"renamed content"}
    assert store.object_keys() == [f"{env.prefix}/{rel}" for rel in expected]
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert tree(env.root) == expected


@pytest.mark.parametrize("store", ["moto_server"], indirect=True)
def test_a_file_deleted_after_a_lost_multipart_completion_is_deleted_remotely(store, make_env, syncd, monkeypatch):
    """Every answer to CompleteMultipartUpload is lost (a reset after the server assembled the
    object; the part client sends it again, PART_ATTEMPTS times): the object is there."""
    import botocore.endpoint

    real_send = botocore.endpoint.Endpoint._send
    lost: list[str] = []

    def send(self, request):
        response = real_send(self, request)
        if request.method == "POST" and "uploadId=" in request.url:
            lost.append(request.url)
            raise botocore.exceptions.ConnectionClosedError(endpoint_url=request.url)
        return response

    env = make_env(store, watch={"on_delete": "mirror"},
                   remote={"multipart_threshold_mb": 5, "multipart_chunk_mb": 5})
    write(env.root, {"big.bin": os.urandom(6 * 1024 * 1024)})
    cfg, ledger, engine = _engine(env)
    key = f"{env.prefix}/big.bin"
    try:
        monkeypatch.setattr(botocore.endpoint.Endpoint, "_send", send)
        watcher_pass(cfg, ledger)
        work(ledger, engine.transfers)
        monkeypatch.undo()
        assert lost, "the fault was not injected"
        assert key in store.object_keys()
        assert ledger.get("uploads", "big.bin")["state"] == "pending"
        (env.root / "big.bin").unlink()
        watcher_pass(cfg, ledger)
        drain(ledger, engine.transfers)
        assert key not in store.object_keys()
    finally:
        engine.remote.close()
        ledger.close()
    assert syncd("--config", str(env.config), "resync").code == 0
    assert tree(env.root) == {}
