"""`syncd restore --at TIME`: the files as they were at TIME, from a versioned bucket (SPEC §3)."""

from __future__ import annotations

import math
import os
import threading
import time
import tracemalloc
from datetime import UTC, datetime, timedelta

import boto3
import pytest

from syncd.remote.base import Fetched, ObjectInfo, VersionInfo
from syncd.restore_at import parse_time, pick
from tests.conftest import Store, _new_bucket, wait_for, write_config
from tests.daemon_util import DaemonProc, write_file

PREFIX = "backups/uploads"
T0 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


def v(key: str, minute: int, *, marker: bool = False, latest: bool = False) -> VersionInfo:
    return VersionInfo(key=key, version_id=f"{key}@{minute}", last_modified=T0 + timedelta(minutes=minute),
                       is_latest=latest, delete_marker=marker)


def test_pick_takes_per_key_the_newest_entry_not_newer_than_time():
    entries = [
        v("a", 30, latest=True), v("a", 10), v("a", 0),                 # overwritten twice
        v("b", 20, marker=True, latest=True), v("b", 5),                 # deleted after TIME
        v("c", 20, latest=True), v("c", 8, marker=True), v("c", 1),      # deleted before, back after
        v("d", 25, latest=True),                                         # created after TIME
        v("e", 15, latest=True),                                         # exactly TIME: not newer
    ]
    got = list(pick(iter(entries), T0 + timedelta(minutes=15)))
    assert [(g.key, g.version_id, g.delete_marker) for g in got] == [
        ("a", "a@10", False), ("b", "b@5", False), ("c", "c@8", True), ("e", "e@15", False)]


def test_parse_time_iso_and_relative_ages():
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert parse_time("2h", now) == now - timedelta(hours=2)
    assert parse_time("3d", now) == now - timedelta(days=3)
    assert parse_time("30m", now) == now - timedelta(minutes=30)
    assert parse_time("2026-11-24T10:00:00Z") == T0
    assert parse_time("2026-11-24T11:00:00+01:00") == T0
    assert parse_time("2026-11-24T10:00:00").tzinfo is not None  # naive: local time


def test_restore_at_rejects_a_bad_time_exit_2(tmp_path, syncd):
    cfg = write_config(tmp_path / "s.toml", remote={"url": "s3://bkt/p"}, watches=[{"path": str(tmp_path / "u")}])
    r = syncd("--config", str(cfg), "restore", "--at", "yesterday-ish")
    assert r.code == 2 and "--at" in r.err


