"""Shared helpers of the reliability scenarios: one watch, one bucket, a daemon, and checks."""

from __future__ import annotations

import binascii
import hashlib
import json
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import FlexibleChecksumError

from tests.conftest import (
    _new_bucket,
    free_port,  # noqa: F401 - re-exported for the reliability tests
    wait_for,
    write_config,
)
from tests.daemon_util import DaemonProc

PREFIX = "backups/uploads"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].strip("/"))


class Rig:
    """A watch directory, a bucket, a config and the daemons started on it.

    `endpoint` is what syncd talks to (maybe a fault proxy); `direct` is where the test looks.
    """

    def __init__(self, tmp: Path, endpoint: str, *, direct: str | None = None, client: Any = None,
                 env: dict[str, str] | None = None, watch: dict[str, Any] | None = None,
                 syncd: dict[str, Any] | None = None, remote: dict[str, Any] | None = None) -> None:
        self.tmp = tmp
        self.client = client or boto3.client("s3", endpoint_url=direct or endpoint, region_name="us-east-1")
        self.bucket = _new_bucket(self.client)
        self.root = tmp / "uploads"
        self.ledger = tmp / "state" / "ledger.db"
        self.env = env
        self.health_port = free_port()
        s = {"ledger": str(self.ledger), "settle_seconds": 0.3, "workers": 4,
             "health_listen": f"127.0.0.1:{self.health_port}", "rescan_interval": 0}
        s.update(syncd or {})
        r = {"url": f"s3://{self.bucket}/backups", "endpoint_url": endpoint}
        r.update(remote or {})
        self.config = write_config(tmp / "syncd.toml", remote=r,
                                   watches=[{"path": str(self.root), "prefix": "uploads", **(watch or {})}],
                                   syncd=s)
        self.root.mkdir(parents=True, exist_ok=True)
        self.n = 0

    # --- daemon -----------------------------------------------------------------------------
    def daemon(self) -> DaemonProc:
        self.n += 1
        return DaemonProc(self.config, self.ledger, self.tmp / f"daemon{self.n}.log", env=self.env).start()

    def healthz(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError as e:
            return 0, str(e)

    def status(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/status", timeout=5) as r:
            return json.loads(r.read())

    # --- the bucket ---------------------------------------------------------------------------
    def keys(self, prefix: str = PREFIX + "/") -> set[str]:
        out = set()
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out |= {o["Key"] for o in page.get("Contents", ())}
        return out

    def rels(self) -> set[str]:
        """Relative paths in the bucket under the watch, without syncd's own (.trash, .syncd-check)."""
        return {k[len(PREFIX) + 1:] for k in self.keys() if not k[len(PREFIX) + 1:].startswith((".trash/",
                                                                                                ".syncd-check/"))}

    def read(self, rel: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=f"{PREFIX}/{rel}")["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def check(self, expected: dict[str, bytes]) -> list[str]:
        """What is wrong in the bucket for `expected` (rel -> bytes): missing, different bytes,
        or a `syncd-sha256` that is not the content's. Empty when every file is there, identical."""
        problems = []
        for rel, data in sorted(expected.items()):
            key = f"{PREFIX}/{rel}"
            try:
                obj = self.client.get_object(Bucket=self.bucket, Key=key)
            except self.client.exceptions.NoSuchKey:
                problems.append(f"{rel}: missing")
                continue
            try:
                body = obj["Body"].read()
            except (FlexibleChecksumError, binascii.Error):
                # a read racing an overwrite of the key in moto can get a body that does not match
                # the checksum served with it, or a checksum header cut short (not base64): not a
                # match yet; a lasting mismatch fails the wait
                problems.append(f"{rel}: body does not match its stored checksum")
                continue
            sha = hashlib.sha256(data).hexdigest()
            if body != data:
                problems.append(f"{rel}: {len(body)} bytes in the bucket, {len(data)} expected")
            elif obj.get("Metadata", {}).get("syncd-sha256") != sha:
                problems.append(f"{rel}: syncd-sha256 {obj.get('Metadata')} != {sha}")
        return problems

    def matches(self, expected: dict[str, bytes]) -> bool:
        return not self.check(expected)

    # --- the ledger ---------------------------------------------------------------------------
    def ledger_query(self, sql: str, params: tuple = ()) -> list[tuple]:
        con = sqlite3.connect(f"file:{self.ledger}?mode=ro", uri=True, timeout=30)
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()

    def states(self) -> dict[str, int]:
        return dict(self.ledger_query("SELECT state, count(*) FROM files GROUP BY state"))

    def settled(self) -> bool:
        """No work left in the ledger: nothing pending, in flight or being deleted."""
        return not self.unsettled(limit=1)

    def unsettled(self, limit: int = 20) -> list[tuple]:
        """The rows still at work (path, state, op, attempts, seconds until due, last error)."""
        return self.ledger_query(
            "SELECT path, state, op, attempts, round(due_at - strftime('%s','now'), 1), last_error FROM files "
            "WHERE state IN ('pending','uploading','deleting') OR lease_until IS NOT NULL LIMIT ?", (limit,))

    def wait_settled(self, timeout: float, what: str = "ledger settled") -> None:
        """Wait until the ledger has no work left; on a timeout, say which rows were still at work."""
        try:
            wait_for(self.settled, timeout=timeout, what=what)
        except AssertionError as e:
            raise AssertionError(f"{e}; still at work (path, state, op, attempts, due in s, error): "
                                 f"{self.unsettled()}") from None


def is_ready(d: DaemonProc) -> bool:
    """This daemon process said it is ready (its own log: the ledger's `ready` mark may be a
    leftover of a daemon killed before)."""
    return "ready:" in d.log()


def wait_ready(d: DaemonProc, timeout: float = 120) -> None:
    wait_for(lambda: is_ready(d) or not d.alive(), timeout, 0.05, "daemon ready")
    assert d.alive(), d.log()


def local_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.is_symlink()}


def restore_temps(root: Path) -> list[Path]:
    return [p for p in root.rglob(".syncd-restore-*")]


def stop_clean(d: DaemonProc) -> None:
    """Stop with SIGTERM: exit 0 and no traceback in its log."""
    code = d.stop(timeout=30)
    assert code == 0, d.log()
    assert "Traceback" not in d.log(), d.log()


def start_until_ready(rig: Rig) -> None:
    """One more daemon start (the startup restore runs), then a clean stop."""
    d = rig.daemon()
    try:
        wait_ready(d)
    finally:
        stop_clean(d)
