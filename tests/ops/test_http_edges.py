"""The HTTP endpoint's hostile edges (SPEC §2 `http_hosts`, §6): DNS rebinding (the `Host`
check), who may read `/status`, clients that hang up, IPv6 listen addresses, and quiet
on-demand restores. In-process against the real server, a real ledger and a `file://` remote."""

from __future__ import annotations

import hashlib
import http.client
import logging
import re
import socket
import struct
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from syncd import http as syncd_http
from syncd.config import load_config
from syncd.http import HttpEndpoint, trusted
from syncd.ledger import Ledger
from syncd.pool import Wake
from syncd.remote.local import LocalRemote
from syncd.transfers import Stats
from tests.conftest import free_port, wait_for, write_config
from tests.daemon_util import DaemonProc, http_get

NGINX_RECIPE = Path(__file__).resolve().parents[2] / "packaging" / "nginx" / "syncd-files.conf"
REBOUND = "attacker.example:9751"  # a hostile page's name that resolves to 127.0.0.1


class Site:
    """syncd's endpoint with `serve_files` over a stand-in daemon (real config, ledger, remote)."""

    def __init__(self, tmp: Path, listen: str = "127.0.0.1:0", **syncd: Any) -> None:
        self.tmp = tmp
        self.root = tmp / "up"
        self.root.mkdir()
        cfg_path = write_config(tmp / "s.toml", remote={"url": f"file://{tmp / 'remote'}"},
                                watches=[{"path": str(self.root), "prefix": "up"}],
                                syncd={"ledger": str(tmp / "l.db"), "serve_files": True,
                                       "health_listen": listen, **syncd})
        self.cfg = load_config(cfg_path)
        self.ledger = Ledger(self.cfg.ledger)
        self.ledger.ensure_watch("up", str(self.root))
        self.remote = LocalRemote(tmp / "remote")
        self.rescans: list[str] = []
        self.daemon = SimpleNamespace(
            cfg=self.cfg, ledger=self.ledger, stop=threading.Event(), health=lambda: (True, "ok"),
            last_reconcile_at=None, request_rescan=lambda reason, **_: self.rescans.append(reason),
            engine=SimpleNamespace(remote=self.remote, stats=Stats(), wake=Wake()))
        self.endpoint = HttpEndpoint(self.daemon, listen)  # type: ignore[arg-type]
        self.endpoint.start(self.daemon)  # type: ignore[arg-type]
        self.host, self.port = self.endpoint.address

    def ask(self, path: str, method: str = "GET", headers: dict[str, str] | None = None,
            body: bytes | None = None, connect: str | None = None) -> tuple[int, bytes]:
        """(status, body); `Host` is the address connected to unless `headers` give one."""
        conn = http.client.HTTPConnection(connect or self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def seed(self, rel: str, data: bytes) -> None:
        src = self.tmp / "seed.bin"
        src.write_bytes(data)
        self.remote.put(f"up/{rel}", src, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                        mtime_ns=1_600_000_000_000_000_000)
        src.unlink()

    def close(self) -> None:
        self.endpoint.stop()
        self.ledger.close()


@pytest.fixture
def site(tmp_path: Path):
    s = Site(tmp_path)
    yield s
    s.close()


def from_elsewhere(monkeypatch: pytest.MonkeyPatch, ip: str = "203.0.113.7") -> None:
    """Every client of the endpoint is seen as `ip` (a host on the network)."""
    accept = syncd_http._Server.get_request

    def get_request(self):
        sock, addr = accept(self)
        return sock, (ip, *addr[1:])

    monkeypatch.setattr(syncd_http._Server, "get_request", get_request)


def raw(port: int, request: bytes, host: str = "127.0.0.1") -> bytes:
    """What the server answers to `request` sent as is (HTTP/1.0: it closes when done)."""
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# --- the Host check (DNS rebinding) -------------------------------------------------------------

def test_a_rebinding_host_is_refused_the_page_status_files_and_actions(site):
    (site.root / "a.txt").write_bytes(b"private bytes")
    token = site.endpoint.server.console.token
    bad = {"Host": REBOUND}
    code, body = site.ask("/", headers=bad)
    assert code == 403 and token.encode() not in body and b"Host" in body
    assert site.ask("/status", headers=bad)[0] == 403
    code, body = site.ask("/files/up/a.txt", headers=bad)
    assert code == 403 and b"private bytes" not in body
    assert site.ask("/files/up/a.txt", "HEAD", headers=bad)[0] == 403
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    code, _ = site.ask("/actions/rescan", "POST", {**bad, **form}, f"token={token}".encode())
    assert code == 403 and site.rescans == []
    # what names nothing stays open (a probe through any name works)
    assert site.ask("/healthz", headers=bad)[0] == 200
    assert site.ask("/metrics", headers=bad)[0] == 200
    # the same requests under an accepted name are answered
    for host in (f"127.0.0.1:{site.port}", f"localhost:{site.port}", "LOCALHOST", "localhost.", "[::1]:80"):
        assert site.ask("/", headers={"Host": host})[0] == 200, host
    assert site.ask("/files/up/a.txt") == (200, b"private bytes")
    code, _ = site.ask("/actions/rescan", "POST", form, f"token={token}".encode())
    assert code == 303 and site.rescans == ["status page"]


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:80", "127.0.0.1.attacker.example",
                                  "localhost.attacker.example", "127.0.0.1:80@attacker.example",
                                  "[::1]x", "[::1", "::1", "", " "])