class Versions:
    """The versioned-bucket scenario of issue 15 on moto's server, with a real daemon."""

    def __init__(self, tmp, endpoint: str, *, versioned: bool = True) -> None:
        self.tmp = tmp
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        self.bucket = _new_bucket(self.client)
        if versioned:
            self.client.put_bucket_versioning(Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})
        self.root = tmp / "uploads"
        self.root.mkdir()
        self.ledger = tmp / "ledger.db"
        self.config = write_config(
            tmp / "syncd.toml", remote={"url": f"s3://{self.bucket}/backups", "endpoint_url": endpoint},
            watches=[{"path": str(self.root), "prefix": "uploads", "on_delete": "mirror"}],
            syncd={"ledger": str(self.ledger), "settle_seconds": 0.3, "workers": 4, "health_listen": "",
                   "rescan_interval": 0})

    def current(self, rel: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=f"{PREFIX}/{rel}")["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None


def name(i: int) -> str:
    return f"d{i % 3}/file {i:02d}.txt"


def v1(i: int) -> bytes:
    return f"version one of {i}\n".encode() * (i + 1)


def test_restore_at_gives_every_file_as_it_was_then(tmp_path, moto_server, syncd):
    s = Versions(tmp_path, moto_server)
    for i in range(30):
        write_file(s.root / name(i), v1(i))
    r = syncd("--config", str(s.config), "resync")
    assert r.code == 0 and "uploaded 30" in r.out, r.out + r.err
    noted = time.time()
    # moto's LastModified has 1-second resolution: what is written next must be stamped after
    # the noted time, so wait for the next second to begin
    wait_for(lambda: time.time() >= math.floor(noted) + 1, timeout=3, what="the next second")

    d = DaemonProc(s.config, s.ledger, tmp_path / "daemon.log").start()
    try:
        d.wait_ready()
        for i in range(10):  # overwrite 0..9
            write_file(s.root / name(i), f"version two of {i}\n".encode())
        for i in range(10, 20):  # delete 10..19 (on_delete = mirror: delete markers)
            (s.root / name(i)).unlink()
        wait_for(lambda: all(s.current(name(i)) == f"version two of {i}\n".encode() for i in range(10))
                 and all(s.current(name(i)) is None for i in range(10, 20)), timeout=60, what="v2 and deletions")
        wait_for(lambda: d.states().get("deleted") == 10 and d.states().get("synced") == 20, timeout=30,
                 what="ledger settled")
    finally:
        assert d.stop() == 0, d.log()

    at = datetime.fromtimestamp(noted, UTC).isoformat()
    out = tmp_path / "out"
    r = syncd("--config", str(s.config), "restore", "--at", at, "--to", str(out))
    assert r.code == 0, r.out + r.err
    assert "restored 30, skipped 0, failed 0" in r.out
    got = {p.relative_to(out / "uploads").as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == {name(i): v1(i) for i in range(30)}

    # in place, without --overwrite: only the 10 deleted files come back, as v1
    r = syncd("--config", str(s.config), "restore", "--at", at)
    assert r.code == 0, r.out + r.err
    assert "restored 10, skipped 20, failed 0" in r.out
    for i in range(30):
        want = f"version two of {i}\n".encode() if i < 10 else v1(i)
        assert (s.root / name(i)).read_bytes() == want, name(i)
    # and they are queued to become the remote's current version again at the next resync
    r = syncd("--config", str(s.config), "resync")
    assert r.code == 0, r.out + r.err
    assert all(s.current(name(i)) == v1(i) for i in range(10, 20))


def test_restore_at_with_overwrite_and_a_glob_puts_back_old_content(tmp_path, moto_server, syncd):
    s = Versions(tmp_path, moto_server)
    write_file(s.root / "a.txt", b"old a")
    write_file(s.root / "b.txt", b"old b")
    assert syncd("--config", str(s.config), "resync").code == 0
    noted = time.time()
    wait_for(lambda: time.time() >= math.floor(noted) + 1, timeout=3, what="the next second")
    write_file(s.root / "a.txt", b"new a")
    write_file(s.root / "b.txt", b"new b")
    assert syncd("--config", str(s.config), "resync").code == 0
    at = datetime.fromtimestamp(noted, UTC).isoformat()
    r = syncd("--config", str(s.config), "restore", "--at", at, "--overwrite", "a.txt")
    assert r.code == 0, r.out + r.err
    assert "restored 1, skipped 0, failed 0" in r.out
    assert (s.root / "a.txt").read_bytes() == b"old a"
    assert (s.root / "b.txt").read_bytes() == b"new b"


def test_restore_at_dry_run_names_files_and_writes_nothing(tmp_path, moto_server, syncd):
    s = Versions(tmp_path, moto_server)
    write_file(s.root / "a.txt", b"a")
    assert syncd("--config", str(s.config), "resync").code == 0
    (s.root / "a.txt").unlink()
    r = syncd("--config", str(s.config), "restore", "--at", "0s", "--dry-run")
    assert r.code == 0, r.out + r.err
    assert "restore uploads/a.txt" in r.out.splitlines()  # like `restore --dry-run`: watch prefix/path
    assert "dry run: would restore 1" in r.out
    assert not (s.root / "a.txt").exists()


def test_restore_at_refuses_a_tampered_version(tmp_path, moto_server, syncd):
    s = Versions(tmp_path, moto_server)
    write_file(s.root / "a.txt", b"good")
    assert syncd("--config", str(s.config), "resync").code == 0
    # another writer replaces the object with bytes that do not match the syncd-sha256 it claims
    good = s.client.head_object(Bucket=s.bucket, Key=f"{PREFIX}/a.txt")["Metadata"]
    s.client.put_object(Bucket=s.bucket, Key=f"{PREFIX}/a.txt", Body=b"evil", Metadata=good)
    r = syncd("--config", str(s.config), "restore", "--at", "0s", "--to", str(tmp_path / "out"))
    assert r.code == 1
    assert "does not match its syncd-sha256" in r.err
    assert not (tmp_path / "out" / "uploads" / "a.txt").exists()


def test_restore_at_refuses_hostile_keys_and_skips_syncd_objects(tmp_path, moto_server, syncd):
    s = Versions(tmp_path, moto_server)
    write_file(s.root / "a.txt", b"a")
    assert syncd("--config", str(s.config), "resync").code == 0
    for key in ("../escape.txt", ".trash/2026-11-24/x.txt", ".syncd/tombstones/y.txt", ".syncd-check/h"):
        s.client.put_object(Bucket=s.bucket, Key=f"{PREFIX}/{key}", Body=b"x")
    out = tmp_path / "out"
    r = syncd("--config", str(s.config), "restore", "--at", "0s", "--to", str(out))
    assert r.code == 1
    assert "restored 1, skipped 0, failed 1" in r.out
    assert "unsafe key" in r.err
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["a.txt"]
    assert not (tmp_path / "escape.txt").exists()


def test_restore_at_on_an_unversioned_bucket_exits_2(tmp_path, moto_server, syncd):
    s = Versions(tmp_path, moto_server, versioned=False)
    write_file(s.root / "a.txt", b"a")
    assert syncd("--config", str(s.config), "resync").code == 0
    r = syncd("--config", str(s.config), "restore", "--at", "1h", "--to", str(tmp_path / "out"))
    assert r.code == 2
    assert "versioning was never enabled" in r.err


def test_restore_at_on_a_file_remote_exits_2(tmp_path, make_env, syncd):
    env = make_env(Store(kind="file", url=f"file://{tmp_path / 'remote'}", root=tmp_path / "remote"))
    r = syncd("--config", str(env.config), "restore", "--at", "1h")
    assert r.code == 2
    assert "needs a versioned S3 bucket" in r.err


def test_a_pages_versions_and_delete_markers_merge_back_newest_first():
    from syncd.remote.s3 import _in_order

    def e(key, minute, latest=False):
        return {"Key": key, "VersionId": f"{key}@{minute}", "LastModified": T0 + timedelta(minutes=minute),
                "IsLatest": latest, "Size": 1}

    page = {"Versions": [e("a", 9, True), e("a", 3), e("b", 5), e("b", 1)],
            "DeleteMarkers": [e("a", 6), e("b", 7, True), e("b", 2)]}
    got = [(x.version_id, x.delete_marker) for x in _in_order(page)]
    assert got == [("a@9", False), ("a@6", True), ("a@3", False),
                   ("b@7", True), ("b@5", False), ("b@2", True), ("b@1", False)]


def test_versions_listing_pages_through_every_entry_key_by_key(tmp_path, moto_server):
    from syncd.config import load_config
    from syncd.remote.s3 import S3Remote

    s = Versions(tmp_path, moto_server)
    c, b = s.client, s.bucket
    for k in ("k1", "k2", "k3"):
        c.put_object(Bucket=b, Key=f"p/{k}", Body=b"1")
        c.delete_object(Bucket=b, Key=f"p/{k}")
        c.put_object(Bucket=b, Key=f"p/{k}", Body=b"2")
    c.delete_object(Bucket=b, Key="p/k2")
    cfg = load_config(s.config)
    remote = S3Remote(cfg.remote, workers=1)
    try:
        listed = list(remote.list_versions("p/", page_size=2))
        resumed = list(remote.list_versions("p/", after="p/k1", page_size=2))
    finally:
        remote.close()
    assert [e.key for e in listed] == ["p/k1"] * 3 + ["p/k2"] * 4 + ["p/k3"] * 3
    assert sum(e.delete_marker for e in listed) == 4
    # each key starts with its latest entry: k2's is a delete marker, the others' a version
    firsts = {e.key: e for e in reversed(listed)}
    assert [(k, f.is_latest, f.delete_marker) for k, f in sorted(firsts.items())] == [
        ("p/k1", True, False), ("p/k2", True, True), ("p/k3", True, False)]
    assert [e.key for e in resumed] == ["p/k2"] * 4 + ["p/k3"] * 3


class ManyKeys:
    """A remote whose versioned listing streams `n` keys (each a version over an older delete
    marker), counting how far the listing ran ahead of the downloads."""

    name = "s3://fake/p"

    def __init__(self, n: int) -> None:
        self.n = n
        self.listed = 0
        self.fetched = 0
        self.max_ahead = 0
        self.lock = threading.Lock()

    def versioning(self) -> str:
        return "Enabled"

    def list_versions(self, prefix: str, *, after: str = ""):
        for i in range(self.n):
            key = f"{prefix}f{i:06d}"
            with self.lock:
                self.listed += 1
                self.max_ahead = max(self.max_ahead, self.listed - self.fetched)
            yield VersionInfo(key, "v2", T0 + timedelta(minutes=2), 1, True, False)
            yield VersionInfo(key, "v1", T0 + timedelta(minutes=1), 0, False, True)

    def get(self, key: str, dest, *, version_id: str | None = None) -> Fetched:
        assert version_id == "v2"
        dest.write(b"x")
        with self.lock:
            self.fetched += 1
        return Fetched(ObjectInfo(key, 1, mtime_ns=0), server_verified=False)


def many_keys_config(tmp_path):
    from syncd.config import load_config

    return load_config(write_config(tmp_path / "s.toml", remote={"url": "s3://fake/p"},
                                    watches=[{"path": str(tmp_path / "u"), "prefix": "up"}],
                                    syncd={"workers": 2}))


def test_restore_at_streams_the_listing_with_a_bounded_number_in_flight(tmp_path):
    from syncd.restore_at import IN_FLIGHT_PER_WORKER, restore_at

    cfg = many_keys_config(tmp_path)
    remote = ManyKeys(300)
    summary = restore_at(cfg, remote, T0 + timedelta(minutes=5), to_dir=tmp_path / "out")
    assert summary.restored == 300 and remote.fetched == 300
    # the listing never runs more than the pool's queue ahead of the downloads: memory does not
    # grow with the number of keys (a listing read to the end first would be 300 ahead)
    assert remote.max_ahead <= cfg.workers * IN_FLIGHT_PER_WORKER + 1


def test_restore_at_memory_stays_flat_for_100000_keys(tmp_path, request):
    if not (request.config.getoption("--soak") or os.environ.get("SYNCD_SOAK") == "1"):
        pytest.skip("100,000 keys under tracemalloc take minutes: run with --soak (or SYNCD_SOAK=1)")
    from syncd.restore_at import restore_at

    remote = ManyKeys(100_000)
    tracemalloc.start()
    try:
        summary = restore_at(many_keys_config(tmp_path), remote, T0 + timedelta(minutes=5), to_dir=tmp_path / "out",
                             dry_run=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert remote.listed == 100_000 and summary.would_restore == 100_000
    # 100,000 chosen versions held at once would take tens of MiB
    assert peak < 4 * 1024 * 1024, peak
