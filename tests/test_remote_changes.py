"""Remote changes one at a time, as the events consumer applies them (SPEC §4.12, `syncd.changes`,
`syncd.guard`): driven through the consumer's own handler with a queue the test fills, against
moto's S3 server, one step at a time (no daemon, no timing).

- an event that meets its path busy (a worker holds the row) is never dropped: the path is
  compared with the remote once it is free, and the last version wins;
- remote deletion events that would remove most of a watch's files delete nothing locally: they
  pause until a listing judges them (an empty one: nothing deleted, uploaded again; one that
  still holds other objects: confirmed) or `syncd retry --deletes` releases them.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest

from syncd import events
from syncd.config import Config
from syncd.config import load_config as load
from syncd.engine import LOCAL_DELETE_OPS, UPLOAD_OPS, Engine
from syncd.files import FileServer
from syncd.ledger import Ledger
from syncd.remote import open_remote
from tests.conftest import wait_for
from tests.test_remote_truth import write
from tests.test_resync import tree

QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/syncd-host-b"


class FakeQueue:
    """The host's SQS queue: S3 notifications the test sends, as `receive_message` returns them."""

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self.waiting: list[dict[str, Any]] = []
        self.deleted = 0
        self.sent = 0

    def notify(self, key: str, data: bytes | None) -> None:
        """The event of a PUT of `data` at `key` (None: a DeleteObject)."""
        obj: dict[str, Any] = {"key": quote_plus(key), "size": len(data or b"")}
        if data is not None:
            obj["eTag"] = hashlib.md5(data, usedforsecurity=False).hexdigest()  # a single PUT's ETag
        body = {"Records": [{"eventName": "ObjectCreated:Put" if data is not None else "ObjectRemoved:Delete",
                             "eventTime": datetime.now(UTC).isoformat(timespec="milliseconds"),
                             "s3": {"bucket": {"name": self.bucket}, "object": obj}}]}
        self.sent += 1
        self.waiting.append({"MessageId": str(self.sent), "ReceiptHandle": str(self.sent), "Body": json.dumps(body)})

    def receive_message(self, **_: Any) -> dict[str, Any]:
        batch, self.waiting = self.waiting[:10], self.waiting[10:]
        return {"Messages": batch}

    def delete_message_batch(self, QueueUrl: str, Entries: list[dict[str, str]]) -> dict[str, Any]:  # noqa: N803
        self.deleted += len(Entries)
        return {}


@dataclass
class HostB:
    """One host of a shared watch whose events the test hands over one receive at a time."""

    cfg: Config
    ledger: Ledger
    engine: Engine
    queue: FakeQueue
    consumer: events.EventConsumer
    key_base: str
    config: Path

    def receive(self) -> None:
        """One receive of the consumer (and whatever it does after it)."""
        while True:
            self.consumer.poll_once(wait=0)
            if not self.queue.waiting:
                return

    def put(self, rel: str, data: bytes) -> None:
        """Another host uploads `data` (as syncd does: with its metadata)."""
        src = self.cfg.watches[0].path.parent / "other-host.tmp"
        src.write_bytes(data)
        self.engine.remote.put(f"{self.key_base}/{rel}", src, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                               mtime_ns=time.time_ns())


@pytest.fixture
def host(store, make_env, syncd, monkeypatch) -> Iterator[HostB]:
    env = make_env(store, watch={"mode": "shared", "on_delete": "mirror"},
                   remote={"events_queue": QUEUE, "region": "us-east-1"})
    env.root.mkdir(parents=True)
    cfg = load(env.config)
    queue = FakeQueue(cfg.remote.bucket)
    monkeypatch.setattr(events, "queue_client", lambda *_a, **_k: queue)
    ledger = Ledger(cfg.ledger)
    engine = Engine(cfg, ledger, open_remote(cfg), oneshot=False)
    engine.prepare()
    stop = threading.Event()
    stop.set()  # its thread ends at once: the test calls poll_once itself
    consumer = events.start(cfg, ledger, engine, stop)
    consumer.join(5)
    consumer.stop = threading.Event()
    try:
        yield HostB(cfg, ledger, engine, queue, consumer, env.prefix, env.config)
    finally:
        ledger.close()


