"""The status page as an operator reads it (issue 23, SPEC §6): failures in the headline even while
/healthz is 200, times as "5 min ago", a phone's width, the last hour as a picture, and a button
from a page older than the daemon. First the HTML (cheap), then headless Chromium against a
running daemon."""

from __future__ import annotations

import re
import time
from typing import Any

from syncd.history import MINUTES, History, Sample, picture, verdict
from syncd.page import CSS, render
from tests.conftest import free_port, wait_for, write_config
from tests.daemon_util import DaemonProc, write_file
from tests.ops.test_status_page import chromium, endpoint, request, token_of  # noqa: F401 - fixtures

NOW = 1_795_000_000.0  # 2026-11-18T11:06:40Z


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def status(failed: int = 0, **watch: Any) -> dict[str, Any]:
    fails = [{"path": f"photos/2026/11/f{i}.jpg", "error": "AccessDenied: s3:PutObject", "attempts": 4,
              "updated_at": iso(NOW - 7500)} for i in range(min(failed, 20))]
    w = {"prefix": "up", "path": "/srv/app/uploads", "counts": {"pending": 0, "synced": 5, "failed": failed},
         "backlog": 0, "oldest_pending_age_s": None, "last_success": iso(NOW - 300), "failures": fails,
         "failures_total": failed, "last_listing": None, **watch}
    return {"daemon": {"running": True, "pid": 7}, "watches": [w]}


def title(page: str) -> str:
    return page.split("<title>", 1)[1].split("</title>", 1)[0]


def banner(page: str) -> tuple[str, str]:
    m = re.search(r'<div id="health" class="banner (\w+)">([^<]*)</div>', page)
    assert m, page
    return m.group(1), m.group(2)


# --- the HTML --------------------------------------------------------------------------------------


def test_failed_files_make_the_banner_amber_and_the_title_say_how_many_while_healthz_is_200():
    page = render(status(failed=7), True, "ok", "t", now=NOW)
    assert title(page) == "syncd: 7 failed"
    tone, text = banner(page)
    assert tone == "warn" and text.startswith("7 failed") and text.endswith("ok")
    # green only without failures; red (with the count) for what /healthz answers 503
    assert banner(render(status(), True, "ok", "t", now=NOW)) == ("ok", "Healthy: ok")
    assert title(render(status(), True, "ok", "t", now=NOW)) == "syncd: ok"
    page = render(status(failed=3), False, "watcher is down", "t", now=NOW)
    assert title(page) == "syncd: unhealthy, 3 failed"
    assert banner(page) == ("bad", "Unhealthy (3 failed): watcher is down")
    assert ".warn{" in CSS


def test_times_read_as_minutes_ago_with_the_exact_time_beside_or_on_hover():
    page = render(status(failed=1, last_listing=iso(NOW - 3 * 86400)), True, "ok", "t", now=NOW)
    exact = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(NOW - 300))
    assert (f'<span class="last-success"><time datetime="{iso(NOW - 300)}" title="{exact}">5 min ago</time> '
            f'<span class="muted exact">({exact})</span></span>') in page
    assert f'<time datetime="{iso(NOW - 7500)}" title="' in page and ">2 h 5 min ago</time>" in page
    assert ">3 days ago</time>" in page
    data = status()
    data["daemon"]["remote_error"] = {"error": "Unreachable: <x>", "since": iso(NOW - 1320)}
    page = render(data, True, "starting: other", "t", now=NOW)
    assert ">22 min ago</time>): Unreachable: &lt;x&gt; (retrying)</p>" in page
    assert "remote-error" not in render(data, False, "remote failing for 1320s: Unreachable: <x>", "t", now=NOW)
    assert "time,.exact{white-space:nowrap}" in CSS  # never wrapped inside a timestamp
    assert "Last try (UTC)" not in page


