"""`syncd run` and the remote as the truth (issue 12, SPEC §3, §4.5, §4.12): daemons as
subprocesses with real watchers, against moto's server over HTTP."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3

from tests.conftest import _new_bucket, free_port, wait_for, write_config
from tests.daemon_util import DaemonProc, bucket_objects, live_tree, write_file

PREFIX = "backups/uploads"


class Host:
    """One host: its watch dir, ledger and config; all hosts of a test share a bucket prefix."""

    def __init__(self, tmp: Path, name: str, endpoint: str, bucket: str, **opts) -> None:
        self.tmp = tmp / name
        self.tmp.mkdir(parents=True)
        self.root = self.tmp / "uploads"
        self.ledger = self.tmp / "ledger.db"
        self.port = free_port()
        syncd = {"ledger": str(self.ledger), "settle_seconds": 0.3, "workers": 4, "rescan_interval": 0,
                 "health_listen": f"127.0.0.1:{self.port}", "remote_rescan_interval": 1}
        syncd.update(opts.pop("syncd", {}))
        self.config = write_config(self.tmp / "syncd.toml",
                                   remote={"url": f"s3://{bucket}/backups", "endpoint_url": endpoint},
                                   watches=[{"path": str(self.root), "prefix": "uploads", **opts}], syncd=syncd)
        self.root.mkdir(parents=True, exist_ok=True)
        self.n = 0
        self.proc: DaemonProc | None = None

    def start(self) -> DaemonProc:
        self.n += 1
        self.proc = DaemonProc(self.config, self.ledger, self.tmp / f"daemon{self.n}.log").start()
        return self.proc

    def files(self) -> dict[str, bytes]:
        return live_tree(self.root)

    def healthz(self) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code


def bucket_files(client, bucket: str) -> dict[str, bytes]:
    out = {}
    for key in bucket_objects(client, bucket, PREFIX + "/"):
        rel = key[len(PREFIX) + 1:]
        if rel.startswith((".syncd/", ".trash/")):
            continue
        out[rel] = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return out


def wipe(client, bucket: str, keys: list[str]) -> None:
    """Delete keys in one request (a listing never sees half of them gone)."""
    client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys]})


def new_bucket(endpoint: str):
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return client, _new_bucket(client)


def test_running_daemon_restores_an_object_put_after_ready(tmp_path, moto_server):
    client, bucket = new_bucket(moto_server)
    h = Host(tmp_path, "a", moto_server, bucket)
    write_file(h.root / "first.txt", b"first")
    d = h.start()
    try:
        d.wait_ready()
        wait_for(lambda: d.states().get("synced") == 1, timeout=30, what="first upload")
        client.put_object(Bucket=bucket, Key=f"{PREFIX}/later/put-by-boto3.txt", Body=b"from elsewhere")
        wait_for(lambda: (h.root / "later/put-by-boto3.txt").exists(), timeout=30, what="restore while running")
        assert (h.root / "later/put-by-boto3.txt").read_bytes() == b"from elsewhere"
        wait_for(lambda: d.query("SELECT value FROM meta WHERE name='ready'") == [("1",)], timeout=5)

        def metrics() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{h.port}/metrics", timeout=5) as r:
                return r.read().decode()

        # counted once the file is at its name and its row let go: a moment after it appears
        wait_for(lambda: 'syncd_remote_changes_total{kind="restored"} 1.0' in metrics(), timeout=10,
                 what="the restore counted")
        assert "syncd_remote_listing_timestamp_seconds{watch=\"uploads\"}" in metrics()
    finally:
        assert d.stop() == 0, d.log()


def test_keep_lost_ledger_restart_restores_all_but_what_the_app_deleted(tmp_path, moto_server):
    client, bucket = new_bucket(moto_server)
    h = Host(tmp_path, "a", moto_server, bucket, on_delete="keep")
    files = {f"media/{i:02d}.jpg": os.urandom(500 + i) for i in range(16)}
    deleted = [f"media/{i:02d}.jpg" for i in range(0, 16, 2)]
    d = h.start()
    try:
        d.wait_ready()
        for rel, data in files.items():
            write_file(h.root / rel, data)
        wait_for(lambda: d.states().get("synced") == 16, timeout=60, what="uploads")
        for rel in deleted:
            (h.root / rel).unlink()
        wait_for(lambda: d.states().get("deleted") == 8, timeout=60, what="tombstones written")
        keys = bucket_objects(client, bucket, PREFIX + "/")
        assert all(f"{PREFIX}/.syncd/tombstones/{rel}" in keys for rel in deleted)
    finally:
        assert d.stop() == 0, d.log()
    # the container restarts: uploads dir and ledger are gone
    for p in sorted(h.tmp.rglob("*"), reverse=True):
        if p.name.startswith("daemon") or p.name == "syncd.toml":
            continue
        p.unlink() if p.is_file() else p.rmdir()
    d = h.start()
    try:
        d.wait_ready()
        assert h.files() == {k: v for k, v in files.items() if k not in deleted}
        write_file(h.root / deleted[0], b"written again")
        tomb = f"{PREFIX}/.syncd/tombstones/{deleted[0]}"
        wait_for(lambda: tomb not in bucket_objects(client, bucket, PREFIX + "/"), timeout=30,
                 what="tombstone lifted")
        assert client.get_object(Bucket=bucket, Key=f"{PREFIX}/{deleted[0]}")["Body"].read() == b"written again"
    finally:
        assert d.stop() == 0, d.log()


def converged(a: Host, b: Host, client, bucket: str) -> bool:
    fa, fb = a.files(), b.files()
    return fa == fb and fa == bucket_files(client, bucket)


@contextmanager
def two_shared_hosts(tmp_path: Path, moto_server: str) -> Iterator[tuple]:
    """(client, bucket, a, b): two hosts sharing one prefix (`shared`, `mirror`), READY; each
    host's last daemon must stop cleanly at the end."""
    client, bucket = new_bucket(moto_server)
    a = Host(tmp_path, "a", moto_server, bucket, mode="shared", on_delete="mirror")
    b = Host(tmp_path, "b", moto_server, bucket, mode="shared", on_delete="mirror")
    a.start(), b.start()
    try:
        for h in (a, b):
            assert h.proc is not None
            h.proc.wait_ready()
        yield client, bucket, a, b
    finally:
        for h in (a, b):
            assert h.proc is not None and h.proc.stop() == 0, h.proc and h.proc.log()


