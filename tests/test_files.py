"""`/files/` (SPEC §6, issue 13 item 4): on-demand restore, one download per file, safe paths.

The endpoint under test is the daemon's real HTTP server (`syncd.http`) with a `FileServer`
over a `file://` remote wrapped in a counter, so every download and HEAD is counted.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from syncd.config import load_config
from syncd.files import FileServer
from syncd.http import HttpEndpoint, trusted
from syncd.ledger import Ledger
from syncd.remote.local import LocalRemote
from syncd.transfers import Stats
from tests.conftest import wait_for, write_config

MTIME_NS = 1_600_000_000_123_456_789


class CountingRemote:
    """The real remote, counting GETs and HEADs per key; `gate` can hold downloads back."""

    def __init__(self, inner: LocalRemote) -> None:
        self.inner = inner
        self.name = inner.name
        self.gets: Counter[str] = Counter()
        self.heads: Counter[str] = Counter()
        self.gate = lambda: None
        self._lock = threading.Lock()

    def get(self, key, dest):
        with self._lock:
            self.gets[key] += 1
        self.gate()
        return self.inner.get(key, dest)

    def head(self, key):
        with self._lock:
            self.heads[key] += 1
        return self.inner.head(key)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class Served:
    """A FileServer behind syncd's HTTP endpoint, and helpers to seed and ask it."""

    def __init__(self, tmp: Path, watch: dict | None = None, token: str = "") -> None:
        self.tmp = tmp
        self.root = tmp / "uploads"
        self.root.mkdir()
        cfg_path = write_config(
            tmp / "syncd.toml", remote={"url": f"file://{tmp / 'remote'}"},
            watches=[{"path": str(self.root), "prefix": "uploads", **(watch or {})}],
            syncd={"ledger": str(tmp / "ledger.db"), "serve_files": True, "health_listen": "127.0.0.1:0"})
        self.cfg = load_config(cfg_path)
        self.ledger = Ledger(self.cfg.ledger)
        self.ledger.ensure_watch("uploads", str(self.root))
        self.remote = CountingRemote(LocalRemote(tmp / "remote"))
        self.stats = Stats()
        self.stop = threading.Event()
        self.daemon = SimpleNamespace(cfg=self.cfg, ledger=self.ledger, stop=self.stop, health=lambda: (True, "ok"),
                                      last_reconcile_at=None,
                                      engine=SimpleNamespace(remote=self.remote, stats=self.stats))
        self.endpoint = HttpEndpoint(self.daemon, "127.0.0.1:0")  # type: ignore[arg-type]
        self.endpoint.start(self.daemon)  # type: ignore[arg-type]
        self.files: FileServer = self.endpoint.server.files  # type: ignore[assignment]
        self.port = self.endpoint.address[1]

    def seed(self, rel: str, data: bytes, key: str | None = None) -> None:
        """An object in the remote as syncd writes it (syncd-sha256, syncd-mtime-ns)."""
        src = self.tmp / "seed.bin"
        src.write_bytes(data)
        self.remote.inner.put(key or f"uploads/{rel}", src, size=len(data),
                              sha256=hashlib.sha256(data).hexdigest(), mtime_ns=MTIME_NS)
        src.unlink()

    def request(self, path: str, method: str = "GET", host: str = "127.0.0.1",
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(host, self.port, timeout=60)
        try:
            conn.request(method, path, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def close(self) -> None:
        self.endpoint.stop()
        self.ledger.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    yield s
    s.close()


def tree(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*")}


# --- a missing file ------------------------------------------------------------------------

def test_missing_file_is_restored_verified_served_byte_identical_and_recorded_synced(served):
    data = os.urandom(3 * 1024 * 1024 + 17)  # several sendfile/write chunks
    served.seed("photos/cat 1.jpg", data)
    code, headers, body = served.request("/files/uploads/photos/cat%201.jpg")
    assert code == 200, body
    assert body == data
    assert headers["content-length"] == str(len(data))
    assert headers["content-type"] == "image/jpeg"
    local = served.root / "photos" / "cat 1.jpg"
    assert local.read_bytes() == data  # on disk afterwards
    assert local.stat().st_mtime_ns == MTIME_NS  # restored like at start: the object's mtime
    assert not [p for p in local.parent.iterdir() if p.name.startswith(".syncd-restore-")]
    row = served.ledger.get("uploads", "photos/cat 1.jpg")
    assert (row["state"], row["op"], row["sha256"], row["remote_sha256"]) == \
        ("synced", None, hashlib.sha256(data).hexdigest(), hashlib.sha256(data).hexdigest())
    assert row["size"] == len(data) and row["mtime_ns"] == MTIME_NS
    assert served.stats.restored == 1
    # the second request is answered from disk, without the remote
    code, _, body = served.request("/files/uploads/photos/cat%201.jpg")
    assert code == 200 and body == data
    assert served.remote.gets == Counter({"uploads/photos/cat 1.jpg": 1})
    assert served.files.served == Counter({"remote": 1, "disk": 1})


def test_a_file_that_does_not_match_its_checksum_is_refused_and_never_appears(served):
    served.seed("bad.bin", b"good content")
    obj = served.tmp / "remote" / "uploads" / "bad.bin"
    obj.write_bytes(b"evil content")  # same size and mtime, other bytes: the sidecar still claims the old hash
    os.utime(obj, ns=(MTIME_NS, MTIME_NS))
    code, _, body = served.request("/files/uploads/bad.bin")
    assert code == 502 and b"syncd-sha256" in body
    assert tree(served.root) == set()
    assert served.ledger.get("uploads", "bad.bin") is None


def test_head_restores_and_answers_the_headers_without_a_body(served):
    served.seed("doc.pdf", b"%PDF" + b"x" * 5000)
    code, headers, body = served.request("/files/uploads/doc.pdf", "HEAD")
    assert (code, body) == (200, b"")
    assert headers["content-length"] == "5004" and headers["content-type"] == "application/pdf"
    assert (served.root / "doc.pdf").stat().st_size == 5004


def test_a_queued_restore_is_skipped_once_the_file_was_served(served):
    data = {"q/a.txt": b"a" * 5000, "q/b.txt": b"b" * 7000}
    for rel, content in data.items():
        served.seed(rel, content)
    now = time.time()  # queued as the startup listing queues missing files
    served.ledger.upsert_many([{"watch": "uploads", "path": rel, "key": f"uploads/{rel}", "size": len(content),
                                "state": "pending", "op": "get", "due_at": now, "queued_at": now, "attempts": 0}
                               for rel, content in data.items()])
    for rel in data:
        assert served.request(f"/files/uploads/{rel}")[0] == 200
        row = served.ledger.get("uploads", rel)
        assert (row["state"], row["op"], row["sha256"]) == ("synced", None, hashlib.sha256(data[rel]).hexdigest())
    assert served.ledger.outstanding(("get",)) == 0  # the queue skips both
    assert served.ledger.claim(("get",), now=time.time() + 1) == []
    assert served.remote.gets == Counter({"uploads/q/a.txt": 1, "uploads/q/b.txt": 1})
    assert served.remote.heads == Counter()  # the listing that queued them saw them: a GET, no HEAD
    assert {p.name: p.read_bytes() for p in (served.root / "q").iterdir()} == \
        {rel.split("/")[1]: content for rel, content in data.items()}


def test_a_request_for_a_file_a_restore_worker_holds_waits_for_that_download(served):
    from syncd.engine import Engine

    served.seed("w/a.txt", b"held by a worker")
    now = time.time()
    served.ledger.upsert_many([{"watch": "uploads", "path": "w/a.txt", "key": "uploads/w/a.txt", "size": 16,
                                "state": "pending", "op": "get", "due_at": now, "queued_at": now, "attempts": 0}])
    held = served.ledger.claim(("get",), now=time.time() + 1)  # a worker holds it
    assert [r["path"] for r in held] == ["w/a.txt"]
    answer: list = []
    request = threading.Thread(target=lambda: answer.append(served.request("/files/uploads/w/a.txt")))
    request.start()
    # whether the request comes before or after the worker's download, there is one download
    engine = Engine(served.cfg, served.ledger, served.remote, oneshot=False)  # type: ignore[arg-type]
    engine.transfers.handle(held[0])
    request.join(30)
    assert answer and answer[0][::2] == (200, b"held by a worker")
    assert served.remote.gets == Counter({"uploads/w/a.txt": 1})
    assert served.ledger.get("uploads", "w/a.txt")["state"] == "synced"


def test_a_claimed_restore_taken_over_on_demand_then_deleted_by_the_app_stays_deleted(served):
    """A worker claimed the restore in its batch; an on-demand restore took it over; the app
    deleted the file before the watcher recorded it: the worker's turn brings nothing back."""
    from syncd.engine import Engine
    from syncd.lazy import RESTORED, restore_now

    served.seed("t/a.txt", b"served, then deleted by the app")
    now = time.time()
    served.ledger.upsert_many([{"watch": "uploads", "path": "t/a.txt", "key": "uploads/t/a.txt", "size": 31,
                                "state": "pending", "op": "get", "due_at": now, "queued_at": now, "attempts": 0}])
    held = served.ledger.claim(("get",), now=time.time() + 1)  # in a worker's batch, not started
    engine = Engine(served.cfg, served.ledger, served.remote, oneshot=False)  # type: ignore[arg-type]
    assert restore_now(engine, "uploads", "t/a.txt") == RESTORED
    (served.root / "t" / "a.txt").unlink()
    engine.transfers.handle(held[0])
    assert not (served.root / "t" / "a.txt").exists()
    assert not [p for p in (served.root / "t").iterdir()]  # no temp left either
    row = served.ledger.get("uploads", "t/a.txt")
    assert (row["state"], row["op"], row["lease_until"]) == ("synced", None, None)


def test_a_queued_restore_taken_by_a_request_is_not_claimed_by_a_worker_meanwhile(served):
    served.seed("h/a.txt", b"taken ahead of the queue")
    now = time.time()
    served.ledger.upsert_many([{"watch": "uploads", "path": "h/a.txt", "key": "uploads/h/a.txt", "size": 24,
                                "state": "pending", "op": "get", "due_at": now, "queued_at": now, "attempts": 0}])
    release = threading.Event()
    served.remote.gate = lambda: release.wait(30)
    answer: list = []
    request = threading.Thread(target=lambda: answer.append(served.request("/files/uploads/h/a.txt")))
    request.start()
    try:
        wait_for(lambda: served.remote.gets, 30, what="the request's download started")
        assert served.ledger.claim(("get",), now=time.time() + 1) == []  # a worker finds nothing to take
    finally:
        release.set()
        request.join(30)
    assert answer and answer[0][::2] == (200, b"taken ahead of the queue")
    assert served.remote.gets == Counter({"uploads/h/a.txt": 1})
    row = served.ledger.get("uploads", "h/a.txt")
    assert (row["state"], row["op"], row["lease_until"]) == ("synced", None, None)


def test_a_failed_on_demand_restore_gives_the_row_back_to_the_queue(served):
    now = time.time()
    served.ledger.upsert_many([{"watch": "uploads", "path": "gone.txt", "key": "uploads/gone.txt", "size": 3,
                                "state": "pending", "op": "get", "due_at": now, "queued_at": now, "attempts": 0}])
    assert served.request("/files/uploads/gone.txt")[0] == 404  # the remote does not have it (any more)
    row = served.ledger.get("uploads", "gone.txt")
    assert (row["op"], row["lease_until"]) == ("get", None)  # the queue's worker records why


def test_twenty_concurrent_requests_for_one_missing_20mb_file_cause_one_download(served):
    data = os.urandom(20 * 1024 * 1024)
    served.seed("big/video.mp4", data)
    entered = Counter()
    real_restore = served.files.restore

    def counting_restore(watch, rel):
        entered["n"] += 1
        return real_restore(watch, rel)

    served.files.restore = counting_restore  # type: ignore[method-assign]
    # the download waits until all 20 requests have asked for the file: they overlap for sure
    served.remote.gate = lambda: wait_for(lambda: entered["n"] >= 20, 30, what="20 requests waiting")
    results: list = [None] * 20

    def fetch(i: int) -> None:
        code, _, body = served.request("/files/uploads/big/video.mp4")
        results[i] = (code, hashlib.sha256(body).hexdigest())

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [(200, hashlib.sha256(data).hexdigest())] * 20
    assert served.remote.gets == Counter({"uploads/big/video.mp4": 1})
    assert served.files.served["remote"] == 20
    assert (served.root / "big" / "video.mp4").read_bytes() == data
    assert served.files._inflight == {}


# --- what is not served ---------------------------------------------------------------------

def test_neither_has_it_is_404_without_a_download_or_a_new_directory(served):
    code, _, _ = served.request("/files/uploads/nope/missing.jpg")
    assert code == 404
    assert served.remote.gets == Counter() and tree(served.root) == set()
    assert served.request("/files/elsewhere/a.jpg")[0] == 404  # no watch has this prefix


def test_a_file_the_app_deleted_is_404_and_not_restored(served):
    served.seed("gone.txt", b"deleted by the app")
    served.ledger.upsert_many([{"watch": "uploads", "path": "gone.txt", "key": "uploads/gone.txt",
                                "state": "deleted", "op": None, "due_at": 0}])
    assert served.request("/files/uploads/gone.txt")[0] == 404
    assert served.remote.gets == Counter() and served.remote.heads == Counter()  # the ledger knew
    assert tree(served.root) == set()


def test_a_remote_tombstone_newer_than_the_object_hides_a_file_the_ledger_does_not_know(served):
    served.seed("old.txt", b"deleted on a host whose ledger is gone")
    tomb = served.tmp / "empty"  # tombstones: one dated after its object, one before
    tomb.write_bytes(b"")
    served.remote.inner.put("uploads/.syncd/tombstones/old.txt", tomb, size=0, sha256=hashlib.sha256(b"").hexdigest(),
                            mtime_ns=MTIME_NS + 10**9)
    served.remote.inner.put("uploads/.syncd/tombstones/again.txt", tomb, size=0,
                            sha256=hashlib.sha256(b"").hexdigest(), mtime_ns=MTIME_NS - 10**9)
    served.seed("again.txt", b"written again after its deletion")
    assert served.request("/files/uploads/old.txt")[0] == 404
    assert served.request("/files/uploads/again.txt")[::2] == (200, b"written again after its deletion")
    assert served.remote.gets == Counter({"uploads/again.txt": 1})
    assert sorted(tree(served.root)) == ["again.txt"]
    hook: list = []
    served.files.tombstoned = lambda watch, rel, obj: hook.append((rel, obj.key)) or True  # another source
    served.seed("hooked.txt", b"x")
    assert served.request("/files/uploads/hooked.txt")[0] == 404
    assert hook == [("hooked.txt", "uploads/hooked.txt")]


UNSAFE = [
    "/files/uploads/../secret.txt",
    "/files/uploads/a/../../secret.txt",
    "/files/uploads/%2e%2e/secret.txt",
    "/files/uploads/..%2fsecret.txt",
    "/files/uploads/a%2F..%2F..%2Fsecret.txt",
    "/files//etc/passwd",
    "/files/uploads//etc/passwd",
    "/files/uploads/%2Fetc%2Fpasswd",
    "/files/uploads/..%5c..%5csecret.txt",
    "/files/uploads/a%5Cb.txt",
    "/files/uploads/a%00.txt",
    "/files/uploads/C:/secret.txt",
    "/files/uploads/./secret.txt",
    "/files/uploads/%ff.txt",
    "/files/uploads/",
]


def test_unsafe_paths_are_400_and_nothing_outside_the_root_is_read_or_written(served):
    secret = b"outside the root"
    (served.tmp / "secret.txt").write_bytes(secret)
    served.seed("", secret, key="secret.txt")  # the remote has a "secret.txt" beside the prefix, too
    served.seed("", secret, key="uploads/secret.txt.orig")
    before = tree(served.tmp)
    answers = {path: served.request(path) for path in UNSAFE}
    assert {p: a[0] for p, a in answers.items()} == dict.fromkeys(UNSAFE, 400)
    assert not [p for p, a in answers.items() if secret in a[2]]
    assert tree(served.tmp) == before
    assert served.remote.gets == Counter() and served.remote.heads == Counter()


EXCLUDED = ["a.tmp", "b.part", ".trash/2026-01-01/x.jpg", ".syncd/tombstones/x.jpg", ".syncd-check/host",
            "d/.syncd-restore-abc", "cache/x.jpg"]


def test_excluded_names_are_403_and_neither_read_nor_restored(tmp_path):
    s = Served(tmp_path, watch={"exclude": ["*.tmp", "*.part", "cache"]})
    try:
        for rel in EXCLUDED:
            s.seed(rel, b"not for serving")
        for rel in EXCLUDED[:4]:  # some exist locally too, the others only in the remote
            local = s.root.joinpath(*rel.split("/"))
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(b"local but excluded")
        before = tree(tmp_path)
        answers = {rel: s.request("/files/uploads/" + rel) for rel in EXCLUDED}
        assert {rel: a[0] for rel, a in answers.items()} == dict.fromkeys(EXCLUDED, 403)
        assert not [rel for rel, a in answers.items() if b"not for serving" in a[2] or b"local but" in a[2]]
        assert s.remote.gets == Counter() and s.remote.heads == Counter()
        assert tree(tmp_path) == before
    finally:
        s.close()


def test_include_patterns_limit_what_is_served(tmp_path):
    s = Served(tmp_path, watch={"include": ["*.jpg"]})
    try:
        s.seed("a.png", b"png")
        s.seed("a.jpg", b"jpg")
        assert s.request("/files/uploads/a.png")[0] == 403
        assert s.request("/files/uploads/a.jpg")[:3:2] == (200, b"jpg")
    finally:
        s.close()


def test_symlinks_are_not_followed_out_of_the_root(served):
    secret = b"outside the root"
    outside = served.tmp / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(secret)
    (served.root / "link.txt").symlink_to(outside / "secret.txt")
    (served.root / "dirlink").symlink_to(outside)
    served.seed("dirlink/new.txt", b"would land outside")
    for path in ("/files/uploads/link.txt", "/files/uploads/dirlink/secret.txt", "/files/uploads/dirlink/new.txt"):
        code, _, body = served.request(path)
        assert code == 403, (path, body)
        assert secret not in body
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]  # nothing restored through it
    (served.root / "fifo").unlink(missing_ok=True)
    os.mkfifo(served.root / "fifo")
    assert served.request("/files/uploads/fifo")[0] == 403  # never opened: it would block
    (served.root / "adir").mkdir()
    assert served.request("/files/uploads/adir")[0] == 403


def test_with_follow_symlinks_only_links_inside_the_root_are_followed(tmp_path):
    s = Served(tmp_path, watch={"follow_symlinks": True})
    try:
        (tmp_path / "secret.txt").write_bytes(b"outside the root")
        (s.root / "real.txt").write_bytes(b"inside")
        (s.root / "inside.txt").symlink_to(s.root / "real.txt")
        (s.root / "outside.txt").symlink_to(tmp_path / "secret.txt")
        assert s.request("/files/uploads/inside.txt")[:3:2] == (200, b"inside")
        code, _, body = s.request("/files/uploads/outside.txt")
        assert code == 403 and b"outside the root" not in body
    finally:
        s.close()


# --- who may call /files/ ---------------------------------------------------------------------

def test_trusted_is_loopback_or_the_bearer_token():
    assert trusted("127.0.0.1", None, env={})
    assert trusted("::1", None, env={})
    assert not trusted("192.0.2.7", None, env={})
    assert not trusted("192.0.2.7", "Bearer s3cret", env={})  # no token configured: loopback only
    assert trusted("192.0.2.7", "Bearer s3cret", env={"SYNCD_HTTP_TOKEN": "s3cret"})
    assert not trusted("192.0.2.7", "Bearer wrong", env={"SYNCD_HTTP_TOKEN": "s3cret"})
    assert not trusted("192.0.2.7", None, env={"SYNCD_HTTP_TOKEN": "s3cret"})


def non_loopback_address() -> str | None:
    """An address of this host that is not loopback (connecting to it from here keeps it as the
    client address), or None."""
    candidates = []
    try:
        candidates += socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: only the route's source address
            candidates.append(s.getsockname()[0])
    except OSError:
        pass
    for ip in candidates:
        if not ip.startswith("127."):
            try:
                with socket.socket() as s:
                    s.bind((ip, 0))
                return ip
            except OSError:
                continue
    return None


def test_a_non_loopback_client_without_the_token_gets_403(tmp_path, monkeypatch):
    ip = non_loopback_address()
    if ip is None:
        pytest.skip("this host has no non-loopback address to connect from")
    s = Served(tmp_path)
    s.endpoint.stop()
    s.endpoint = HttpEndpoint(s.daemon, "0.0.0.0:0")  # type: ignore[arg-type]
    s.endpoint.start(s.daemon)  # type: ignore[arg-type]
    s.files = s.endpoint.server.files  # type: ignore[assignment]
    s.port = s.endpoint.address[1]
    try:
        s.seed("a.txt", b"private")
        code, _, body = s.request("/files/uploads/a.txt", host=ip)
        assert code == 403 and b"private" not in body
        assert s.request("/healthz", host=ip)[0] == 200  # health stays public
        assert s.remote.gets == Counter() and tree(s.root) == set()
        monkeypatch.setenv("SYNCD_HTTP_TOKEN", "t0ken")
        assert s.request("/files/uploads/a.txt", host=ip, headers={"Authorization": "Bearer wrong"})[0] == 403
        code, _, body = s.request("/files/uploads/a.txt", host=ip, headers={"Authorization": "Bearer t0ken"})
        assert (code, body) == (200, b"private")
    finally:
        s.close()


def test_files_is_404_when_serve_files_is_off(served):
    served.endpoint.server.files = None
    served.seed("a.txt", b"x")
    assert served.request("/files/uploads/a.txt")[0] == 404
    assert served.remote.gets == Counter()


@pytest.mark.parametrize("store", ["moto"], indirect=True)
def test_a_tombstone_is_judged_by_the_store_clock_not_by_the_file_mtime(store, make_env):
    """A file whose mtime is a day ahead (another host's clock, or an archive's) and which the
    app deleted afterwards stays hidden: /files/ compares the store's times of the object and
    its tombstone, as the listing does, not the object's syncd-mtime-ns."""
    from syncd import tombstones
    from syncd.remote import open_remote

    env = make_env(store)
    cfg = load_config(env.config)
    watch = cfg.watches[0]
    remote = open_remote(cfg)
    ledger = Ledger(env.ledger)
    try:
        body = env.tmp / "body"
        body.write_bytes(b"deleted by the app")
        base = f"{cfg.remote.prefix}/{watch.prefix}"
        remote.put(f"{base}/skewed.txt", body, size=body.stat().st_size,
                   sha256=hashlib.sha256(b"deleted by the app").hexdigest(),
                   mtime_ns=time.time_ns() + 86400 * 10**9)
        tombstones.write(remote, base, "skewed.txt")  # the deletion, after the upload
        files = FileServer(cfg, ledger, remote, Stats())
        obj = remote.head(f"{base}/skewed.txt")
        assert obj is not None
        assert files.remote_tombstone_hides(watch, "skewed.txt", obj)
    finally:
        ledger.close()
        remote.close()