def test_host_ok_accepts_only_ip_literals_localhost_and_listed_names(host):
    assert not syncd_http.host_ok(host, ())


def test_host_ok_accepts_ip_literals_localhost_and_listed_names():
    for host in ("127.0.0.1", "127.0.0.1:9750", "10.1.2.3:80", "[::1]", "[::1]:9750", "[fe80::1%25eth0]:1",
                 "localhost", "localhost:9750", "LocalHost.", None):
        assert syncd_http.host_ok(host, ()), host
    assert syncd_http.host_ok("syncd.internal:9750", ("syncd.internal",))
    assert syncd_http.host_ok("SYNCD.internal.", ("syncd.internal",))
    assert not syncd_http.host_ok("evil.syncd.internal", ("syncd.internal",))
    assert not syncd_http.host_ok("syncd.internal.evil", ("syncd.internal",))


def test_a_name_listed_in_http_hosts_is_accepted(tmp_path):
    s = Site(tmp_path, http_hosts=["syncd.internal", "Backup-Box"])
    try:
        assert s.ask("/status", headers={"Host": f"syncd.internal:{s.port}"})[0] == 200
        assert s.ask("/status", headers={"Host": "backup-box"})[0] == 200
        assert s.ask("/status", headers={"Host": "other.internal"})[0] == 403
    finally:
        s.close()


def test_a_request_without_a_host_header_is_answered_and_two_are_refused(site):
    # HTTP/1.0 tools may send none; no browser omits it, so it cannot be a rebinding page
    assert status_of(raw(site.port, b"GET /status HTTP/1.0\r\n\r\n")) == 200
    two = f"GET /status HTTP/1.0\r\nHost: 127.0.0.1\r\nHost: {REBOUND}\r\n\r\n".encode()
    assert status_of(raw(site.port, two)) == 403


def test_the_bearer_token_does_not_lift_the_host_check(site, monkeypatch):
    from_elsewhere(monkeypatch)
    monkeypatch.setenv(syncd_http.TOKEN_ENV, "s3cret-operator-token")
    bearer = {"Authorization": "Bearer s3cret-operator-token"}
    assert site.ask("/status", headers=bearer)[0] == 200
    assert site.ask("/status", headers={**bearer, "Host": REBOUND})[0] == 403


def test_the_nginx_recipe_sends_a_host_the_endpoint_accepts():
    # nginx's default `Host` is the upstream's name ("syncd"): the recipe must set one
    sets = re.findall(r"^\s*proxy_set_header\s+Host\s+(\S+?);", NGINX_RECIPE.read_text(), re.M)
    assert sets and all(syncd_http.host_ok(h, ()) for h in sets), sets


# --- who may read /status -------------------------------------------------------------------------

def test_status_is_refused_to_a_non_loopback_client_without_the_token(site, monkeypatch):
    (site.root / "secret-name.pdf").write_bytes(b"x")
    site.ledger.upsert_many([{"watch": "up", "path": "secret-name.pdf", "state": "failed", "op": "put",
                              "attempts": 1, "last_error": "AccessDenied", "error_kind": "denied",
                              "updated_at": 1.0, "due_at": 1.0, "size": 1}])
    from_elsewhere(monkeypatch)
    monkeypatch.delenv(syncd_http.TOKEN_ENV, raising=False)
    code, body = site.ask("/status")
    assert code == 403 and b"secret-name" not in body
    assert site.ask("/healthz")[0] == 200 and site.ask("/metrics")[0] == 200  # counts, no names
    monkeypatch.setenv(syncd_http.TOKEN_ENV, "s3cret-operator-token")
    assert site.ask("/status", headers={"Authorization": "Bearer nope"})[0] == 403
    code, body = site.ask("/status", headers={"Authorization": "Bearer s3cret-operator-token"})
    assert code == 200 and b"secret-name.pdf" in body


# --- clients that hang up ------------------------------------------------------------------------

