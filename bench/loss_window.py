"""(h) the loss window (issue 13): how long a file the app has written exists only on this host.

An "app" thread writes files at a steady rate (default 50/s, 4-300 KB, each written and closed by
its writer, unique content), into directories that exist before syncd starts, under `syncd run`
with its defaults (settle_seconds 2.0, upload_on_close true, 8 workers).

1. Latency: for every file, the moto server's own clock when it stored the object minus the
   writer's close (both `time.time()` on this host). Targets: p50 <= 0.15 s, p99 <= 0.5 s.
   The daemon's `syncd_upload_delay_seconds` histogram (count, mean) is read from /metrics
   before the stop, as a cross-check of what syncd itself reports. The same run with
   `upload_on_close = false` (every file waits for settle_seconds, as before issue 13) is
   shown beside it for comparison (not a target).
2. Crash: the same writer; after `h_crash_at` seconds syncd is killed (`kill -9`) and the watched
   directory and the ledger are deleted (the host is gone). Every file the app had acknowledged
   (closed) more than 1 s before the crash must be in the bucket. Target: 0 lost.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from bench.scenarios import KEY_PREFIX, Daemon, Result, pctl

if TYPE_CHECKING:
    from bench.s3server import MotoServer
    from bench.scenarios import Bench

MIN_SIZE, MAX_SIZE = 4 * 1024, 300 * 1024
SUBDIRS = 10
ACK_MARGIN = 1.0  # files acknowledged more than this before the crash must have survived it
DRAIN_WAIT = 30.0  # seconds after the last write for every object to arrive (latency part)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _key(rel: str) -> str:
    return f"{KEY_PREFIX}/{rel}"


class Writer(threading.Thread):
    """The app: writes and closes one file every 1/rate s until `n` files or `stop`."""

    def __init__(self, watch: Path, rate: float, n: int, seed: int) -> None:
        super().__init__(name="bench-writer", daemon=True)
        self.watch, self.rate, self.n = watch, rate, n
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.closed: list[tuple[str, float]] = []  # (relative path, when the writer closed it)
        for i in range(SUBDIRS):
            (watch / f"d{i}").mkdir(parents=True, exist_ok=True)

    def run(self) -> None:
        t0 = time.monotonic()
        for i in range(self.n):
            delay = t0 + i / self.rate - time.monotonic()
            if delay > 0 and self.stop.wait(delay):
                return
            if self.stop.is_set():
                return
            rel = f"d{i % SUBDIRS}/h{i:06d}.bin"
            data = self.rng.randbytes(self.rng.randint(MIN_SIZE, MAX_SIZE))
            try:
                with open(self.watch / rel, "wb") as f:
                    f.write(data)
            except OSError:
                return  # the host is gone (crash part)
            self.closed.append((rel, time.time()))


def _config(bench: Bench, srv: MotoServer, bucket: str, watch: Path, run_dir: Path, port: int,
            on_close: bool = True) -> Path:
    cfg = bench.syncd_config(srv, bucket, watch, run_dir, fresh=True)
    text = cfg.read_text().replace('health_listen = ""', f'health_listen = "127.0.0.1:{port}"', 1)
    if not on_close:
        text += "upload_on_close = false\n"  # the [[watch]] table is the last one
    cfg.write_text(text)
    return cfg


def _histogram(port: int) -> dict[str, float]:
    """count and sum of syncd_upload_delay_seconds from the daemon's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "syncd_upload_delay_seconds":
            for s in fam.samples:
                if s.name.endswith(("_count", "_sum")):
                    out[s.name.rsplit("_", 1)[1]] = s.value
    return out


