"""`/files/` on a real `syncd run` against moto's S3 server, and a real nginx in front of it
(SPEC §6, issue 13 items 4 and 6). GETs are counted where moto answers them."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import boto3
import pytest

from tests.conftest import _new_bucket, free_port, wait_for, write_config
from tests.daemon_util import DaemonProc

RECIPE = Path(__file__).resolve().parents[2] / "packaging" / "nginx" / "syncd-files.conf"


@pytest.fixture
def gets(monkeypatch) -> Counter:
    """GET Object requests the (in-process) moto server answers, per (key, client): "awscrt" or
    "botocore", from the User-Agent (syncd's default, transfers = "auto", GETs through awscrt)."""
    from moto.s3.responses import S3Response

    counts: Counter = Counter()
    real = S3Response.get_object

    def get_object(self, *a, **kw):
        key = unquote(self.path.split("?", 1)[0].split("/", 2)[-1])  # /bucket/<key> (path-style)
        # awscrt's S3 client says so (CRTS3NativeClient); botocore's names awscrt too (md/awscrt#...)
        counts[key, "awscrt" if "CRTS3NativeClient" in self.headers.get("User-Agent", "") else "botocore"] += 1
        return real(self, *a, **kw)

    monkeypatch.setattr(S3Response, "get_object", get_object)
    return counts


class Site:
    """A bucket with objects syncd wrote earlier, and `syncd run` serving /files/ for a watch
    that has none of them locally (`restore = false`: only requests bring files back)."""

    def __init__(self, tmp: Path, endpoint: str) -> None:
        self.tmp = tmp
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        self.bucket = _new_bucket(self.client)
        self.root = tmp / "uploads"
        self.root.mkdir()
        self.port = free_port()
        self.config = write_config(
            tmp / "syncd.toml", remote={"url": f"s3://{self.bucket}/backups", "endpoint_url": endpoint},
            watches=[{"path": str(self.root), "prefix": "uploads", "restore": False}],
            syncd={"ledger": str(tmp / "ledger.db"), "settle_seconds": 0.2, "workers": 2, "rescan_interval": 0,
                   "remote_rescan_interval": 0, "health_listen": f"127.0.0.1:{self.port}", "serve_files": True})
        self.daemon: DaemonProc | None = None

    def seed(self, rel: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=f"backups/uploads/{rel}", Body=data,
                               Metadata={"syncd-sha256": hashlib.sha256(data).hexdigest(),
                                         "syncd-mtime-ns": "1600000000000000000"})

    def start(self) -> DaemonProc:
        self.daemon = DaemonProc(self.config, self.tmp / "ledger.db", self.tmp / "daemon.log").start()
        self.daemon.wait_ready()
        return self.daemon

    def metric(self, name: str) -> float:
        text = request(self.port, "/metrics")[2].decode()
        return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def request(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


@pytest.fixture
def site(tmp_path, moto_server):
    s = Site(tmp_path, moto_server)
    yield s
    if s.daemon is not None:
        assert s.daemon.stop() == 0, s.daemon.log()


def test_daemon_serves_a_missing_file_once_downloaded_for_twenty_concurrent_requests(site, gets):
    data = os.urandom(20 * 1024 * 1024)
    site.seed("big/video.mp4", data)
    site.start()
    assert not (site.root / "big").exists()
    results: list = [None] * 20
    go = threading.Barrier(20)

    def fetch(i: int) -> None:
        go.wait()
        code, headers, body = request(site.port, "/files/uploads/big/video.mp4")
        results[i] = (code, headers.get("content-length"), hashlib.sha256(body).hexdigest())

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert results == [(200, str(len(data)), hashlib.sha256(data).hexdigest())] * 20
    # one restore: awscrt gives up a GET of more than 8 MiB at its headers (README "Transfers
    # through awscrt"), then botocore fetches it; the other 19 requests wait for that one
    key = "backups/uploads/big/video.mp4"
    assert gets == Counter({(key, "awscrt"): 1, (key, "botocore"): 1})
    assert (site.root / "big" / "video.mp4").read_bytes() == data  # on disk afterwards, whole
    row = site.daemon.query("SELECT state, op, sha256 FROM files WHERE path='big/video.mp4'")
    assert row == [("synced", None, hashlib.sha256(data).hexdigest())]
    assert site.metric('syncd_served_total{source="remote"}') + site.metric('syncd_served_total{source="disk"}') == 20
    assert site.metric("syncd_restores_total") == 1
    # not uploaded back: the restored file is known to be the remote's content
    wait_for(lambda: site.daemon.states().get("pending", 0) == 0, 10, what="nothing pending")
    assert site.daemon.query("SELECT count(*) FROM files WHERE state!='synced'") == [(0,)]


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx-light; .ci/run installs it)")
    return found


def start_nginx(tmp: Path, syncd_port: int, web_root: Path) -> tuple[subprocess.Popen, int]:
    """nginx (one process, as this user, everything under `tmp`) with the shipped recipe,
    pointed at this syncd and this web root."""
    binary = nginx_binary()
    port = free_port()
    recipe = RECIPE.read_text()
    for old, new in (("127.0.0.1:9750", f"127.0.0.1:{syncd_port}"), ("listen 80;", f"listen 127.0.0.1:{port};"),
                     ("root /srv/app;", f"root {web_root};")):
        assert old in recipe, f"the recipe no longer holds {old!r}"
        recipe = recipe.replace(old, new)
    conf_dir = tmp / "nginx"
    (conf_dir / "temp").mkdir(parents=True)
    (conf_dir / "syncd-files.conf").write_text(recipe)
    temps = "\n".join(f"    {kind}_temp_path {conf_dir / 'temp' / kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    mime = "    include /etc/nginx/mime.types;\n" if Path("/etc/nginx/mime.types").exists() else ""
    (conf_dir / "nginx.conf").write_text(f"""\
daemon off;
master_process off;
pid {conf_dir / 'nginx.pid'};
error_log {conf_dir / 'error.log'} info;
events {{ worker_connections 64; }}
http {{
{mime}{temps}
    access_log {conf_dir / 'access.log'};
    include {conf_dir / 'syncd-files.conf'};
}}
""")
    args = [binary, "-p", str(conf_dir), "-c", str(conf_dir / "nginx.conf"), "-e", str(conf_dir / "error.log")]
    check = subprocess.run([*args, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def listening() -> bool:
        assert proc.poll() is None, (conf_dir / "error.log").read_text()
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, 20, what="nginx listening")
    return proc, port


def test_nginx_in_front_returns_a_missing_file_with_the_right_bytes(site, gets):
    data = os.urandom(2 * 1024 * 1024 + 3)
    site.seed("photos/a b ü.jpg", data)
    site.seed("percent%20name.txt", b"a literal percent sign in the name")
    site.start()
    nginx, port = start_nginx(site.tmp, site.port, site.tmp)
    try:
        code, headers, body = request(port, "/uploads/photos/a%20b%20%C3%BC.jpg")
        assert code == 200, body[:300]
        assert body == data
        assert headers["content-type"] == "image/jpeg"
        assert (site.root / "photos" / "a b ü.jpg").read_bytes() == data
        # the next request is nginx's own, from disk: syncd sees no second request
        assert request(port, "/uploads/photos/a%20b%20%C3%BC.jpg")[::2] == (200, data)
        assert site.metric('syncd_served_total{source="remote"}') == 1
        assert site.metric('syncd_served_total{source="disk"}') == 0
        assert request(port, "/uploads/percent%2520name.txt")[::2] == (200, b"a literal percent sign in the name")
        assert request(port, "/uploads/nowhere.jpg")[0] == 404
        assert gets == Counter({("backups/uploads/photos/a b ü.jpg", "awscrt"): 1,
                                ("backups/uploads/percent%20name.txt", "awscrt"): 1})
    finally:
        nginx.send_signal(signal.SIGQUIT)  # graceful stop
        try:
            nginx.wait(10)
        except subprocess.TimeoutExpired:
            nginx.kill()
            nginx.wait(5)
