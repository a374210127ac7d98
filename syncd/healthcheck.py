"""`healthcheck_url` pings (healthchecks.io style): GET URL after a good reconcile, URL/fail after
a bad one. A failed ping is logged and changes nothing else."""

from __future__ import annotations

import logging
import threading
import urllib.request

log = logging.getLogger(__name__)
TIMEOUT = 10.0


def ping_url(url: str, ok: bool) -> str:
    return url if ok else url.rstrip("/") + "/fail"


def ping(url: str, ok: bool) -> bool:
    """GET the URL; True when it answered 2xx. Never raises."""
    if not url:
        return False
    target = ping_url(url, ok)
    try:
        with urllib.request.urlopen(urllib.request.Request(target, headers={"User-Agent": "syncd"}),
                                    timeout=TIMEOUT) as resp:
            return 200 <= resp.status < 300
    except Exception as e:  # noqa: BLE001 - a ping must never affect syncing
        log.warning("healthcheck ping %s failed: %s", target.split("?", 1)[0], e)
        return False


class Pinger:
    """Daemon hook: pings in a background thread after each reconcile."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._threads: list[threading.Thread] = []

    def start(self, daemon) -> None:
        pass

    def reconciled(self, ok: bool) -> None:
        t = threading.Thread(target=ping, args=(self.url, ok), name="syncd-ping", daemon=True)
        t.start()
        self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def stop(self) -> None:
        for t in self._threads:
            t.join(timeout=TIMEOUT)
