"""Shared watches with `events_queue` (issue 12, SPEC §2, §4.12): the bucket's notifications
reach every host through SNS -> one SQS queue per host, against moto's server (which serves S3,
SNS and SQS and sends S3's notifications). The listing runs only at start
(`remote_rescan_interval = 0`), so what reaches the other host after READY came by the queue."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from syncd.guard import PAUSED
from tests.conftest import free_port, sns_fanout, wait_for, write_config
from tests.daemon_util import DaemonProc, bucket_objects, live_tree, write_file


def fanout(endpoint: str, hosts: int = 2) -> tuple[str, list[str], Any]:
    _s3, sqs, bucket, queues = sns_fanout(endpoint, hosts)
    return bucket, queues, sqs


class Host:
    def __init__(self, tmp: Path, name: str, endpoint: str, bucket: str, queue: str, rescan: float = 0) -> None:
        self.tmp = tmp / name
        self.bucket, self.endpoint = bucket, endpoint
        self.root = self.tmp / "uploads"
        self.root.mkdir(parents=True)
        self.ledger = self.tmp / "ledger.db"
        self.port = free_port()
        self.config = write_config(
            self.tmp / "syncd.toml",
            remote={"url": f"s3://{bucket}/backups", "endpoint_url": endpoint, "region": "us-east-1",
                    "events_queue": queue},
            watches=[{"path": str(self.root), "prefix": "uploads", "mode": "shared", "on_delete": "mirror"}],
            syncd={"ledger": str(self.ledger), "settle_seconds": 0.3, "workers": 4, "rescan_interval": 0,
                   "health_listen": f"127.0.0.1:{self.port}", "remote_rescan_interval": rescan})
        self.proc = DaemonProc(self.config, self.ledger, self.tmp / "daemon.log")

    def files(self) -> dict[str, bytes]:
        return live_tree(self.root)

    def healthz(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()


@pytest.fixture
def two_hosts(tmp_path: Path, moto_server: str):
    bucket, queues, sqs = fanout(moto_server)
    hosts = [Host(tmp_path, n, moto_server, bucket, q) for n, q in zip("ab", queues, strict=True)]
    for h in hosts:
        h.proc.start()
    try:
        for h in hosts:
            h.proc.wait_ready()
        yield hosts, sqs, queues
    finally:
        for h in hosts:
            if h.proc.alive():
                h.proc.stop()


def test_a_file_written_on_one_host_reaches_the_other_through_the_queue(two_hosts) -> None:
    (a, b), sqs, queues = two_hosts
    files = {f"dir{i % 3}/photo {i}.jpg": f"photo {i} from a".encode() * (i + 1) for i in range(12)}
    for rel, data in files.items():
        write_file(a.root / rel, data)
    wait_for(lambda: b.files() == files, 60, 0.1, "a's files on b (through the events queue)")
    # a change on b travels back; a deletion on a (mirror) deletes b's unchanged copy
    write_file(b.root / "dir0/photo 0.jpg", b"edited on b")
    files["dir0/photo 0.jpg"] = b"edited on b"
    (a.root / "dir1/photo 1.jpg").unlink()
    del files["dir1/photo 1.jpg"]
    wait_for(lambda: a.files() == files and b.files() == files, 60, 0.1, "both hosts converged")
    # every message was applied and deleted (own uploads included), none left to come back
    for q in queues:
        wait_for(lambda q=q: sqs.get_queue_attributes(
            QueueUrl=q, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        )["Attributes"] == {"ApproximateNumberOfMessages": "0", "ApproximateNumberOfMessagesNotVisible": "0"},
                 30, what="the queues to be drained")
    assert a.healthz() == (200, "ok\n") and b.healthz() == (200, "ok\n")


def test_a_missing_queue_is_reported_and_the_listing_still_converges(tmp_path: Path, moto_server: str) -> None:
    bucket, queues, _sqs = fanout(moto_server, hosts=1)
    a = Host(tmp_path, "a", moto_server, bucket, queues[0])
    b = Host(tmp_path, "b", moto_server, bucket, f"{moto_server}/123456789012/no-such-queue", rescan=1)
    for h in (a, b):
        h.proc.start()
    try:
        for h in (a, b):
            h.proc.wait_ready()
        wait_for(lambda: "events queue failing" in b.healthz()[1], 30, what="the queue failure in /healthz")
        assert b.healthz()[0] == 200
        write_file(a.root / "x.txt", b"through the listing")
        wait_for(lambda: b.files() == {"x.txt": b"through the listing"}, 60, 0.1, "x.txt on b by listing")
        assert "events queue failing" in b.proc.log()
    finally:
        for h in (a, b):
            if h.proc.alive():
                h.proc.stop()


def test_a_bucket_emptied_by_another_tool_pauses_the_hosts_until_a_listing_uploads_it_again(two_hosts) -> None:
    """`aws s3 rm --recursive` (or a wrong bucket): the deletion events would remove every file
    of the watch on every host; they pause instead (/healthz 503), nothing is deleted, and a
    listing that finds the prefix empty has the files uploaded again (SPEC §4.12)."""
    import boto3

    (a, b), _sqs, _queues = two_hosts
    s3, bucket = boto3.client("s3", endpoint_url=a.endpoint, region_name="us-east-1"), a.bucket
    files = {f"dir{i % 4}/photo {i}.jpg": f"photo {i}".encode() * (i + 1) for i in range(30)}
    for rel, data in files.items():
        write_file(a.root / rel, data)
    wait_for(lambda: b.files() == files, 90, 0.2, "a's files on b")
    wait_for(lambda: all(h.proc.states() == {"synced": len(files)} for h in (a, b)), 60, 0.2, "both hosts synced")
    keys = [{"Key": f"backups/uploads/{rel}"} for rel in files]
    s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    for h in (a, b):
        wait_for(lambda h=h: h.healthz()[0] == 503 and "paused" in h.healthz()[1], 60, 0.2,
                 f"host {h.tmp.name} paused")
        # every deletion event is recorded and paused (none will be due), and no file is deleted
        wait_for(lambda h=h: h.proc.query("SELECT count(*) FROM files WHERE state='deleting' AND op='unlink' "
                                          "AND due_at>=?", (PAUSED,)) == [(len(files),)], 60, 0.2,
                 "every deletion paused")
        assert h.files() == files
    # a listing (host a restarts) finds the prefix empty: nothing is deleted, a uploads its files
    # again, and their events lift b's pause
    a.proc.stop()
    a.proc.start()
    a.proc.wait_ready()
    wait_for(lambda: len(bucket_objects(s3, bucket, "backups/uploads/")) == len(files), 90, 0.2,
             "the files uploaded again")
    for h in (a, b):
        wait_for(lambda h=h: h.healthz() == (200, "ok\n"), 60, 0.2, f"host {h.tmp.name} healthy")
        assert h.files() == files
