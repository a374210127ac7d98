"""Helpers for tests that run `syncd run` as a real subprocess against moto's HTTP server."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from tests.conftest import wait_for


class DaemonProc:
    """`syncd run` in a subprocess, with its log in a file."""

    def __init__(self, config: Path, ledger: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.ledger = ledger
        self.log_path = log
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> DaemonProc:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()/kill9()
        self.proc = subprocess.Popen([sys.executable, "-m", "syncd", "--config", str(self.config), "run"],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        wait_for(lambda: self.meta("ready") == "1" or self._died(), timeout, 0.1, "daemon ready")
        assert self.proc is not None and self.proc.poll() is None, self.log()

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def meta(self, name: str) -> str | None:
        rows = self.query("SELECT value FROM meta WHERE name=?", (name,))
        return rows[0][0] if rows else None

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        if not self.ledger.exists():
            return []
        try:
            con = sqlite3.connect(f"file:{self.ledger}?mode=ro", uri=True, timeout=10)
            try:
                return con.execute(sql, params).fetchall()
            finally:
                con.close()
        except sqlite3.OperationalError:
            return []

    def states(self) -> Counter:
        return Counter(dict(self.query("SELECT state, count(*) FROM files GROUP BY state")))

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def bucket_objects(client: Any, bucket: str, prefix: str = "") -> dict[str, int]:
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", ()):
            out[o["Key"]] = o["Size"]
    return out


def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def now() -> float:
    return time.monotonic()


def http_get(url: str) -> tuple[int, str]:
    """Status and body of a GET (an HTTP error is an answer too; 0 when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def live_tree(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of the files under `root` while a daemon works there: its restore
    temps (`.syncd-restore-*`) are not files of the tree, nor is a file that goes away between
    the walk and the read (a temp renamed, a deletion applied): the next poll sees the outcome."""
    out = {}
    for p in root.rglob("*"):
        if p.name.startswith(".syncd-"):
            continue
        try:
            if p.is_file():
                out[p.relative_to(root).as_posix()] = p.read_bytes()
        except FileNotFoundError:
            continue
    return out