def hang_up(port: int, path: str) -> None:
    """Send a request and reset the connection (SO_LINGER 0: RST) without reading the answer."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        s.close()


def test_clients_that_hang_up_leave_no_traceback_and_no_error(site, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    (site.root / "a.txt").write_bytes(b"x" * 200_000)
    for _ in range(15):
        for path in ("/healthz", "/metrics", "/status", "/", "/files/up/a.txt"):
            hang_up(site.port, path)
    wait_for(lambda: site.ask("/healthz")[0] == 200, 10, what="the endpoint still answers")
    site.endpoint.stop()  # joins every request thread: all of them have logged what they would
    loud = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records
            if r.levelno >= logging.WARNING or r.exc_info]
    assert loud == []
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err


def test_a_daemon_whose_clients_hang_up_logs_no_traceback(tmp_path):
    port = free_port()
    (tmp_path / "up").mkdir()
    cfg = write_config(tmp_path / "s.toml", remote={"url": f"file://{tmp_path / 'remote'}"},
                       watches=[{"path": str(tmp_path / "up"), "prefix": "up"}],
                       syncd={"ledger": str(tmp_path / "l.db"), "health_listen": f"127.0.0.1:{port}"})
    d = DaemonProc(cfg, tmp_path / "l.db", tmp_path / "d.log").start()
    try:
        d.wait_ready()
        for _ in range(10):
            for path in ("/healthz", "/metrics", "/status", "/"):
                hang_up(port, path)
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200, 10, what="still answering")
    finally:
        assert d.stop() == 0, d.log()
    log = d.log()
    assert not re.search(r"Traceback|Exception occurred| (ERROR|WARNING) ", log), log


# --- IPv6 ------------------------------------------------------------------------------------------

def ipv6_missing() -> str | None:
    """Why this host cannot serve on ::1, or None."""
    if not socket.has_ipv6:
        return "Python was built without IPv6"
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as e:
        return f"this host has no IPv6 loopback (binding ::1: {e.strerror or e})"
    return None


def test_loopback_includes_ipv4_mapped_and_ipv6_loopback():
    assert trusted("::1", None, env={})
    assert trusted("::ffff:127.0.0.1", None, env={})  # an IPv4 client of a dual-stack socket
    assert not trusted("::ffff:203.0.113.7", None, env={})
    assert not trusted("2001:db8::1", None, env={})


def test_an_ipv6_loopback_listen_address_serves_and_trusts_its_clients(tmp_path):
    if why := ipv6_missing():
        pytest.skip(why)
    s = Site(tmp_path, listen="[::1]:0")
    try:
        assert s.host == "::1"
        assert s.ask("/healthz")[0] == 200
        assert s.ask("/status")[0] == 200  # from ::1, Host [::1]:PORT
        assert s.ask("/status", headers={"Host": REBOUND})[0] == 403
    finally:
        s.close()


def test_the_ipv6_any_address_also_serves_ipv4_clients(tmp_path, monkeypatch):
    if why := ipv6_missing():
        pytest.skip(why)
    s = Site(tmp_path, listen="[::]:0")
    try:
        assert s.ask("/status", connect="::1")[0] == 200
        # dual-stack: an IPv4 loopback client arrives as ::ffff:127.0.0.1, still loopback
        assert s.ask("/status", connect="127.0.0.1")[0] == 200
        from_elsewhere(monkeypatch, "::ffff:203.0.113.7")
        monkeypatch.delenv(syncd_http.TOKEN_ENV, raising=False)
        assert s.ask("/status", connect="127.0.0.1")[0] == 403
    finally:
        s.close()


def test_syncd_run_serves_on_an_ipv6_listen_address(tmp_path):
    if why := ipv6_missing():
        pytest.skip(why)
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "up").mkdir()
    cfg = write_config(tmp_path / "s.toml", remote={"url": f"file://{tmp_path / 'remote'}"},
                       watches=[{"path": str(tmp_path / "up"), "prefix": "up"}],
                       syncd={"ledger": str(tmp_path / "l.db"), "health_listen": f"[::1]:{port}"})
    d = DaemonProc(cfg, tmp_path / "l.db", tmp_path / "d.log").start()
    try:
        d.wait_ready()
        assert http_get(f"http://[::1]:{port}/healthz") == (200, "ok\n")
        assert http_get(f"http://[::1]:{port}/status")[0] == 200
        assert f"health endpoint on http://[::1]:{port}/healthz" in d.log()
    finally:
        assert d.stop() == 0, d.log()


def test_ipv6_listen_addresses_pass_validation_and_need_brackets(tmp_path):
    (tmp_path / "up").mkdir()
    for listen in ("[::1]:9762", "[::]:9762"):
        cfg = write_config(tmp_path / "s.toml", remote={"url": f"file://{tmp_path / 'remote'}"},
                           watches=[{"path": str(tmp_path / "up")}], syncd={"health_listen": listen})
        assert load_config(cfg).health_listen == listen


# --- on-demand restores are debug lines; the counts are metrics ------------------------------------

def test_an_on_demand_restore_logs_no_info_line_and_is_counted(site, caplog):
    site.seed("b.txt", b"from the remote")
    caplog.set_level(logging.INFO)
    assert site.ask("/files/up/b.txt") == (200, b"from the remote")
    assert [r.getMessage() for r in caplog.records if r.name == "syncd.files"] == []
    metrics = site.ask("/metrics")[1].decode()
    assert 'syncd_served_total{source="remote"} 1.0' in metrics
