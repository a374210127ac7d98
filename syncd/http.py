"""The daemon's HTTP endpoint (SPEC §6): GET /healthz, /status, /metrics.

One thread serves requests one at a time (they are cheap reads), so it holds one ledger
connection. Metrics are collected at scrape time from the ledger and the run's counters.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from syncd.errors import ConfigError
from syncd.status import collect

if TYPE_CHECKING:
    from syncd.daemon import Daemon

log = logging.getLogger(__name__)


class _Collector:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self):  # noqa: ANN201 - prometheus-client's collector protocol
        d = self.daemon
        ledger, engine = d.ledger, d.engine
        if ledger is None or engine is None:
            return
        stats = engine.stats
        files = GaugeMetricFamily("syncd_files", "Files in the ledger by watch and state", labels=["watch", "state"])
        oldest_ts: list[float] = []
        last_ok: list[float] = []
        for w in d.cfg.watches:
            for state, n in ledger.counts(w.prefix).items():
                files.add_metric([w.prefix, state], n)
            if (t := ledger.oldest_pending(w.prefix)) is not None:
                oldest_ts.append(t)
            if (t := ledger.last_success(w.prefix)) is not None:
                last_ok.append(t)
        yield files
        yield CounterMetricFamily("syncd_uploads", "Objects uploaded (PUT or server-side copy)",
                                  value=stats.uploaded)
        yield CounterMetricFamily("syncd_upload_bytes", "Bytes uploaded", value=stats.upload_bytes)
        yield CounterMetricFamily("syncd_restores", "Files restored from the remote", value=stats.restored)
        fails = CounterMetricFamily("syncd_failures", "Failed transfer attempts by reason", labels=["reason"])
        for reason, n in sorted(stats.fail_reasons.items()):
            fails.add_metric([reason], n)
        yield fails
        now = time.time()
        yield GaugeMetricFamily("syncd_backlog_oldest_seconds", "Age of the oldest file waiting for work",
                                value=max(0.0, now - min(oldest_ts)) if oldest_ts else 0.0)
        if stats.last_success:
            last_ok.append(stats.last_success)
        if d.last_reconcile_at:
            last_ok.append(d.last_reconcile_at)
        yield GaugeMetricFamily("syncd_last_success_timestamp_seconds",
                                "Last time a transfer or a reconcile succeeded", value=max(last_ok) if last_ok else 0)
        ok, _ = d.health()
        yield GaugeMetricFamily("syncd_healthy", "1 when /healthz answers 200", value=1 if ok else 0)


def _handler(daemon: Daemon, registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "syncd"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            log.debug("http: " + format, *args)

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            path = self.path.split("?", 1)[0]
            try:
                if path == "/healthz":
                    ok, reason = daemon.health()
                    self._send(200 if ok else 503, (reason + "\n").encode(), "text/plain; charset=utf-8")
                elif path == "/status":
                    data = collect(daemon.cfg, daemon.ledger)
                    self._send(200, json.dumps(data).encode(), "application/json")
                elif path == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                else:
                    self._send(404, b"not found: try /healthz, /status or /metrics\n", "text/plain")
            except Exception as e:  # noqa: BLE001 - a scrape must never take the daemon down
                log.exception("http %s failed", path)
                self._send(500, f"error: {e}\n".encode(), "text/plain")

    return Handler


class HttpEndpoint:
    """Bound at construction (a bad `health_listen` is a config error, exit 2); served by start()."""

    def __init__(self, daemon: Daemon, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(daemon))
        try:
            self.server = HTTPServer((host, int(port)), _handler(daemon, self.registry))
        except OSError as e:
            raise ConfigError(f"syncd.health_listen = {listen!r} cannot be bound: {e.strerror or e}; "
                              f"choose a free address or set it to \"\"") from e
        self._thread: threading.Thread | None = None
        self.daemon = daemon

    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address[:2]  # type: ignore[return-value]

    def start(self, daemon: Daemon) -> None:
        self._thread = threading.Thread(target=self._serve, name="syncd-http", daemon=True)
        self._thread.start()
        log.info("health endpoint on http://%s:%d/healthz", *self.address)

    def _serve(self) -> None:
        try:
            self.server.serve_forever(poll_interval=0.5)
        finally:
            if self.daemon.ledger is not None:
                self.daemon.ledger.close_thread()

    def stop(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(timeout=5)
        self.server.server_close()