def latency(bench: Bench, srv: MotoServer, on_close: bool = True) -> dict:
    s = bench.sizes
    name = "window" if on_close else "window-settle"
    srv.bucket(name)
    watch, run_dir = bench.work / f"h-{name}-watch", bench.work / f"h-{name}"
    port = _free_port()
    writer = Writer(watch, s.h_rate, int(s.h_rate * s.h_seconds), seed=8)
    cfg = _config(bench, srv, name, watch, run_dir, port, on_close)
    daemon = Daemon(bench.tools["syncd"], cfg, run_dir / "ledger.db", bench.logs / "h-syncd.log").start()
    try:
        daemon.wait(lambda: daemon.meta("ready") == "1", 120, "ready")
        cpu0 = daemon.cpu()
        writer.start()
        writer.join()
        deadline = time.monotonic() + DRAIN_WAIT
        want = {_key(rel) for rel, _t in writer.closed}
        while time.monotonic() < deadline and not want <= set(srv.stored(name)):
            time.sleep(0.25)
        cpu = daemon.cpu() - cpu0
        hist = _histogram(port)
    finally:
        daemon.stop()
    stored = srv.stored(name)
    lat = [stored[_key(rel)] - t for rel, t in writer.closed if _key(rel) in stored]
    return {"files": len(writer.closed), "stored": len(lat), "latency": pctl(lat), "daemon_cpu_s": cpu,
            "hist_count": hist.get("count", 0.0),
            "hist_mean": hist.get("sum", 0.0) / hist["count"] if hist.get("count") else float("nan")}


def crash(bench: Bench, srv: MotoServer) -> dict:
    s = bench.sizes
    srv.bucket("crash")
    watch, run_dir = bench.work / "h-crash-watch", bench.work / "h-crash"
    writer = Writer(watch, s.h_rate, 10**9, seed=9)
    cfg = _config(bench, srv, "crash", watch, run_dir, _free_port())
    daemon = Daemon(bench.tools["syncd"], cfg, run_dir / "ledger.db", bench.logs / "h-crash-syncd.log").start()
    try:
        daemon.wait(lambda: daemon.meta("ready") == "1", 120, "ready")
        writer.start()
        time.sleep(s.h_crash_at)
        crash_t = time.time()
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGKILL)  # the host dies: syncd, its disk, its ledger
        writer.stop.set()
        daemon.proc.wait(10)
        shutil.rmtree(watch, ignore_errors=True)
        for p in run_dir.glob("ledger.db*"):
            p.unlink()
        writer.join()
    finally:
        daemon.stop()
    time.sleep(0.5)  # a PUT the server had fully received before the kill may still be stored
    stored = srv.stored("crash")
    acked = [(rel, t) for rel, t in writer.closed if t <= crash_t]
    old = [rel for rel, t in acked if t < crash_t - ACK_MARGIN]
    recent = [rel for rel, t in acked if t >= crash_t - ACK_MARGIN]
    when = dict(acked)
    return {"acknowledged": len(acked), "acked_before_margin": len(old),
            "lost_closed_s_before": sorted(round(crash_t - when[rel], 3) for rel in old if _key(rel) not in stored),
            "lost": sorted(rel for rel in old if _key(rel) not in stored),
            "recent": len(recent), "recent_missing": sum(1 for rel in recent if _key(rel) not in stored),
            "crash_after_s": s.h_crash_at}


def _fresh(bench: Bench, part):  # noqa: ANN001, ANN202 - part(bench, srv) -> dict
    """Each part on a fresh server: moto keeps every object in memory (PITFALLS §3, §8), and one
    part's 200 MB must not slow the next one down."""
    srv = bench.server()
    try:
        return part(bench, srv)
    finally:
        srv.stop()


