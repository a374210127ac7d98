"""`syncd check`: probe every action syncd needs on `<prefix>/.syncd-check/<hostname>`."""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from syncd.config import Config
from syncd.iam import check_base, needs_delete
from syncd.keys import join_key
from syncd.remote.base import CREDENTIALS, DENIED, NO_BUCKET, UNREACHABLE, Remote, RemoteError


@dataclass
class Probe:
    name: str  # list | put | head | get | delete
    action: str  # the IAM action it needs
    outcome: str = "skipped"  # ok | denied (<code>) | failed (<why>) | skipped | not needed (...)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok" or self.outcome.startswith(("not needed", "skipped"))

    @property
    def denied(self) -> bool:
        return self.outcome.startswith("denied")


def probe_key(cfg: Config) -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"
    return join_key(check_base(cfg), host)


def _run(probe: Probe, fn) -> bool:
    try:
        fn()
        probe.outcome = "ok"
        return True
    except RemoteError as e:
        if e.kind == DENIED:
            probe.outcome = f"denied ({e.code or 'AccessDenied'})"
        else:
            probe.outcome = f"failed ({e.code or e.kind}: {e})"
        probe.error = e  # type: ignore[attr-defined]
        return False


def run_check(cfg: Config, remote: Remote) -> list[Probe]:
    key = probe_key(cfg)
    probes = {n: Probe(n, a) for n, a in (("list", "s3:ListBucket"), ("put", "s3:PutObject"),
                                          ("head", "s3:GetObject"), ("get", "s3:GetObject"),
                                          ("delete", "s3:DeleteObject"))}
    bases = [join_key(cfg.remote.prefix, w.prefix) for w in cfg.watches]

    def do_list() -> None:
        for b in bases:
            remote.probe(b + "/" if b else "")

    listed = _run(probes["list"], do_list)
    err = getattr(probes["list"], "error", None)
    if not listed and err is not None and err.kind in (UNREACHABLE, CREDENTIALS, NO_BUCKET):
        return list(probes.values())  # nothing else can work; the rest stay "skipped"

    body = f"syncd check from {socket.gethostname()} at {time.time():.0f}\n".encode()
    sha = hashlib.sha256(body).hexdigest()
    with tempfile.TemporaryDirectory(prefix="syncd-check-") as tmp:
        path = Path(tmp) / "probe"
        path.write_bytes(body)
        mtime = os.stat(path).st_mtime_ns
        put_ok = _run(probes["put"], lambda: remote.put(key, path, size=len(body), sha256=sha, mtime_ns=mtime))
    if put_ok:
        def do_head() -> None:
            info = remote.head(key)
            if info is None or info.size != len(body):
                raise RemoteError("invalid", "probe object not found after put", code="Missing")

        def do_get() -> None:
            buf = io.BytesIO()
            remote.get(key, buf)
            if buf.getvalue() != body:
                raise RemoteError("integrity", "probe object came back different", code="Mismatch")

        _run(probes["head"], do_head)
        _run(probes["get"], do_get)
    if needs_delete(cfg):
        if put_ok:
            _run(probes["delete"], lambda: remote.delete(key))
    else:
        probes["delete"].outcome = "not needed (no watch uses on_delete = mirror or trash)"
    if cfg.remote.events_queue:
        probes["events"] = probe_events_queue(cfg)
    return list(probes.values())


def probe_events_queue(cfg: Config) -> Probe:
    """Receive once from `events_queue`, hiding nothing (SPEC §3 `check`)."""
    import threading

    from syncd.events import EventConsumer, describe

    probe = Probe("events", "sqs:ReceiveMessage")
    try:
        EventConsumer(cfg.remote.events_queue, lambda _c: None, threading.Event(), region=cfg.remote.region,
                      profile=cfg.remote.profile).probe()
        probe.outcome = "ok"
    except Exception as e:  # noqa: BLE001 - every failure of the probe is its outcome
        cause = describe(e)
        code = cause.split(":", 1)[0]
        probe.outcome = f"denied ({code})" if "AccessDenied" in code else f"failed ({cause})"
    return probe
