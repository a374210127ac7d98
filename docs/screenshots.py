"""The status page's screenshots in the README, made by hand (not by the test suite):

    PYTHONPATH=. .venv/bin/python docs/screenshots.py

It needs selenium (`pip install -e '.[test]'`) and Debian's chromium and chromium-driver. Each
state is rendered by the daemon's own `syncd.page.render` from made-up status data and an hour
of made-up samples (a real daemon would need an hour to fill its picture), served with the
page's headers (its Content-Security-Policy applies), and saved as
`docs/status-<state>-<desktop|phone>.png` at 1280x800 and 390x844.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from syncd.history import MINUTES, Sample
from syncd.page import PAGE_HEADERS, render

DOCS = Path(__file__).resolve().parent
SIZES = {"desktop": ((1280, 800), False), "phone": ((390, 844), True)}
CHROMIUM = os.environ.get("SYNCD_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SYNCD_CHROMEDRIVER", "/usr/bin/chromedriver")


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def samples(now: float, uploads: list[int], backlog: list[int]) -> list[Sample]:
    minute = int(now // 60)
    return [Sample(minute - MINUTES + 1 + i, u, b) for i, (u, b) in enumerate(zip(uploads, backlog, strict=True))]


def states(now: float) -> dict[str, tuple[dict[str, Any], bool, str, list[Sample]]]:
    """state -> (status data, healthy, /healthz reason, samples)."""
    wave = [40 + (i * 37) % 50 for i in range(MINUTES)]
    # healthy: a morning burst of uploads, drained within minutes
    burst = [w + (260 if 30 <= i < 36 else 0) for i, w in enumerate(wave)]
    drained = [max(0, 900 - 180 * (i - 30)) if 30 <= i < 36 else 0 for i in range(MINUTES)]
    # unhealthy: the remote went away 22 minutes ago; the backlog climbs since
    stopped = [w if i < 38 else 0 for i, w in enumerate(wave)]
    climbing = [0 if i < 38 else 140 * (i - 37) - 78 for i in range(MINUTES)]
    failures = [
        {"path": "photos/2026/11/24/wedding-reception/IMG_20261124_193012.jpg",
         "error": "AccessDenied: s3:PutObject on uploads/photos/2026/11/24/wedding-reception/"
                  "IMG_20261124_193012.jpg", "attempts": 6, "updated_at": iso(now - 420)},
        {"path": "documents/contracts/2026/acme-corp/master-services-agreement-v7-final.pdf",
         "error": "AccessDenied: s3:PutObject", "attempts": 6, "updated_at": iso(now - 1260)},
        {"path": "avatars/u/9f/3c/9f3c0d2e.png", "error": "local: [Errno 13] Permission denied",
         "attempts": 3, "updated_at": iso(now - 5400)},
    ]

    def data(counts: dict[str, int], backlog: int, oldest: float | None, fails: list[dict[str, Any]],
             remote_error: dict[str, Any] | None = None) -> dict[str, Any]:
        daemon: dict[str, Any] = {"running": True, "pid": 4182, "ready": True}
        if remote_error:
            daemon["remote_error"] = remote_error
        return {"daemon": daemon, "watches": [{
            "prefix": "uploads", "path": "/srv/app/shared/uploads",
            "counts": {"pending": 0, "uploading": 0, "synced": 48213, "failed": len(fails), "deleting": 0,
                       "deleted": 312, **counts},
            "backlog": backlog, "oldest_pending_age_s": oldest, "last_success": iso(now - (1320 if remote_error else 4)),
            "failures": fails, "failures_total": len(fails), "last_listing": iso(now - 2900)}]}

    down = "Unreachable: cannot reach the S3 endpoint: Could not connect to the endpoint URL"
    return {
        "healthy": (data({"uploading": 2}, 2, 0.8, []), True, "ok", samples(now, burst, drained)),
        "failing": (data({}, 0, None, failures), True, "ok", samples(now, wave, [0] * MINUTES)),
        "unhealthy": (data({"pending": 3000, "uploading": 2}, 3002, 1318.0, [],
                           {"error": down, "since": iso(now - 1320)}), False,
                      f"remote failing for 1320s: {down}", samples(now, stopped, climbing)),
    }


class Page(BaseHTTPRequestHandler):
    html = b""

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(Page.html)))
        for k, v in PAGE_HEADERS.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(Page.html)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


def main() -> int:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # never a downloaded browser or driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-color-profile=srgb"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    now = time.time()
    try:
        for state, (data, healthy, reason, hist) in states(now).items():
            Page.html = render(data, healthy, reason, "made-up-token", now=now, samples=hist).encode()
            for size, ((w, h), mobile) in SIZES.items():
                driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                       {"width": w, "height": h, "deviceScaleFactor": 1, "mobile": mobile})
                driver.get(url)
                out = DOCS / f"status-{state}-{size}.png"
                driver.save_screenshot(str(out))
                print(f"{out.relative_to(DOCS.parent)}: {out.stat().st_size // 1024} KiB")
    finally:
        driver.quit()
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