def synced(h: HostB, files: dict[str, bytes]) -> None:
    """`files` written here and uploaded: synced rows that know their objects."""
    write(h.cfg.watches[0].path, files)
    h.engine.plan(restore=True)
    h.engine.drain(UPLOAD_OPS)
    assert {r["path"]: r["state"] for r in h.ledger.query("SELECT path, state FROM files")} == \
        dict.fromkeys(files, "synced")


def wiped(h: HostB, files: dict[str, bytes]) -> Any:
    """`files` synced here, then the bucket emptied by another tool and its deletion events
    received: the watch's local deletions paused. Returns the S3 client."""
    synced(h, files)
    client = h.engine.remote.client
    client.delete_objects(Bucket=h.cfg.remote.bucket, Delete={"Objects": [
        {"Key": f"{h.key_base}/{rel}"} for rel in files]})
    for rel in files:
        h.queue.notify(f"{h.key_base}/{rel}", None)
    h.receive()
    assert "paused" in (h.engine.guard.health() or "")
    return client


@pytest.mark.parametrize("store", ["moto_server", "moto_server+botocore"], indirect=True)
def test_an_event_that_meets_its_path_being_restored_is_applied_once_the_restore_ends(host: HostB) -> None:
    h = host
    root = h.cfg.watches[0].path
    synced(h, {"doc.txt": b"version 1"})
    h.put("doc.txt", b"version 2 (host a)")
    h.queue.notify(f"{h.key_base}/doc.txt", b"version 2 (host a)")
    h.receive()
    claimed = h.ledger.claim(("get",), now=time.time())  # a worker starts replacing doc.txt with version 2
    assert [r["path"] for r in claimed] == ["doc.txt"]
    # host a writes again; the event arrives while the worker still holds the path (its GET
    # started before that PUT: it brings version 2)
    h.queue.notify(f"{h.key_base}/doc.txt", b"version 3 (host a)")
    h.receive()
    assert h.queue.deleted == h.queue.sent  # recorded in the ledger: the message is done with
    h.engine.transfers.handle(claimed[0])
    assert (root / "doc.txt").read_bytes() == b"version 2 (host a)"
    h.put("doc.txt", b"version 3 (host a)")
    # the path is free: the next turn of the consumer applies what waited for it
    h.receive()
    h.engine.drain(("get",))
    assert (root / "doc.txt").read_bytes() == b"version 3 (host a)"
    assert h.ledger.get("uploads", "doc.txt")["state"] == "synced"


@pytest.mark.parametrize("store", ["moto_server"], indirect=True)
def test_deletion_events_that_would_empty_a_watch_pause_and_an_empty_listing_uploads_again(host: HostB) -> None:
    h = host
    files = {f"d{i % 3}/f{i:02d}.jpg": b"photo %d" % i for i in range(12)}
    client = wiped(h, files)  # the bucket is emptied by another tool (aws s3 rm --recursive)
    assert h.queue.deleted == h.queue.sent
    # however long the workers wait, no local deletion is due: they are paused
    h.engine.drain(LOCAL_DELETE_OPS)
    assert h.ledger.claim(("unlink",), now=time.time() + 3600) == []
    assert tree(h.cfg.watches[0].path) == files
    assert "paused" in (h.engine.guard.health() or "")
    # the next listing finds the prefix empty: nothing is deleted, every file is uploaded again
    h.engine.listing(h.cfg.watches[0])
    h.engine.drain(LOCAL_DELETE_OPS)
    h.engine.drain(UPLOAD_OPS)
    assert tree(h.cfg.watches[0].path) == files
    assert h.engine.guard.health() is None
    listed = client.list_objects_v2(Bucket=h.cfg.remote.bucket, Prefix=h.key_base + "/")
    assert sorted(o["Key"] for o in listed.get("Contents", ())) == sorted(f"{h.key_base}/{rel}" for rel in files)


