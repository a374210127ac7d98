"""sd_notify(3) over an AF_UNIX datagram socket, stdlib only (sdnotify swallows errors, PITFALLS §4).

Outside systemd ($NOTIFY_SOCKET unset) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract socket namespace
        self.addr = addr
        self._sock: socket.socket | None = None
        self.watchdog_usec = 0
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)
        self._pinger: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def enabled(self) -> bool:
        return bool(self.addr)

    def send(self, *fields: str) -> bool:
        if not self.addr:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self.addr)
            return True
        except OSError as e:
            log.warning("sd_notify to %r failed: %s", self.addr.replace("\0", "@"), e)
            return False

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def start_watchdog(self, healthy: Callable[[], bool]) -> None:
        """Ping WATCHDOG=1 every WATCHDOG_USEC/2 while `healthy()`; stop pinging when stuck."""
        if not self.addr or not self.watchdog_usec:
            return
        interval = self.watchdog_usec / 2e6

        def loop() -> None:
            while not self._stop.wait(interval):
                if healthy():
                    self.send("WATCHDOG=1")
                else:
                    log.error("sync loop looks stuck; not pinging the systemd watchdog")

        self._pinger = threading.Thread(target=loop, name="syncd-watchdog", daemon=True)
        self._pinger.start()

    def close(self) -> None:
        self._stop.set()
        if self._pinger is not None:
            self._pinger.join(timeout=2)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
