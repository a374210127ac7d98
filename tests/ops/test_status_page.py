"""GET / (the status page) and its POST actions (SPEC §6): in-process against a real ledger, and
in headless Chromium against a running daemon (issue 15, acceptance 1)."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from syncd import http
from syncd.config import load_config
from syncd.http import HttpEndpoint
from syncd.ledger import Ledger
from syncd.page import Console, render, text
from syncd.pool import Wake
from syncd.transfers import Stats
from tests.conftest import wait_for, write_config
from tests.daemon_util import DaemonProc, write_file
from tests.ops.test_check_iam import iam_user  # noqa: F401 - fixture
from tests.ops.test_endpoint_status import daemon_cfg, get

HOSTILE = '<img src=x onerror=alert(1)> & "q\'.txt'


def request(url: str, method: str = "GET", data: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    """One request that does not follow redirects: (status, headers, body)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a: Any, **k: Any) -> None:
            return None

    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.build_opener(NoRedirect).open(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


class FakeDaemon:
    """What the endpoint asks of a daemon, over a real ledger and config."""

    def __init__(self, tmp: Path) -> None:
        (tmp / "up").mkdir()
        cfg_path = write_config(tmp / "s.toml", remote={"url": f"file://{tmp / 'remote'}"},
                                watches=[{"path": str(tmp / "up"), "prefix": "up"}],
                                syncd={"ledger": str(tmp / "l.db"), "health_listen": "127.0.0.1:0"})
        self.cfg = load_config(cfg_path)
        self.ledger = Ledger(self.cfg.ledger)
        self.ledger.ensure_watch("up", str(tmp / "up"))
        self.engine = type("E", (), {"wake": Wake(), "stats": Stats()})()
        self.rescans: list[str] = []

    def health(self) -> tuple[bool, str]:
        return False, "a pending file has waited 9999s (max_backlog_age) <b>"

    def request_rescan(self, reason: str, *, asked: bool = False) -> None:
        self.rescans.append(reason)

    def fail(self, path: str, error: str) -> None:
        now = time.time()
        self.ledger.upsert_many([{"watch": "up", "path": path, "state": "failed", "op": "put", "attempts": 7,
                                  "last_error": error, "error_kind": "denied", "updated_at": now,
                                  "due_at": now + 3600, "size": 1}])

    def row(self, path: str) -> dict[str, Any]:
        row = self.ledger.get("up", path)
        assert row is not None
        return row


@pytest.fixture
def endpoint(tmp_path: Path):
    d = FakeDaemon(tmp_path)
    ep = HttpEndpoint(d, "127.0.0.1:0")  # type: ignore[arg-type]
    ep.start(d)  # type: ignore[arg-type]
    try:
        yield d, ep, "http://{}:{}".format(*ep.address)
    finally:
        ep.stop()
        d.ledger.close()


def token_of(page: str) -> str:
    marker = 'name="token" value="'
    return page[page.index(marker) + len(marker):].split('"', 1)[0]


def test_page_escapes_hostile_names_and_errors(endpoint):
    d, _, url = endpoint
    names = [HOSTILE, "evil\u202egnp.exe", "bell\x07\x1b[31m", "bad-\\xff", "</td></tr></table><script>x()</script>"]
    for n in names:
        d.fail(n, f"AccessDenied: s3:PutObject <script>{n}</script>")
    code, headers, page = request(url + "/")
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none': no script
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert headers["Cache-Control"] == "no-store"
    assert "<script" not in page and "<img" not in page and "<b>" not in page
    assert "\u202e" not in page and "\x1b" not in page and "\x07" not in page
    for n in names:
        assert text(n) in page
    assert "evil\\u202egnp.exe" in page and "bell\\x07\\x1b[31m" in page
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; &quot;q&#x27;.txt" in page
    assert '<meta name="viewport"' in page and 'http-equiv="refresh"' in page
    assert "Unhealthy (5 failed): a pending file has waited 9999s (max_backlog_age) &lt;b&gt;" in page
    assert request(url + "/", method="HEAD")[0] == 200


def test_page_shows_what_status_says_per_watch(endpoint):
    d, _, url = endpoint
    d.fail("a.txt", "AccessDenied: s3:PutObject")
    status = json.loads(get(url + "/status")[1])
    page = request(url + "/")[2]
    for state, n in status["watches"][0]["counts"].items():
        assert f'<td>{state}</td><td class="n" data-state="{state}">{n}</td>' in page
    assert '<b class="failures-total">1</b>' in page and "<td class=\"err\">AccessDenied: s3:PutObject</td>" in page
    assert "Last success: <span class=\"last-success\">never</span>" in page
    # shown exactly when the status data has it (the listing reconcile reports it, SPEC §3)
    assert ("Last remote listing" in page) == ("last_listing" in status["watches"][0])


def test_last_listing_is_rendered_when_the_status_data_has_it():
    w = {"prefix": "up", "path": "/x", "counts": {"synced": 1}, "backlog": 0, "oldest_pending_age_s": None,
         "last_success": "2026-01-01T00:00:00Z", "failures": [], "failures_total": 0,
         "last_listing": "2026-01-02T03:04:05Z"}
    page = render({"daemon": {"running": True, "pid": 1}, "watches": [w]}, True, "ok", "t")
    assert ('Last remote listing: <span class="last-listing"><time datetime="2026-01-02T03:04:05Z" '
            'title="2026-01-02 03:04:05 UTC">') in page
    w["last_listing"] = {"at": "2026-01-02T03:04:05Z", "objects": 3}
    page = render({"daemon": {"running": True, "pid": 1}, "watches": [w]}, True, "ok", "t")
    assert "at: 2026-01-02T03:04:05Z, objects: 3" in page


def test_retry_and_rescan_need_the_page_token(endpoint):
    d, ep, url = endpoint
    d.fail("a.txt", "AccessDenied: s3:PutObject")
    before = d.row("a.txt")
    form = "application/x-www-form-urlencoded"
    for body in (b"", b"token=wrong", b"other=1"):  # nothing done; back to the page, which says so
        code, headers, _ = request(url + "/actions/retry", "POST", body, {"Content-Type": form})
        assert code == 303 and headers["Location"] == "/?stale=1"
    assert request(url + "/actions/rescan", "POST", b"token=x", {"Content-Type": form})[0] == 303
    assert request(url + "/actions/retry", "POST", b"token=" + b"a" * 5000, {"Content-Type": form})[0] == 413
    assert d.row("a.txt") == before and d.rescans == []

    token = token_of(request(url + "/")[2])
    assert token == ep.server.console.token and len(token) >= 32
    seen = d.engine.wake.seen()
    code, headers, _ = request(url + "/actions/retry", "POST", f"token={token}".encode(), {"Content-Type": form})
    assert code == 303 and headers["Location"] == "/?requeued=1"
    row = d.row("a.txt")
    assert row["state"] == "pending" and row["attempts"] == 0 and row["gen"] > before["gen"]
    assert d.engine.wake.seen() > seen  # the workers are woken, not left to their idle wait
    assert "Re-queued 1 failed files." in request(url + "/?requeued=1")[2]
    code, headers, _ = request(url + "/actions/rescan", "POST", f"token={token}".encode(), {"Content-Type": form})
    assert code == 303 and headers["Location"] == "/?rescan=1" and d.rescans == ["status page"]
    assert request(url + "/actions/nothing", "POST", f"token={token}".encode())[0] == 404


def test_each_process_gets_its_own_token(tmp_path):
    assert Console(object()).token != Console(object()).token  # type: ignore[arg-type]


def test_page_and_actions_refused_from_a_non_loopback_address(endpoint, monkeypatch):
    d, ep, url = endpoint
    d.fail("a.txt", "AccessDenied: s3:PutObject")
    before = d.row("a.txt")
    token = ep.server.console.token
    accept = http._Server.get_request

    def from_elsewhere(self):  # the peer as a host on the network would be seen
        sock, addr = accept(self)
        return sock, ("203.0.113.7", addr[1])

    monkeypatch.setattr(http._Server, "get_request", from_elsewhere)
    monkeypatch.delenv(http.TOKEN_ENV, raising=False)
    assert request(url + "/status")[0] == 403  # it lists file names and errors (SPEC §6)
    assert request(url + "/")[0] == 403
    for action in ("retry", "rescan"):
        code, _, msg = request(url + f"/actions/{action}", "POST", f"token={token}".encode())
        assert code == 403 and "loopback" in msg
    assert d.row("a.txt") == before and d.rescans == []

    monkeypatch.setenv(http.TOKEN_ENV, "s3cret-operator-token")
    wrong = {"Authorization": "Bearer nope"}
    assert request(url + "/", headers=wrong)[0] == 403
    assert request(url + "/actions/retry", "POST", f"token={token}".encode(), wrong)[0] == 403
    bearer = {"Authorization": "Bearer s3cret-operator-token"}
    assert request(url + "/", headers=bearer)[0] == 200
    assert request(url + "/actions/retry", "POST", b"token=wrong", bearer)[1]["Location"] == "/?stale=1"
    assert d.row("a.txt") == before  # still needs the form token
    assert request(url + "/actions/retry", "POST", f"token={token}".encode(), bearer)[0] == 303
    assert d.row("a.txt")["state"] == "pending"


# --- headless Chromium against a running daemon ---------------------------------------------------

CHROMIUM = os.environ.get("SYNCD_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SYNCD_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-quic", "--window-size=412,1100")  # a phone's width


@pytest.fixture
def chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("the browser test needs selenium (pip install -e '.[test]')")
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.access(p, os.X_OK) or shutil.which(p))]
    if missing:
        pytest.skip(f"the browser test needs Debian's chromium and chromium-driver ({', '.join(missing)} "
                    f"missing): apt-get install chromium chromium-driver")
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must never download a browser or driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=opts, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def _snapshot(driver) -> dict[str, Any] | None:
    """What the loaded page shows; None when its 5 s refresh replaced it while being read."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return {
            "counts": {td.get_attribute("data-state"): int(td.text)
                       for td in driver.find_elements(By.CSS_SELECTOR, "table.counts td[data-state]")},
            "backlog": driver.find_element(By.CLASS_NAME, "backlog").text,
            "failures": {tr.find_element(By.CLASS_NAME, "p").text: tr.find_element(By.CLASS_NAME, "err").text
                         for tr in driver.find_elements(By.CSS_SELECTOR, "table.failures tr:has(td)")},
            "health": driver.find_element(By.ID, "health").text,
            "images": len(driver.find_elements(By.TAG_NAME, "img")),
        }
    except (StaleElementReferenceException, NoSuchElementException):
        return None


def test_browser_shows_the_daemon_and_retry_requeues_the_failed_file(
        tmp_path, moto_server, iam_user, chromium):  # noqa: F811
    from selenium.webdriver.common.by import By

    from syncd.iam import policy

    cfg, url = daemon_cfg(tmp_path, moto_server, iam_user["bucket"])
    d = DaemonProc(cfg, tmp_path / "l.db", tmp_path / "d.log").start()
    try:
        d.wait_ready()
        write_file(tmp_path / "up" / HOSTILE, b"data")
        write_file(tmp_path / "up/fine.txt", b"ok")
        wait_for(lambda: d.states().get("failed") == 2, 30, what="denied uploads failed")

        chromium.get(url + "/")
        page = wait_for(lambda: _snapshot(chromium), 10, what="the page read")
        status = json.loads(get(url + "/status")[1])["watches"][0]
        assert page["counts"] == status["counts"] and page["backlog"] == str(status["backlog"])
        assert page["failures"] == {HOSTILE: "AccessDenied: s3:PutObject", "fine.txt": "AccessDenied: s3:PutObject"}
        assert page["images"] == 0  # the name is text, not markup
        assert page["health"].endswith(get(url + "/healthz")[1].strip())
        shot = tmp_path / "status-page.png"
        assert chromium.save_screenshot(str(shot)) and shot.stat().st_size > 1000
        print(f"screenshot: {shot}")

        before = d.query("SELECT gen, attempts, state FROM files WHERE path=?", (HOSTILE,))[0]
        assert before[1] >= 1 and before[2] == "failed"
        # the same form without the page's token is refused and changes nothing
        code, headers, _ = request(url + "/actions/retry", "POST", b"token=guessed")
        assert code == 303 and headers["Location"] == "/?stale=1"
        assert d.query("SELECT gen, attempts, state FROM files WHERE path=?", (HOSTILE,))[0] == before

        iam_user["grant"](policy(load_config(cfg)))
        chromium.find_element(By.ID, "retry").click()
        # the 303 leads back to the page, which says what was done
        wait_for(lambda: chromium.current_url == url + "/?requeued=2"
                 and "Re-queued 2 failed files." in chromium.page_source, 10, what="the retry notice")
        wait_for(lambda: d.states().get("synced") == 2, 30, what="retried uploads synced")
        after = d.query("SELECT gen, attempts, state FROM files WHERE path=?", (HOSTILE,))[0]
        assert after[0] > before[0] and after[2] == "synced"

        chromium.find_element(By.ID, "rescan").click()
        wait_for(lambda: "Rescan requested" in chromium.page_source, 10, what="the rescan notice")
        wait_for(lambda: "full rescan requested: status page" in d.log(), 10, what="the rescan ran")
        chromium.get(url + "/")
        page = wait_for(lambda: _snapshot(chromium), 10, what="the page read")
        assert page["counts"] == json.loads(get(url + "/status")[1])["watches"][0]["counts"]
        assert page["failures"] == {} and "No failed files." in chromium.page_source
    finally:
        assert d.stop() == 0, d.log()


def test_a_refused_post_body_is_never_read_as_a_second_request(endpoint, monkeypatch):
    import socket

    _, ep, _ = endpoint
    accept = http._Server.get_request
    monkeypatch.setattr(http._Server, "get_request",
                        lambda self: (lambda s, a: (s, ("203.0.113.7", a[1])))(*accept(self)))
    hidden = b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"
    for route in (b"/actions/retry", b"/nothing"):
        with socket.create_connection(ep.address, timeout=5) as s:
            s.sendall(b"POST " + route + b" HTTP/1.1\r\nHost: x\r\nContent-Length: "
                      + str(len(hidden)).encode() + b"\r\n\r\n" + hidden)
            got = b""
            try:
                while chunk := s.recv(65536):
                    got += chunk
            except TimeoutError:
                pass
        assert got.startswith(b"HTTP/1.1 403") and got.count(b"HTTP/1.1 ") == 1, got


def test_the_backlog_counts_the_files_found_while_the_remote_fails_at_start(tmp_path):
    """A first start with 30 files and an unreachable remote: the page says 30 are waiting, not 0;
    when the remote comes, they are uploaded."""
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.conftest import free_port

    port = free_port()  # nothing listens there yet: the remote is unreachable
    endpoint, bucket = f"http://127.0.0.1:{port}", "syncd-late-remote"
    cfg, url = daemon_cfg(tmp_path, endpoint, bucket)
    for i in range(30):
        write_file(tmp_path / "up" / f"d{i % 3}/f{i}.txt", b"x")
    d = DaemonProc(cfg, tmp_path / "l.db", tmp_path / "d.log").start()
    server = None
    try:
        wait_for(lambda: "remote not usable" in get(url + "/healthz")[1], 30, 0.2, "the remote failing at start")
        status = wait_for(lambda: (w := json.loads(get(url + "/status")[1])["watches"][0])["backlog"] == 30 and w,
                          30, 0.2, "the backlog to count the files found")
        assert status["counts"]["pending"] == 30
        assert '<b class="backlog">30</b>' in request(url + "/")[2]

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        d.wait_ready(120)
        wait_for(lambda: d.states().get("synced") == 30, 60, 0.2, "the 30 files uploaded")
    finally:
        assert d.stop() == 0, d.log()
        if server is not None:
            server.stop()
