"""The daemon's HTTP endpoint (SPEC §6): routing, and applying the access rule of `access.py`.

GET /healthz and /metrics (counts, no names) answer anyone who can reach the address.
Everything else (`/`, `/status`, `/files/`, the POST actions) answers only a trusted client
(loopback, or `Authorization: Bearer $SYNCD_HTTP_TOKEN`) that names the daemon by an accepted
`Host` (DNS rebinding). Each request runs in its own thread (a slow `/files/` download must not
block a health check) and closes its ledger connection when it ends. A client that hangs up is
a debug line, never a traceback. Metrics are collected at scrape time from the ledger and the
run's counters.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from syncd import refusals
from syncd.access import HANGUPS, TOKEN_ENV, host_ok, trusted
from syncd.config import split_listen
from syncd.errors import ConfigError
from syncd.files import ROUTE as FILES_ROUTE
from syncd.files import FileServer
from syncd.history import History, Sampler
from syncd.page import ACTIONS, PAGE_HEADERS, Console
from syncd.remote import base as remote_base
from syncd.status import collect, last_listing

if TYPE_CHECKING:
    from syncd.daemon import Daemon

log = logging.getLogger(__name__)
FAILURE_REASONS = (remote_base.TRANSIENT, remote_base.UNREACHABLE, remote_base.DENIED, remote_base.CREDENTIALS,
                   remote_base.NO_BUCKET, remote_base.NOT_FOUND, remote_base.INTEGRITY, remote_base.INVALID,
                   remote_base.LOCAL, *refusals.REASONS)


class _Collector:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.files: FileServer | None = None

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
        fails = CounterMetricFamily("syncd_failures", "Failed transfer attempts and refused names by reason",
                                    labels=["reason"])
        # every known reason from the start: a series that appears only with the first failure
        # defeats `rate()` and `increase()` alerts (PromQL sees no change from nothing to 1)
        counts = dict.fromkeys(FAILURE_REASONS, 0)
        counts.update(stats.fail_reasons)
        for reason, n in refusals.counts().items():
            counts[reason] = counts.get(reason, 0) + n
        for reason, n in sorted(counts.items()):
            fails.add_metric([reason], n)
        yield fails
        yield from stats.upload_delay.collect()  # syncd_upload_delay_seconds: the loss window
        now = time.time()
        yield GaugeMetricFamily("syncd_backlog_oldest_seconds", "Age of the oldest file waiting for work",
                                value=max(0.0, now - min(oldest_ts)) if oldest_ts else 0.0)
        if stats.last_success:
            last_ok.append(stats.last_success)
        if d.last_reconcile_at:
            last_ok.append(d.last_reconcile_at)
        yield GaugeMetricFamily("syncd_last_success_timestamp_seconds",
                                "Last time a transfer or a reconcile succeeded", value=max(last_ok) if last_ok else 0)
        served = CounterMetricFamily("syncd_served", "/files/ answers by source: from disk, or after an "
                                     "on-demand restore", labels=["source"])
        for source in ("disk", "remote"):
            served.add_metric([source], self.files.served[source] if self.files is not None else 0)
        yield served
        listed = GaugeMetricFamily("syncd_remote_listing_timestamp_seconds",
                                   "End of the last complete listing of the remote, per watch", labels=["watch"])
        for w in d.cfg.watches:
            listed.add_metric([w.prefix], last_listing(ledger, w.prefix) or 0)
        yield listed
        changes = CounterMetricFamily("syncd_remote_changes", "Local files restored, replaced or deleted "
                                      "because of the remote", labels=["kind"])
        for kind in ("restored", "replaced", "deleted"):
            changes.add_metric([kind], stats.remote_changes.get(kind, 0))
        yield changes
        ok, _ = d.health()
        yield GaugeMetricFamily("syncd_healthy", "1 when /healthz answers 200", value=1 if ok else 0)


class Handler(BaseHTTPRequestHandler):
    """Routes requests; the daemon and the metrics registry are set on the server."""

    server_version = "syncd"
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http: " + format, *args)

    def handle(self) -> None:
        try:
            super().handle()
        except HANGUPS as e:
            log.debug("http: client %s hung up: %s", self.client_address[0], e)
        finally:
            ledger = self.server.daemon.ledger
            if ledger is not None:
                ledger.close_thread()  # one connection per request thread, closed with it

    @property
    def route(self) -> str:
        return self.path.split("?", 1)[0]

    def trusted(self) -> bool:
        return trusted(self.client_address[0], self.headers.get("Authorization"))

    def allowed(self) -> bool:
        """The access rule of the private routes (SPEC §6); when it fails, the 403 is sent."""
        if not self.trusted():
            self._send(403, f"forbidden: only loopback clients, or a Bearer token when ${TOKEN_ENV} "
                            f"is set\n".encode(), "text/plain; charset=utf-8")
            return False
        hosts = self.headers.get_all("Host") or []
        if len(hosts) > 1 or not host_ok(hosts[0] if hosts else None, self.server.hosts):
            shown = ", ".join(repr(h[:100]) for h in hosts)
            log.debug("http: refused Host %s from %s", shown, self.client_address[0])
            self._send(403, f"forbidden: Host {shown} is not an IP address, localhost or a name in "
                            f"http_hosts (DNS rebinding protection)\n".encode(), "text/plain; charset=utf-8")
            return False
        return True

    def send_body(self, code: int, body: bytes, ctype: str, *, head: bool = False,
                  headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_body(code, body, ctype, head=self.command == "HEAD")

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib name
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        daemon, path = self.server.daemon, self.route
        try:
            if path == "/healthz":
                ok, reason = daemon.health()
                self._send(200 if ok else 503, (reason + "\n").encode(), "text/plain; charset=utf-8")
            elif path == "/metrics":
                self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
            elif not self.allowed():
                pass
            elif path == "/status":  # file names and errors: not for anyone (SPEC §6)
                data = collect(daemon.cfg, daemon.ledger)
                self._send(200, json.dumps(data).encode(), "application/json")
            elif path == "/":
                query = self.path.partition("?")[2]
                self.send_body(200, self.server.console.page(query), "text/html; charset=utf-8",
                               head=self.command == "HEAD", headers=PAGE_HEADERS)
            elif path.startswith(FILES_ROUTE):
                if self.server.files is None:
                    self._send(404, b"not found: serve_files is off\n", "text/plain")
                else:
                    self.server.files.serve(self, path)
            else:
                self._send(404, b"not found: try /healthz, /status or /metrics\n", "text/plain")
        except HANGUPS:
            raise  # the client went away: handle() notes it, there is no one to answer
        except Exception as e:  # noqa: BLE001 - a request must never take the daemon down
            log.exception("http %s failed", path)
            self._send(500, f"error: {e}\n".encode(), "text/plain")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        if not self.allowed():
            self.close_connection = True  # its body is not read: it must not be taken for a request
            return
        if self.route in ACTIONS:
            try:
                self.server.console.post(self)
            except HANGUPS:
                raise
            except Exception as e:  # noqa: BLE001 - a request must never take the daemon down
                log.exception("http POST %s failed", self.route)
                self._send(500, f"error: {e}\n".encode(), "text/plain")
            return
        self._send(404, b"not found\n", "text/plain")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a page of images through nginx opens many /files/ connections at once

    def __init__(self, address: tuple[str, int], daemon: Daemon, registry: CollectorRegistry) -> None:
        self.daemon = daemon
        self.registry = registry
        self.hosts = frozenset(daemon.cfg.http_hosts)  # names accepted in `Host` besides IPs, localhost
        self.history = History()  # the page's picture of the last hour (fed by HttpEndpoint's Sampler)
        self.console = Console(daemon, self.history)  # the status page; its form token is made here, per process
        self.files: FileServer | None = None  # set by HttpEndpoint.start when serve_files
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            # [::] also takes IPv4 clients (as ::ffff:a.b.c.d) where the OS allows dual-stack,
            # whatever its default (net.ipv6.bindv6only, BSDs)
            try:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except (AttributeError, OSError) as e:
                log.debug("http: [::] stays IPv6-only here: %s", e)
        super().server_bind()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """What escaped a request thread: one line (socketserver would print a traceback)."""
        e = sys.exc_info()[1]
        if isinstance(e, HANGUPS):
            log.debug("http: client %s hung up: %s", client_address[0], e)
        else:
            log.error("http: request from %s failed: %s: %s", client_address[0], type(e).__name__, e)


class HttpEndpoint:
    """Bound at construction (a bad `health_listen` is a config error, exit 2); served by start()."""

    before_ledger = True  # started while the ledger cannot be opened: /healthz says why (503)

    def __init__(self, daemon: Daemon, listen: str) -> None:
        try:
            host, port = split_listen(listen)
        except ValueError as e:
            raise ConfigError(f"syncd.health_listen: {e}") from None
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = _Collector(daemon)
        self.registry.register(self.collector)
        try:
            self.server = _Server((host or "127.0.0.1", port), daemon, self.registry)
        except OSError as e:
            raise ConfigError(f"syncd.health_listen = {listen!r} cannot be bound: {e.strerror or e}; "
                              f"choose a free address or set it to \"\"") from e
        self._thread: threading.Thread | None = None
        self.daemon = daemon
        self.sampler = Sampler(daemon, self.server.history)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address[:2]  # type: ignore[return-value]

    def start(self, daemon: Daemon) -> None:
        """Serve; again once the ledger opened, to add `/files/` (serving since a start that
        waited for the ledger, SPEC §4.11)."""
        if daemon.cfg.serve_files and daemon.engine is not None and daemon.ledger is not None \
                and self.server.files is None:
            engine = daemon.engine
            transfers = getattr(engine, "transfers", None)  # (absent in tests' stand-in engines)
            self.server.files = self.collector.files = FileServer(
                daemon.cfg, daemon.ledger, engine.remote, engine.stats, stop=daemon.stop,
                restoring=transfers.restoring if transfers is not None else None)
        if daemon.engine is not None:
            self.sampler.start()  # once the run counts uploads
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._serve, name="syncd-http", daemon=True)
        self._thread.start()
        host, port = self.address
        log.info("health endpoint on http://%s:%d/healthz", f"[{host}]" if ":" in host else host, port)

    def _serve(self) -> None:
        self.server.serve_forever(poll_interval=0.5)

    def stop(self) -> None:
        self.sampler.stop()
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(timeout=5)
        self.server.server_close()
