"""The HTTP endpoint, status, retry, healthcheck pings and log hygiene (SPEC §3, §6)."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import boto3
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import _new_bucket, free_port, wait_for, write_config
from tests.daemon_util import DaemonProc, write_file
from tests.daemon_util import http_get as get
from tests.ops.test_check_iam import iam_user  # noqa: F401 - fixture


def metrics(url: str) -> dict[str, float]:
    code, text = get(url + "/metrics")
    assert code == 200
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def daemon_cfg(tmp_path, endpoint: str, bucket: str, **syncd_opts):
    port = free_port()
    opts = {"ledger": str(tmp_path / "l.db"), "settle_seconds": 0.2, "workers": 2,
            "health_listen": f"127.0.0.1:{port}", "rescan_interval": 0}
    opts.update(syncd_opts)
    cfg = write_config(tmp_path / "s.toml", remote={"url": f"s3://{bucket}/b", "endpoint_url": endpoint},
                       watches=[{"path": str(tmp_path / "up"), "prefix": "up"}], syncd=opts)
    (tmp_path / "up").mkdir(exist_ok=True)
    return cfg, f"http://127.0.0.1:{port}"


def test_metrics_parse_and_move_and_healthz_follows_the_remote(tmp_path):
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    bucket = _new_bucket(boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1"))
    cfg, url = daemon_cfg(tmp_path, endpoint, bucket, max_backlog_age=2)
    d = DaemonProc(cfg, tmp_path / "l.db", tmp_path / "d.log").start()
    try:
        d.wait_ready()
        wait_for(lambda: get(url + "/healthz")[0] == 200, 30, what="healthy")
        before = metrics(url)
        assert before["syncd_uploads_total"] == 0
        write_file(tmp_path / "up/a.bin", b"x" * 1000)
        wait_for(lambda: metrics(url)["syncd_uploads_total"] == 1, 30, what="upload counted")
        m = metrics(url)
        assert m["syncd_upload_bytes_total"] == 1000
        assert m["syncd_files{state=synced,watch=up}"] == 1
        assert m["syncd_last_success_timestamp_seconds"] > 0
        code, status = get(url + "/status")
        assert code == 200 and json.loads(status)["watches"][0]["counts"]["synced"] == 1

        server.stop()
        write_file(tmp_path / "up/b.bin", b"y" * 10)
        code, reason = wait_for(lambda: (r := get(url + "/healthz"))[0] == 503 and r, 60, 0.2,
                                "503 while the remote is down")
        assert "remote failing" in reason or "waited" in reason
        assert metrics(url).get("syncd_failures_total{reason=unreachable}", 0) >= 1
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        wait_for(lambda: get(url + "/healthz")[0] == 200, 120, 0.5, "200 after the remote is back")
        assert metrics(url)["syncd_uploads_total"] == 2
    finally:
        assert d.stop() == 0, d.log()
        server.stop()


def test_status_json_matches_the_ledger_through_failure_and_retry(tmp_path, moto_server, iam_user, syncd):  # noqa: F811
    cfg, url = daemon_cfg(tmp_path, moto_server, iam_user["bucket"])
    d = DaemonProc(cfg, tmp_path / "l.db", tmp_path / "d.log").start()
    try:
        d.wait_ready()
        for i in range(3):
            write_file(tmp_path / f"up/f{i}.txt", b"data")
        wait_for(lambda: d.states().get("failed") == 3, 30, what="denied uploads failed")
        st = json.loads(syncd("--config", str(cfg), "status", "--json").out)
        assert st["daemon"]["running"] is True and st["daemon"]["pid"] == d.proc.pid
        w = st["watches"][0]
        assert w["counts"]["failed"] == 3 and w["failures_total"] == 3
        assert {f["error"] for f in w["failures"]} == {"AccessDenied: s3:PutObject"}
        assert all(f["attempts"] == 1 for f in w["failures"])
        assert json.loads(get(url + "/status")[1])["watches"][0]["counts"] == w["counts"]
        code, _ = get(url + "/healthz")
        from syncd.config import load_config
        from syncd.iam import policy

        iam_user["grant"](policy(load_config(cfg)))
        r = syncd("--config", str(cfg), "retry")
        assert r.code == 0 and "re-queued 3" in r.out
        wait_for(lambda: d.states().get("synced") == 3, 30, what="retried uploads synced")
        w = json.loads(syncd("--config", str(cfg), "status", "--json").out)["watches"][0]
        assert w["counts"]["synced"] == 3 and w["counts"]["failed"] == 0 and w["failures"] == []
        assert w["last_success"] is not None
    finally:
        assert d.stop() == 0, d.log()
    st = json.loads(syncd("--config", str(cfg), "status", "--json").out)
    assert st["daemon"] == {"running": False, "pid": None}
    log = (tmp_path / "d.log").read_text()
    assert log.count("AccessDenied: s3:PutObject (e.g.") == 1  # one line per cause, not per file
    # no credential ever reaches a log
    import os

    assert os.environ["AWS_ACCESS_KEY_ID"] not in log and os.environ["AWS_SECRET_ACCESS_KEY"] not in log


class _Pings(BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        _Pings.seen.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a) -> None:
        pass


@pytest.fixture
def ping_server():
    _Pings.seen = []
    srv = HTTPServer(("127.0.0.1", 0), _Pings)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/ping/abc", _Pings.seen
    srv.shutdown()
    srv.server_close()


def test_healthcheck_pings_after_good_and_bad_reconciles(tmp_path, syncd, ping_server):
    url, seen = ping_server
    root = tmp_path / "up"
    root.mkdir()
    (root / "ok.txt").write_text("fine")
    cfg = write_config(tmp_path / "s.toml", remote={"url": f"file://{tmp_path / 'remote'}"},
                       watches=[{"path": str(root), "prefix": "up"}],
                       syncd={"ledger": str(tmp_path / "l.db"), "settle_seconds": 0, "healthcheck_url": url})
    assert syncd("--config", str(cfg), "resync").code == 0
    assert seen == ["/ping/abc"]
    with open(os.fsencode(root) + b"/bad-\xff", "wb") as f:
        f.write(b"x")
    assert syncd("--config", str(cfg), "resync").code == 1
    assert seen == ["/ping/abc", "/ping/abc/fail"]


def test_daemon_pings_after_its_startup_reconcile(tmp_path, ping_server):
    url, seen = ping_server
    (tmp_path / "up").mkdir()
    cfg = write_config(tmp_path / "s.toml", remote={"url": f"file://{tmp_path / 'remote'}"},
                       watches=[{"path": str(tmp_path / "up"), "prefix": "up"}],
                       syncd={"ledger": str(tmp_path / "l.db"), "settle_seconds": 0, "healthcheck_url": url,
                              "health_listen": ""})
    d = DaemonProc(cfg, tmp_path / "l.db", tmp_path / "d.log").start()
    try:
        d.wait_ready()
        wait_for(lambda: "/ping/abc" in seen, 30, what="ping")
    finally:
        assert d.stop() == 0


def test_a_failing_ping_changes_nothing(tmp_path, syncd):
    root = tmp_path / "up"
    root.mkdir()
    (root / "a").write_text("a")
    cfg = write_config(tmp_path / "s.toml", remote={"url": f"file://{tmp_path / 'remote'}"},
                       watches=[{"path": str(root), "prefix": "up"}],
                       syncd={"ledger": str(tmp_path / "l.db"), "settle_seconds": 0,
                              "healthcheck_url": f"http://127.0.0.1:{free_port()}/nothing"})
    r = syncd("--config", str(cfg), "resync")
    assert r.code == 0 and "uploaded 1" in r.out and "healthcheck ping" in r.err


def test_json_logs_are_one_object_per_line(tmp_path, syncd):
    (tmp_path / "up").mkdir()
    (tmp_path / "up/x").write_text("x")
    cfg = write_config(tmp_path / "s.toml", remote={"url": f"file://{tmp_path / 'remote'}"},
                       watches=[{"path": str(tmp_path / "up"), "prefix": "up"}],
                       syncd={"ledger": str(tmp_path / "l.db"), "settle_seconds": 0, "log_format": "json",
                              "log_level": "debug"})
    r = syncd("--config", str(cfg), "resync")
    assert r.code == 0
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert lines and all(json.loads(ln)["level"] for ln in lines)


def test_health_listen_in_use_exits_2(tmp_path, syncd):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = write_config(tmp_path / "s.toml", remote={"url": f"file://{tmp_path / 'remote'}"},
                           watches=[{"path": str(tmp_path / "up"), "prefix": "up"}],
                           syncd={"ledger": str(tmp_path / "l.db"), "health_listen": f"127.0.0.1:{port}"})
        r = syncd("--config", str(cfg), "run")
    assert r.code == 2 and "health_listen" in r.err and len(r.err.strip().splitlines()) == 1


import os  # noqa: E402


def test_run_waits_for_an_unreachable_remote_instead_of_exiting(tmp_path):
    from moto.server import ThreadedMotoServer

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    cfg, url = daemon_cfg(tmp_path, endpoint, "later-bucket")
    d = DaemonProc(cfg, tmp_path / "l.db", tmp_path / "d.log").start()
    server = None
    try:
        code, reason = wait_for(lambda: (r := get(url + "/healthz"))[0] == 503 and r, 60, 0.2, "starting")
        assert reason.startswith("starting")
        wait_for(lambda: "remote not usable" in d.log(), 60, 0.2, "the failure is logged")
        assert d.alive()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="later-bucket")
        d.wait_ready(timeout=120)
        wait_for(lambda: get(url + "/healthz")[0] == 200, 60, 0.2, "healthy")
    finally:
        assert d.stop() == 0, d.log()
        if server is not None:
            server.stop()
