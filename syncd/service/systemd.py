"""sd_notify(3) over an AF_UNIX datagram socket, stdlib only (sdnotify swallows errors, PITFALLS §4).

Outside systemd ($NOTIFY_SOCKET unset) every call is a no-op.

The start has a finite limit (the units' TimeoutStartSec=90s) that a startup which moves keeps
pushing back with EXTEND_TIMEOUT_USEC (`keep_starting`): a restore of a large tree may take
hours, but a frozen process (SIGSTOP) or a restore that stopped moving sends nothing, so the
start fails and the unit is restarted instead of holding the app down (issue 25).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)
EXTEND_EVERY = 5.0  # seconds between looks at the startup's progress
EXTEND_BY = 90.0  # each extension: the units' TimeoutStartSec, counted from the look that moved


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
        self.extend_every = EXTEND_EVERY
        self._keeper: threading.Thread | None = None
        self._started = threading.Event()  # READY, STOPPING or closed: no more extensions

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
        self._started.set()
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def stopping(self) -> None:
        self._started.set()  # an extension now would stretch the stop's timeout instead
        self.send("STOPPING=1")

    def keep_starting(self, progress: Callable[[], object]) -> None:
        """Until READY (or STOPPING), every `extend_every` seconds: EXTEND_TIMEOUT_USEC while the
        startup moves. `progress()` returns None when being alive is progress enough (waiting for
        the ledger or the remote, which are retried; the scan), else a value that must have
        changed since the last look (the restore: files done, bytes written)."""
        if not self.addr or self._keeper is not None:
            return

        def loop() -> None:
            last: object = object()  # the first look counts as a change
            while True:
                token = progress()
                if token is None or token != last:
                    self.extend_timeout(EXTEND_BY)
                last = token
                if self._started.wait(self.extend_every):
                    return

        self._keeper = threading.Thread(target=loop, name="syncd-start-timeout", daemon=True)
        self._keeper.start()

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
        self._started.set()
        for t in (self._pinger, self._keeper):
            if t is not None:
                t.join(timeout=2)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