def scenario_h(bench: Bench) -> Result:
    s = bench.sizes
    res = Result("h", f"loss window: {s.h_rate:.0f} files/s of 4-300 KB closed by the writer, "
                      f"settle_seconds 2.0, upload_on_close")
    lat = _fresh(bench, latency)
    bench.say(f"  (h) {lat['stored']}/{lat['files']} stored; close -> durable p50 {lat['latency']['p50']:.3f}s "
              f"p99 {lat['latency']['p99']:.3f}s max {lat['latency']['max']:.3f}s; "
              f"syncd's histogram: {lat['hist_count']:.0f} uploads, mean {lat['hist_mean']:.3f}s")
    base = _fresh(bench, lambda b, srv: latency(b, srv, on_close=False)) if s.h_compare else None
    if base is not None:
        bench.say(f"  (h) for comparison, upload_on_close = false: p50 {base['latency']['p50']:.3f}s "
                  f"p99 {base['latency']['p99']:.3f}s")
    cr = _fresh(bench, crash)
    bench.say(f"  (h) crash after {cr['crash_after_s']:.0f}s: {cr['acknowledged']} acknowledged, "
              f"{len(cr['lost'])} of the {cr['acked_before_margin']} acknowledged > {ACK_MARGIN:.0f}s before "
              f"it lost; {cr['recent_missing']} of the {cr['recent']} of the last second not stored")
    res.extra = {"latency": lat, "settle_only": base, "crash": cr}
    if lat["stored"] < lat["files"]:
        res.notes.append(f"{lat['files'] - lat['stored']} of {lat['files']} files were not stored "
                         f"{DRAIN_WAIT:.0f}s after the last write")
    if cr["lost"]:
        res.notes.append("lost in the crash: " + ", ".join(cr["lost"][:20]))
    return res


def markdown(res: Result) -> list[str]:
    lat, cr = res.extra["latency"], res.extra["crash"]
    return [
        "| measure | p50 s | p99 s | max s |", "|---|---|---|---|",
        f"| close -> stored (server clock) | {lat['latency']['p50']:.3f} | {lat['latency']['p99']:.3f} | "
        f"{lat['latency']['max']:.3f} |",
        *([f"| (comparison) the same with upload_on_close = false | {b['latency']['p50']:.3f} | "
           f"{b['latency']['p99']:.3f} | {b['latency']['max']:.3f} |"] if (b := res.extra.get("settle_only")) else []),
        "",
        f"{lat['stored']}/{lat['files']} files stored; daemon CPU {lat['daemon_cpu_s']:.1f}s; syncd's own "
        f"`syncd_upload_delay_seconds`: {lat['hist_count']:.0f} observations, mean {lat['hist_mean']:.3f}s",
        "",
        f"Crash (kill -9 + watched dir and ledger deleted) after {cr['crash_after_s']:.0f}s: "
        f"{cr['acknowledged']} files acknowledged; {len(cr['lost'])} of the {cr['acked_before_margin']} "
        f"acknowledged more than {ACK_MARGIN:.0f}s before it are missing from the bucket; "
        f"{cr['recent_missing']} of the {cr['recent']} of its last second were not stored yet.",
    ]


def verdicts(res: Result | None) -> list[tuple[str, str, str]]:
    """(target, PASS|FAIL|SKIP, figures) for (h)."""
    t1 = "(h) close -> durable p50 <= 0.15 s and p99 <= 0.5 s at 50 files/s"
    t2 = "(h) crash (kill -9, watched dir and ledger deleted): 0 files acknowledged > 1 s before it lost"
    if res is None or not res.extra:
        return [(t1, "SKIP", "not run"), (t2, "SKIP", "not run")]
    lat, cr = res.extra["latency"], res.extra["crash"]
    p50, p99 = lat["latency"]["p50"], lat["latency"]["p99"]
    ok1 = p50 <= 0.15 and p99 <= 0.5 and lat["stored"] == lat["files"]
    ok2 = not cr["lost"] and cr["acked_before_margin"] > 0
    return [(t1, "PASS" if ok1 else "FAIL", f"p50 {p50:.3f}s, p99 {p99:.3f}s ({lat['stored']}/{lat['files']} stored)"),
            (t2, "PASS" if ok2 else "FAIL", f"{len(cr['lost'])} lost of {cr['acked_before_margin']}")]