def test_two_shared_hosts_converge_byte_identical(tmp_path, moto_server):
    with two_shared_hosts(tmp_path, moto_server) as (client, bucket, a, b):
        # issue 12, acceptance 3: 200 files written on each host, 20 changed and 20 deleted on each
        for i in range(200):
            write_file(a.root / f"a/{i:03d}.bin", os.urandom(1000 + i))
            write_file(b.root / f"b/{i:03d}.bin", os.urandom(2000 + i))
        wait_for(lambda: len(a.files()) == 400 and len(b.files()) == 400, timeout=180, interval=0.5,
                 what="both hosts have all 400 files")
        # each host changes and deletes some of its own files and some of the other's
        for i in range(10):
            for side in ("a", "b"):
                write_file(a.root / f"{side}/{i:03d}.bin", b"changed on a " + os.urandom(50))
                write_file(b.root / f"{side}/{i + 10:03d}.bin", b"changed on b " + os.urandom(50))
                (a.root / f"{side}/{i + 20:03d}.bin").unlink()
                (b.root / f"{side}/{i + 30:03d}.bin").unlink()
        wait_for(lambda: converged(a, b, client, bucket), timeout=180, interval=0.5, what="convergence")
        files = a.files()
        assert len(files) == 360
        assert files["a/000.bin"].startswith(b"changed on a ") and files["b/000.bin"].startswith(b"changed on a ")
        assert files["a/010.bin"].startswith(b"changed on b ") and files["b/010.bin"].startswith(b"changed on b ")
        assert not [p for p in tmp_path.rglob(".syncd-restore-*")]


def test_shared_kill_9_during_convergence_then_restart_still_converges(tmp_path, moto_server):
    with two_shared_hosts(tmp_path, moto_server) as (client, bucket, a, b):
        for i in range(60):
            write_file(a.root / f"a/{i:02d}.bin", os.urandom(20_000 + i))
        # B is killed while it restores A's files
        wait_for(lambda: len(b.files()) > 0, timeout=60, interval=0.05,
                 what="convergence under way")
        b.proc.kill9()
        for i in range(5):
            (a.root / f"a/{i:02d}.bin").unlink()
        b.start().wait_ready()
        wait_for(lambda: converged(a, b, client, bucket), timeout=120, interval=0.5, what="convergence")
        assert len(a.files()) == 55
        assert not [p for p in tmp_path.rglob(".syncd-restore-*")]


def test_shared_emptied_bucket_deletes_nothing_and_too_many_deletions_pause(tmp_path, moto_server):
    client, bucket = new_bucket(moto_server)
    h = Host(tmp_path, "a", moto_server, bucket, mode="shared", on_delete="mirror", syncd={"max_deletes": 3})
    files = {f"f{i}.txt": os.urandom(100 + i) for i in range(10)}
    for rel, data in files.items():
        write_file(h.root / rel, data)
    d = h.start()
    try:
        d.wait_ready()
        wait_for(lambda: d.states().get("synced") == 10, timeout=60, what="uploads")
        # a wiped bucket: nothing deleted locally (the host uploads its files again)
        wipe(client, bucket, list(bucket_objects(client, bucket)))
        wait_for(lambda: len(bucket_files(client, bucket)) == 10, timeout=30, what="uploaded again")
        assert h.files() == files
        # more remote deletions than max_deletes: local deletion pauses, /healthz says so
        wipe(client, bucket, [f"{PREFIX}/f{i}.txt" for i in range(5)])
        wait_for(lambda: d.meta("deletes_paused"), timeout=30, what="deletions paused")
        assert h.healthz() == 503
        assert h.files() == files
    finally:
        assert d.stop() == 0, d.log()