@pytest.mark.parametrize("store", ["moto_server"], indirect=True)
def test_paused_deletion_events_are_confirmed_by_a_listing_that_still_holds_other_objects(host: HostB) -> None:
    h = host
    files = {f"f{i:02d}.jpg": b"photo %d" % i for i in range(12)}
    synced(h, files)
    gone = sorted(files)[:8]
    for rel in gone:
        h.engine.remote.delete(f"{h.key_base}/{rel}")
        h.queue.notify(f"{h.key_base}/{rel}", None)
    h.receive()
    h.engine.drain(LOCAL_DELETE_OPS)
    assert tree(h.cfg.watches[0].path) == files
    assert "paused" in (h.engine.guard.health() or "")
    h.engine.listing(h.cfg.watches[0])  # 4 objects left: the 8 deletions are confirmed
    h.engine.drain(LOCAL_DELETE_OPS)
    assert tree(h.cfg.watches[0].path) == {rel: data for rel, data in files.items() if rel not in gone}
    assert h.engine.guard.health() is None


@pytest.mark.parametrize("store", ["moto_server"], indirect=True)
def test_paused_deletion_events_are_released_by_retry_deletes(host: HostB, syncd) -> None:
    h = host
    files = {f"f{i:02d}.jpg": b"photo %d" % i for i in range(5)}
    synced(h, files)
    for rel in files:
        h.engine.remote.delete(f"{h.key_base}/{rel}")
        h.queue.notify(f"{h.key_base}/{rel}", None)
    h.receive()
    assert "paused" in (h.engine.guard.health() or "")
    r = syncd("--config", str(h.config), "retry", "--deletes")
    assert r.code == 0 and "released 5 local deletions" in r.out, r.out + r.err
    h.engine.drain(LOCAL_DELETE_OPS)  # the operator confirmed them: deleted here too
    assert tree(h.cfg.watches[0].path) == {}
    assert h.engine.guard.health() is None