def test_names_break_after_slashes_and_failures_become_blocks_on_a_narrow_screen():
    page = render(status(failed=1), True, "ok", "t", now=NOW)
    assert '<td class="p">photos/<wbr>2026/<wbr>11/<wbr>f0.jpg</td>' in page
    assert "break-all" not in CSS  # broke names every few characters in a narrow column
    assert "@media (max-width:40rem)" in CSS and ".failures tr" in CSS
    assert 'data-label="Attempts"' in page and 'data-label="Last try"' in page
    # an escaped name keeps its escaping: only the page's own "/" become break points
    w = status(failed=1)
    w["watches"][0]["failures"][0]["path"] = "a/</td><script>x()</script>"
    page = render(w, True, "ok", "t", now=NOW)
    assert "a/<wbr>&lt;/<wbr>td&gt;&lt;script&gt;x()&lt;/<wbr>script&gt;" in page and "<script" not in page


def test_history_keeps_the_last_hour_per_minute():
    h = History()
    start = (NOW // 60) * 60
    total = 0
    for m in range(70):  # 70 minutes, observed every 20 s: 3 uploads a minute, minute 65 skipped
        if m == 65:  # a minute without an observation (a stalled host), its uploads still counted
            total += 3
            continue
        for k in range(3):
            total += 1
            h.observe(start + m * 60 + k * 20, total, 100 - m)
    s = h.samples()
    assert len(s) == MINUTES and s[-1].minute == int(start // 60) + 69
    assert [x.minute for x in s] == list(range(s[0].minute, s[0].minute + MINUTES))  # the gap is a minute too
    by_minute = {x.minute - int(start // 60): x for x in s}
    assert by_minute[65].uploads == 0 and by_minute[65].backlog == 100 - 64  # as last seen
    assert by_minute[66].uploads == 6  # what the unobserved minute uploaded counts in the next one
    assert by_minute[50].uploads == 3 and by_minute[50].backlog == 50
    assert by_minute[69].uploads == 3  # the current minute so far
    assert sum(x.uploads for x in s) == total - 3 * 10  # all but the 10 minutes that fell out


def test_the_picture_draws_uploads_and_backlog_from_the_samples():
    cur = int(NOW // 60)
    samples = [Sample(cur - 20 + i, uploads=i * 10, backlog=3000 - i * 100) for i in range(21)]
    html = picture(samples, NOW)
    assert html.count('<svg id="history"') == 1 and "<script" not in html and "style=" not in html
    heights = [float(h) for h in re.findall(r'<rect class="bar"[^>]* height="([\d.]+)"', html)]
    assert len(heights) == 21 and heights[-1] > heights[1] > heights[0] == 0
    path = re.search(r'<path class="line" d="M([^"]+)"', html)
    assert path
    ys = [float(p.split(",")[1]) for p in path.group(1).split(" L")]
    assert len(ys) == 21 and ys[0] < ys[-1]  # the backlog falls: the line goes down (SVG y grows down)
    assert "top: 200" in html and "top: 3,000 files" in html
    tone, text = verdict(samples)
    assert tone == "ok" and text.startswith("Catching up: backlog down 900 in 9 min (1,550 uploaded in 10 min)")
    assert verdict([Sample(cur - 1, 0, 10), Sample(cur, 0, 40)])[1].startswith("Falling behind: backlog up 30")
    assert verdict([Sample(cur - 3, 0, 10), Sample(cur, 0, 10)]) == (
        "warn", "Not moving: 10 files waiting, nothing uploaded in 4 min.")
    assert verdict([Sample(cur, 5, 0)]) == ("ok", "Keeping up: nothing waiting (5 uploaded in 1 min).")


def test_the_page_shows_the_picture_within_its_content_security_policy(endpoint):  # noqa: F811
    d, ep, url = endpoint
    code, headers, page = request(url + "/")
    csp = headers["Content-Security-Policy"]
    assert code == 200 and "default-src 'none'" in csp and "script-src" not in csp
    assert '<svg id="history"' in page and "<script" not in page
    before = sum(s.uploads for s in ep.server.history.samples())
    d.engine.stats.add(uploaded=3)  # the run's counter, as the workers move it
    page = request(url + "/")[2]  # observed as the page renders, not only by the 5 s sampler
    assert sum(s.uploads for s in ep.server.history.samples()) == before + 3
    assert re.search(r'<rect class="bar"[^>]* height="(?!0\.0")', page)


def test_a_button_from_a_page_older_than_the_daemon_leads_to_the_current_page(endpoint):  # noqa: F811
    d, ep, url = endpoint
    d.fail("a.txt", "AccessDenied: s3:PutObject")
    before = d.row("a.txt")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    code, headers, body = request(url + "/actions/retry", "POST", b"token=of-the-last-process", form)
    assert code == 303 and headers["Location"] == "/?stale=1"
    assert headers["Content-Type"].startswith("text/html") and '<a href="/?stale=1">' in body
    assert d.row("a.txt") == before  # nothing was done
    code, _, page = request(url + headers["Location"])
    assert code == 200 and "Nothing was done" in page and 'class="notice warn"' in page
    token = token_of(page)
    assert token == ep.server.console.token  # the buttons of this page work
    code, headers, _ = request(url + "/actions/retry", "POST", f"token={token}".encode(), form)
    assert code == 303 and headers["Location"] == "/?requeued=1" and d.row("a.txt")["state"] == "pending"


# --- headless Chromium against a running daemon -------------------------------------------------------

PHONE, DESKTOP = (390, 844), (1280, 800)
DEEP = "photos/2026/11/24/event-with-a-rather-long-directory-name/IMG_20261124_101010-edited\\final.jpg"


def viewport(driver, size: tuple[int, int], mobile: bool) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": mobile})


def read(driver, script: str) -> Any:
    """`script`'s value on the loaded page, read again when the 5 s reload replaced it meanwhile."""
    from selenium.common.exceptions import JavascriptException

    def once() -> Any:
        try:
            if driver.execute_script("return document.readyState") != "complete":
                return None
            value = driver.execute_script(script)
            return value if value is not None else None
        except JavascriptException:
            return None

    return wait_for(once, 15, 0.2, f"the page to answer {script[:60]!r}")


def click(driver, element_id: str) -> None:
    """Press a button of the loaded page (found again if the 5 s reload replaced the page)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def once() -> bool:
        try:
            driver.find_element(By.ID, element_id).click()
            return True
        except (NoSuchElementException, StaleElementReferenceException):
            return False

    try:
        wait_for(once, 15, 0.2, f"#{element_id} to press")
    except AssertionError as e:
        raise AssertionError(f"{e} on {driver.current_url}: {driver.page_source[:2000]}") from None


FAILURE_BLOCK = """
const tr = document.querySelector('table.failures tbody tr');
if (!tr) return null;
const r = tr.getBoundingClientRect(), td = tr.querySelector('td.p');
return {display: getComputedStyle(tr).display, left: r.left, right: r.right, name: td.innerText,
        nameWidth: td.getBoundingClientRect().width,
        scroll: document.documentElement.scrollWidth, inner: window.innerWidth};
"""
TIMES = """
const ts = [...document.querySelectorAll('time')];
if (!ts.length) return null;
return ts.map(t => ({text: t.innerText, title: t.title, lines: t.getClientRects().length,
                     ws: getComputedStyle(t).whiteSpace}))
         .concat([...document.querySelectorAll('.exact')].map(e => ({exact: e.innerText,
                     lines: e.getClientRects().length})));
"""
BARS = """
const bars = [...document.querySelectorAll('svg#history rect.bar')];
if (!bars.length) return null;
return bars.map(b => b.getBBox().height);
"""


def test_browser_phone_and_desktop_show_failures_times_and_the_last_hour(tmp_path, chromium):  # noqa: F811
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = write_config(tmp_path / "s.toml", remote={"url": f"file://{tmp_path / 'remote'}"},
                       watches=[{"path": str(tmp_path / "up"), "prefix": "up"}],
                       syncd={"ledger": str(tmp_path / "l.db"), "settle_seconds": 0.2, "workers": 2,
                              "health_listen": f"127.0.0.1:{port}", "rescan_interval": 0})
    (tmp_path / "up").mkdir()
    d = DaemonProc(cfg, tmp_path / "l.db", tmp_path / "d.log").start()
    try:
        d.wait_ready()
        for i in range(12):
            write_file(tmp_path / "up" / f"photos/2026/11/{i:02d}.jpg", b"x" * (i + 1))
        wait_for(lambda: d.states().get("synced") == 12, 30, what="12 uploads")
        write_file(tmp_path / "up" / DEEP, b"a name with a backslash is refused")
        wait_for(lambda: d.states().get("failed") == 1, 30, what="the refused name recorded failed")

        viewport(chromium, PHONE, mobile=True)
        chromium.get(url + "/")
        wait_for(lambda: chromium.title == "syncd: 1 failed", 15, 0.2, "the title to count the failure")
        tone = read(chromium, "const b = document.getElementById('health');"
                              "return b && [b.className, getComputedStyle(b).backgroundColor];")
        assert tone == ["banner warn", "rgb(253, 240, 201)"]  # amber, while /healthz is 200
        times = read(chromium, TIMES)
        exact = [t for t in times if "exact" in t]
        times = [t for t in times if "exact" not in t]
        assert any(re.fullmatch(r"(just now|\d+ s ago|\d+ min ago)", t["text"]) for t in times), times
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", t["title"]) for t in times), times
        assert all(t["lines"] == 1 and t["ws"] == "nowrap" for t in times), times  # never wrapped
        # beside each relative time on a phone (no hover there), also in the failure's block
        assert len(exact) == len(times) and all(t["lines"] == 1 and "UTC" in t["exact"] for t in exact), exact
        block = read(chromium, FAILURE_BLOCK)
        assert block["inner"] == PHONE[0] and block["scroll"] <= PHONE[0], block  # no horizontal scroll
        assert block["display"] == "block" and block["left"] >= 0 and block["right"] <= PHONE[0], block
        assert block["name"].replace("\n", "") == DEEP, block  # whole, broken at "/" only where needed
        assert block["nameWidth"] > PHONE[0] / 2, block  # not a column of 3-4 characters
        bars = read(chromium, BARS)
        assert max(bars) > 0, bars  # drawn from the uploads this daemon made, not a flat line
        shot = tmp_path / "phone.png"
        assert chromium.save_screenshot(str(shot))
        print(f"screenshot: {shot}")

        viewport(chromium, DESKTOP, mobile=False)
        chromium.get(url + "/")
        block = read(chromium, FAILURE_BLOCK)
        assert block["display"] == "table-row" and block["scroll"] <= DESKTOP[0], block
    finally:
        assert d.stop() == 0, d.log()


def test_browser_a_button_of_a_page_from_before_a_restart_ends_on_a_working_page(tmp_path, chromium):  # noqa: F811
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = write_config(tmp_path / "s.toml", remote={"url": f"file://{tmp_path / 'remote'}"},
                       watches=[{"path": str(tmp_path / "up"), "prefix": "up"}],
                       syncd={"ledger": str(tmp_path / "l.db"), "settle_seconds": 0.2,
                              "health_listen": f"127.0.0.1:{port}", "rescan_interval": 0})
    (tmp_path / "up").mkdir()
    d = DaemonProc(cfg, tmp_path / "l.db", tmp_path / "d.log").start()
    d.wait_ready()
    old = request(url + "/")[2]
    assert d.stop() == 0, d.log()
    d = DaemonProc(cfg, tmp_path / "l.db", tmp_path / "d.log").start()
    try:
        d.wait_ready()
        assert token_of(request(url + "/")[2]) != token_of(old)
        # the old page as the browser still holds it (a tab that slept through the restart): its
        # reload timer is left out, so that nothing but the button moves it
        stale = tmp_path / "stale.html"
        stale.write_text(old.replace('<meta http-equiv="refresh"', '<meta name="was-refresh"')
                         .replace('action="/actions/', f'action="{url}/actions/'))
        chromium.get(stale.as_uri())
        click(chromium, "retry")
        wait_for(lambda: chromium.current_url == url + "/?stale=1" and "Nothing was done" in chromium.page_source,
                 15, 0.2, "the current page, saying nothing was done")
        chromium.refresh()  # a GET of the current page, not the old POST again
        wait_for(lambda: "/actions/" not in chromium.current_url and chromium.title.startswith("syncd: "), 15, 0.2,
                 "the page again")
        chromium.get(url + "/")
        click(chromium, "retry")  # this page's buttons work
        wait_for(lambda: chromium.current_url == url + "/?requeued=0", 15, 0.2, "the retry done")
        assert "Re-queued 0 failed files." in chromium.page_source
    finally:
        assert d.stop() == 0, d.log()