@pytest.mark.parametrize("store", ["moto_server"], indirect=True)
def test_a_file_made_after_a_wipe_paused_the_watch_follows_its_deletion_and_an_empty_listing_does_not_bring_it_back(
        host: HostB, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bucket is wiped: the deletion events pause the watch. Host a then writes new.jpg (it
    comes here) and its app deletes it. That deletion paused with the wipe's, and the next
    listing, empty, uploaded every paused file again: new.jpg came back on every host
    (shared-events:915625956, 1029556479). A file synced here after the pause began is not among
    those the burst threatened: its deletion is applied (SPEC §4.12: a deleted file stays deleted)."""
    from syncd import changes

    monkeypatch.setattr(changes, "EVENT_GRACE", 0.0)  # the local deletion is due at once
    h = host
    root = h.cfg.watches[0].path
    files = {f"f{i:02d}.jpg": b"photo %d" % i for i in range(6)}
    client = wiped(h, files)
    h.put("new.jpg", b"made after the wipe")
    h.queue.notify(f"{h.key_base}/new.jpg", b"made after the wipe")
    h.receive()
    h.engine.drain(("get",))
    assert (root / "new.jpg").read_bytes() == b"made after the wipe"
    h.engine.remote.delete(f"{h.key_base}/new.jpg")  # host a's app deletes it
    h.queue.notify(f"{h.key_base}/new.jpg", None)
    h.receive()
    h.engine.drain(LOCAL_DELETE_OPS)
    assert tree(root) == files  # the wipe's deletions still wait; new.jpg's went ahead
    h.engine.listing(h.cfg.watches[0])  # empty: the wiped files are uploaded again, not new.jpg
    h.engine.drain(LOCAL_DELETE_OPS)
    h.engine.drain(UPLOAD_OPS)
    assert tree(root) == files
    listed = client.list_objects_v2(Bucket=h.cfg.remote.bucket, Prefix=h.key_base + "/")
    assert sorted(o["Key"] for o in listed.get("Contents", ())) == sorted(f"{h.key_base}/{rel}" for rel in files)


@pytest.mark.parametrize("store", ["moto_server"], indirect=True)
def test_a_second_wipe_pauses_the_files_synced_since_the_first_paused_the_watch(
        host: HostB, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files synced after a wipe paused the watch are judged among themselves: a second wipe
    that takes all of them pauses them too, the last events of its burst included (they were
    judged one by one against the few left: shared-events:760860721 lost f14.bin on both hosts)."""
    from syncd import changes

    monkeypatch.setattr(changes, "EVENT_GRACE", 0.0)
    h = host
    root = h.cfg.watches[0].path
    files = {f"f{i:02d}.jpg": b"photo %d" % i for i in range(6)}
    client = wiped(h, files)
    later = {f"new{i}.jpg": b"after the first wipe %d" % i for i in range(4)}
    for rel, data in later.items():
        h.put(rel, data)
        h.queue.notify(f"{h.key_base}/{rel}", data)
    h.receive()
    h.engine.drain(("get",))
    assert tree(root) == {**files, **later}
    client.delete_objects(Bucket=h.cfg.remote.bucket, Delete={"Objects": [
        {"Key": f"{h.key_base}/{rel}"} for rel in later]})
    for rel in later:
        h.queue.notify(f"{h.key_base}/{rel}", None)
    h.receive()
    h.engine.drain(LOCAL_DELETE_OPS)
    assert tree(root) == {**files, **later}  # nothing deleted: every deletion waits for a listing
    assert h.ledger.query("SELECT count(*) AS n FROM files WHERE state='deleting' AND op='unlink'")[0]["n"] == 10


@pytest.mark.parametrize("store", ["moto_server"], indirect=True)
@pytest.mark.parametrize("learns", ["event", "listing"])
def test_a_file_the_app_deletes_while_its_remote_deletion_is_paused_stays_deleted_when_the_object_comes_back(
        host: HostB, learns: str) -> None:
    """The bucket is wiped: the deletion events pause. The app here deletes one of the files, and
    host a's empty listing uploads its copies again (the same versions). The watcher took the
    app's deletion for the paused local deletion done by other hands and recorded nothing; the
    object's return (its event, or a listing) then cancelled that deletion: a synced row with no
    file, the object left on the other hosts, and the next start restored the file the app had
    deleted (shared-events:1794345085). The app's deletion is recorded as any other and reaches
    the remote (SPEC §4.5)."""
    from watchdog.events import FileDeletedEvent

    from syncd.watcher import Watcher

    h = host
    root = h.cfg.watches[0].path
    files = {f"f{i:02d}.jpg": b"photo %d" % i for i in range(6)}
    client = wiped(h, files)
    for rel, data in files.items():  # host a's listing found the bucket empty: uploaded again
        h.put(rel, data)
    (root / "f00.jpg").unlink()  # the app, before those uploads' events come here
    Watcher(h.cfg, h.ledger, request_rescan=lambda _r: None).apply([("uploads", FileDeletedEvent(str(root / "f00.jpg")))])
    if learns == "event":
        for rel, data in files.items():
            h.queue.notify(f"{h.key_base}/{rel}", data)
        h.receive()
    else:
        h.engine.listing(h.cfg.watches[0])
    h.engine.drain(UPLOAD_OPS)
    h.engine.drain(LOCAL_DELETE_OPS)
    kept = {rel: data for rel, data in files.items() if rel != "f00.jpg"}
    assert tree(root) == kept
    assert h.ledger.get("uploads", "f00.jpg")["state"] == "deleted"
    listed = client.list_objects_v2(Bucket=h.cfg.remote.bucket, Prefix=h.key_base + "/")
    assert sorted(o["Key"] for o in listed.get("Contents", ())) == sorted(f"{h.key_base}/{rel}" for rel in kept)


@pytest.mark.parametrize("store", ["moto_server"], indirect=True)
def test_a_deletion_event_between_a_restores_record_and_its_rename_is_applied_once_the_file_is_there(
        host: HostB, monkeypatch: pytest.MonkeyPatch) -> None:
    """The restore records the row synced just before the rename that makes the file appear: a
    deletion event seen in between found a synced row and no file, did nothing, and the file
    appeared after it (shared-events:616559094: a file the app deleted on one host, back on the
    other). The path is busy until the file is there; the event waits for it."""
    from syncd import restore

    h = host
    root = h.cfg.watches[0].path
    synced(h, {f"keep{i}.txt": b"kept %d" % i for i in range(4)})
    h.put("new.txt", b"written on host a")
    h.queue.notify(f"{h.key_base}/new.txt", b"written on host a")
    h.receive()
    claimed = h.ledger.claim(("get",), now=time.time())
    assert [r["path"] for r in claimed] == ["new.txt"]
    real_publish = _delete_on_host_a_before_the_rename(h, monkeypatch)
    h.engine.transfers.handle(claimed[0])
    monkeypatch.setattr(restore, "publish", real_publish)
    h.receive()  # the consumer's next turn: what waited for the path
    h.engine.drain(LOCAL_DELETE_OPS)
    assert not (root / "new.txt").exists()
    assert h.ledger.get("uploads", "new.txt")["state"] == "deleted"


@pytest.mark.parametrize("store", ["moto_server"], indirect=True)
@pytest.mark.parametrize("queued", [True, False], ids=["queued", "unknown-to-the-ledger"])
def test_a_deletion_event_between_an_on_demand_restores_record_and_its_rename_is_applied_once_the_file_is_there(
        host: HostB, monkeypatch: pytest.MonkeyPatch, queued: bool) -> None:
    """`/files/` restores a missing file as the workers do: recorded synced just before the
    rename. A deletion event seen in between found a synced row (not busy) and no file, did
    nothing, and the file appeared after it: deleted on the other host, back here for good. The
    request keeps the path busy until the file is there; the event waits for it. Both for a file
    queued for restore (the request leases it ahead of the queue) and for one the ledger does not
    know yet (its row is made by the record)."""
    from syncd import restore

    h = host
    root = h.cfg.watches[0].path
    synced(h, {f"keep{i}.txt": b"kept %d" % i for i in range(4)})
    h.put("new.txt", b"written on host a")
    if queued:  # its event came first: a queued restore (else the ledger has no row for it yet)
        h.queue.notify(f"{h.key_base}/new.txt", b"written on host a")
        h.receive()
        assert h.ledger.get("uploads", "new.txt")["op"] == "get"
    files = FileServer(h.cfg, h.ledger, h.engine.remote, h.engine.stats, restoring=h.engine.transfers.restoring)
    real_publish = _delete_on_host_a_before_the_rename(h, monkeypatch, after_the_record=True)
    opened, source = files.open("/files/uploads/new.txt")
    opened.file.close()
    assert source == "remote"
    monkeypatch.setattr(restore, "publish", real_publish)
    assert h.ledger.get("uploads", "new.txt")["lease_until"] is None  # the request let go of it
    h.receive()  # the consumer's next turn: what waited for the path
    h.engine.drain(LOCAL_DELETE_OPS)
    assert not (root / "new.txt").exists()
    assert h.ledger.get("uploads", "new.txt")["state"] == "deleted"


def _delete_on_host_a_before_the_rename(h: HostB, monkeypatch: pytest.MonkeyPatch, *,
                                        after_the_record: bool = False) -> Callable[..., None]:
    """Between a restore's record of new.txt and its rename, host a's app deletes the file
    (mirror: the object goes) and its event reaches this host; `after_the_record`: the event's
    time (milliseconds) is after the record, as it is in the race. Returns the real publish."""
    from syncd import changes, restore

    real_publish = restore.publish

    def publish_after_the_deletion(tmp: Any, final: Any, *, overwrite: bool) -> None:
        if after_the_record:
            recorded = h.ledger.get("uploads", "new.txt")["updated_at"]
            wait_for(lambda: int(time.time() * 1000) / 1000 > recorded, what="a millisecond after the record")
        h.engine.remote.delete(f"{h.key_base}/new.txt")
        h.queue.notify(f"{h.key_base}/new.txt", None)
        h.receive()
        real_publish(tmp, final, overwrite=overwrite)

    monkeypatch.setattr(restore, "publish", publish_after_the_deletion)
    monkeypatch.setattr(changes, "EVENT_GRACE", 0.0)  # the local deletion is due at once
    return real_publish
