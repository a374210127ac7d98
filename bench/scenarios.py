"""The scenarios of issue 7, (a)-(g). Each returns a `Result` with the raw samples.

Every measured run gets the same server state: first uploads start a fresh moto server per run;
no-op and restore runs share one server per scenario, whose contents they do not change (checked:
a no-op run that stores anything fails the scenario).
"""

from __future__ import annotations

import heapq
import http.client
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import data
from bench.s3server import MotoServer, _vm
from bench.tools import (
    Sample,
    Tool,
    aws_sync,
    bench_env,
    measure,
    rclone_env,
    rclone_sync,
    write_syncd_config,
)

MIB = 1024 * 1024
CEILING = "ceiling"  # (a) only, not a target: bench/ceiling.py, the same PUTs without syncd around them
LIST_FLOOR = "list-floor"  # (c) only, not a target: bench/ceiling.py --list, the listing alone
PREFIX = "bench"  # syncd: remote url s3://BUCKET/bench, watch prefix "data"
WATCH_PREFIX = "data"
KEY_PREFIX = f"{PREFIX}/{WATCH_PREFIX}"


@dataclass
class Sizes:
    a_files: int = 2000
    a_size: int = 4096
    b_files: int = 4
    b_size: int = 64 * MIB
    d_files: int = 100_000
    d_size: int = 1024
    e_rate: float = 100.0
    e_seconds: float = 30.0
    e_settle: float = 2.0
    f_small: int = 10_000
    f_large: int = 100_000
    h_rate: float = 50.0  # (h) the loss window: files/s, for h_seconds; the crash after h_crash_at
    h_seconds: float = 30.0
    h_crash_at: float = 10.0
    h_compare: bool = True  # also the run with upload_on_close = false (for comparison)
    k_rate: float = 50.0  # (k) the loss window under load: files/s of all writers together
    k_backlog: int = 2000  # files queued before the start in the backlog runs
    k_kills: int = 5  # runs (one kill each) per mode
    k_kill_between: tuple[float, float] = (4.0, 20.0)  # seconds after READY: the kill, uniform
    i_files: int = 10_000  # (i) first byte through /files/ during a lazy start of i_files x i_size
    i_size: int = 16 * 1024
    i_requests: int = 100  # missing files requested at READY, by i_clients threads
    i_clients: int = 4
    i_compare: bool = True  # also the start without lazy_restore (time to READY, for comparison)
    s_files: int = 100  # (s) shared watches: files written on host a, at s_rate files/s
    s_rate: float = 10.0
    s_rescan: float = 5.0  # remote_rescan_interval of the run without events_queue
    s_compare: bool = True  # also the events run with upload_on_close = false (for comparison)
    s_quiet: float = 4.0  # seconds after convergence before the counters are read (settle + 2)
    l_seconds: float = 40.0  # (l) bwlimit: each transfer sized to take about this long at its limit
    l_window: float = 30.0  # the rate must hold over every window of this many seconds
    l_small_size: int = 4096
    l_small_limit: str = "512K"  # what 4 KiB files can reach here (unlimited, (a): ~1.5 MiB/s of bodies)
    l_large_size: int = 64 * MIB
    l_large_limit: str = "8M"


FULL = Sizes()
QUICK = Sizes(a_files=300, b_files=2, d_files=10_000, e_seconds=8.0, f_small=2_000, f_large=10_000,
              h_seconds=8.0, h_crash_at=5.0, k_backlog=300, k_kills=1, k_kill_between=(3.0, 6.0), i_files=2_000, i_requests=50, s_files=30, l_seconds=8.0, l_window=5.0)


@dataclass
class Result:
    key: str  # "a".."g"
    title: str
    unit: str = ""  # "files" or "MiB": what `work` counts, for throughput
    work: float = 0.0
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, tool: str, s: Sample) -> None:
        self.samples.setdefault(tool, []).append(s)

    def median(self, tool: str, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples[tool])

    def rate(self, tool: str) -> float:
        return self.work / self.median(tool, "wall")


class Bench:
    def __init__(self, tools: dict[str, Tool], work: Path, sizes: Sizes, rounds: int, say=print,
                 latency_ms: float = 0.0, server_kind: str = "waitress") -> None:
        self.tools = tools
        self.latency_ms = latency_ms  # every request of the bench server delayed by this (run.py --latency-ms)
        self.server_kind = server_kind  # which S3 server (run.py --server; bench/s3server.py SERVERS)
        self.work = work
        self.sizes = sizes
        self.rounds = rounds
        self.say = say
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._a_data: Path | None = None

    # --- plumbing -----------------------------------------------------------------------------
    def server(self) -> MotoServer:
        return MotoServer(latency_ms=self.latency_ms, kind=self.server_kind).start(self.logs / "moto.log")

    def order(self, r: int) -> list[str]:
        """Alternate: each round starts with the next tool."""
        names = list(self.tools)
        k = r % len(names)
        return names[k:] + names[:k]

    def a_data(self) -> Path:
        if self._a_data is None:
            s = self.sizes
            self._a_data = data.make_tree(self.work / "a-data", s.a_files, s.a_size, seed=1)
        return self._a_data

    def syncd_config(self, srv: MotoServer, bucket: str, watch: Path, run_dir: Path, *, fresh: bool = False,
                     **kw: Any) -> Path:
        if fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        return write_syncd_config(run_dir / "syncd.toml", endpoint=srv.endpoint, bucket=bucket, prefix=PREFIX,
                                  watch=watch, watch_prefix=WATCH_PREFIX, ledger=run_dir / "ledger.db", **kw)

    def push(self, name: str, srv: MotoServer, bucket: str, src: Path, run_dir: Path, log: Path,
             fresh: bool = False) -> Sample:
        """Upload (or no-op sync) `src` to s3://bucket/bench/data with one tool."""
        if name == CEILING:
            return measure([sys.executable, str(Path(__file__).with_name("ceiling.py")), srv.endpoint, bucket,
                            KEY_PREFIX, str(src)], env=bench_env(), log=log)
        tool = self.tools[name]
        if name == "syncd":
            cfg = self.syncd_config(srv, bucket, src, run_dir, fresh=fresh)
            return measure([*tool.argv, "--config", str(cfg), "resync"], env=bench_env(), log=log)
        if name == "aws":
            return measure(aws_sync(tool, srv.endpoint, str(src), f"s3://{bucket}/{KEY_PREFIX}"),
                           env=bench_env(), log=log)
        return measure(rclone_sync(tool, str(src), f"bench:{bucket}/{KEY_PREFIX}"),
                       env=rclone_env(srv.endpoint, self.work / "rclone.conf"), log=log)

    def pull(self, name: str, srv: MotoServer, bucket: str, dest: Path, log: Path) -> Sample:
        """Download s3://bucket/bench/data into `dest` (an empty directory) with a peer."""
        tool = self.tools[name]
        if name == "aws":
            return measure(aws_sync(tool, srv.endpoint, f"s3://{bucket}/{KEY_PREFIX}", str(dest)),
                           env=bench_env(), log=log)
        return measure(rclone_sync(tool, f"bench:{bucket}/{KEY_PREFIX}", str(dest)),
                       env=rclone_env(srv.endpoint, self.work / "rclone.conf"), log=log)

    def check_count(self, srv: MotoServer, bucket: str, want: int, what: str) -> None:
        got = srv.count(bucket, KEY_PREFIX + "/")
        if got != want:
            raise RuntimeError(f"{what}: {got} objects in s3://{bucket}/{KEY_PREFIX}, expected {want}")

    # --- (a), (b): first upload ---------------------------------------------------------------
    def first_upload(self, key: str, title: str, src: Path, n: int, unit: str, work: float,
                     info: tuple[str, ...] = ()) -> Result:
        res = Result(key, title, unit=unit, work=work)
        # one unmeasured run first: the first upload after the dataset was written paid for page
        # reclaim in the server (up to a third more server CPU), and the rotation always put the
        # same tool (syncd) in that slot
        warm = self.order(0)[0]
        srv = self.server()
        try:
            srv.bucket(f"{key}-warmup")
            self.push(warm, srv, f"{key}-warmup", src, self.work / key / "warmup", self.logs / f"{key}-warmup.log",
                      fresh=True)
        finally:
            srv.stop()
        shutil.rmtree(self.work / key / "warmup", ignore_errors=True)
        for r in range(self.rounds):
            for name in self.order(r) + list(info):
                srv = self.server()
                try:
                    bucket = f"{key}-{name}-{r}"
                    srv.bucket(bucket)
                    cpu0 = srv.cpu()
                    s = self.push(name, srv, bucket, src, self.work / key / f"{name}-{r}",
                                  self.logs / f"{key}-{name}.log", fresh=True)
                    res.extra.setdefault("server_cpu", {}).setdefault(name, []).append(srv.cpu() - cpu0)
                    self.check_count(srv, bucket, n, f"({key}) {name}")
                finally:
                    srv.stop()
                res.add(name, s)
                self.say(f"  ({key}) round {r + 1} {name}: {s.wall:.2f}s wall, {s.cpu:.2f}s CPU, "
                         f"{s.rss_mib:.0f} MiB; server {res.extra['server_cpu'][name][-1]:.2f}s CPU")
        return res

    def scenario_a(self) -> Result:
        s = self.sizes
        return self.first_upload("a", f"first upload, {s.a_files:,} x {s.a_size // 1024} KiB", self.a_data(),
                                 s.a_files, "files", s.a_files, info=(CEILING,))

    def scenario_b(self) -> Result:
        s = self.sizes
        src = data.make_tree(self.work / "b-data", s.b_files, s.b_size, seed=2)
        return self.first_upload("b", f"first upload, {s.b_files} x {s.b_size // MIB} MiB", src, s.b_files,
                                 "MiB", s.b_files * s.b_size / MIB)

    # --- (c): no-op resync of (a) -------------------------------------------------------------
    def scenario_c(self) -> Result:
        s = self.sizes
        res = Result("c", f"no-op resync of (a), {s.a_files:,} files", unit="files", work=s.a_files)
        srv = self.server()
        try:
            for name in self.tools:  # each tool's own first upload, not measured
                srv.bucket(f"c-{name}")
                self.push(name, srv, f"c-{name}", self.a_data(), self.work / "c" / name, self.logs / f"c-{name}.log",
                          fresh=True)
            for r in range(self.rounds):
                for name in self.order(r):
                    before = len(srv.stored(f"c-{name}"))
                    smp = self.push(name, srv, f"c-{name}", self.a_data(), self.work / "c" / name,
                                    self.logs / f"c-{name}.log")
                    if len(srv.stored(f"c-{name}")) != before:
                        raise RuntimeError(f"(c) {name}: the no-op run uploaded something")
                    res.add(name, smp)
                    self.say(f"  (c) round {r + 1} {name}: {smp.wall:.2f}s wall, {smp.cpu:.2f}s CPU")
                # the floor under any botocore tool's no-op: start, client, listing of syncd's objects
                smp = measure([sys.executable, str(Path(__file__).with_name("ceiling.py")), "--list", srv.endpoint,
                               "c-syncd", KEY_PREFIX], env=bench_env(), log=self.logs / "c-list-floor.log")
                res.add(LIST_FLOOR, smp)
                self.say(f"  (c) round {r + 1} bare botocore listing: {smp.wall:.2f}s wall, {smp.cpu:.2f}s CPU")
        finally:
            srv.stop()
        return res

    # --- (d), (f): a large tracked tree ---------------------------------------------------------
    def tracked_tree(self, srv: MotoServer, bucket: str, n: int, name: str) -> tuple[Path, Path]:
        """`n` files on disk, the same objects in the bucket, and a syncd ledger that tracks them."""
        t0 = time.perf_counter()
        tree = data.make_tree(self.work / f"{name}-data", n, self.sizes.d_size, seed=4)
        srv.bucket(bucket)
        srv.seed(bucket, KEY_PREFIX, tree)
        run_dir = self.work / name / "syncd"
        cfg = self.syncd_config(srv, bucket, tree, run_dir, fresh=True)
        data.seed_ledger(run_dir / "ledger.db", watch=tree, watch_prefix=WATCH_PREFIX, remote_prefix=PREFIX)
        self.say(f"  ({name}) {n:,} files on disk, in the bucket and in syncd's ledger "
                 f"({time.perf_counter() - t0:.0f}s to prepare)")
        return tree, cfg

    def scenario_d_f(self) -> tuple[Result, Result]:
        s = self.sizes
        d = Result("d", f"no-op start, {s.d_files:,} tracked files", unit="files", work=s.d_files)
        f = Result("f", "daemon RSS when ready and idle")
        srv = self.server()
        try:
            tree, cfg = self.tracked_tree(srv, "tracked", s.d_files, "d")
            syncd = self.tools["syncd"]
            for r in range(self.rounds):
                for name in self.order(r):
                    if name == "syncd":
                        smp = measure([*syncd.argv, "--config", str(cfg), "resync"], env=bench_env(),
                                      log=self.logs / "d-syncd.log")
                    else:
                        smp = self.push(name, srv, "tracked", tree, self.work / "d" / name, self.logs / f"d-{name}.log")
                    if srv.stored("tracked"):
                        raise RuntimeError(f"(d) {name}: the no-op run uploaded something")
                    d.add(name, smp)
                    self.say(f"  (d) round {r + 1} {name}: {smp.wall:.2f}s wall, {smp.cpu:.2f}s CPU, "
                             f"{smp.rss_mib:.0f} MiB")
            configs = {s.d_files: cfg}
            for n in (s.f_small, s.f_large):
                if n not in configs:
                    configs[n] = self.tracked_tree(srv, f"tracked-{n}", n, f"f{n}")[1]
            for n in (s.f_small, s.f_large):
                for _ in range(self.rounds):
                    info = self.daemon_idle_rss(configs[n])
                    f.extra.setdefault(n, []).append(info)
                    self.say(f"  (f) {n:,} tracked files: VmHWM {info['hwm']:.1f} MiB, VmRSS {info['rss']:.1f} MiB, "
                             f"ready after {info['ready_s']:.2f}s")
        finally:
            srv.stop()
        return d, f

    def daemon_idle_rss(self, cfg: Path) -> dict[str, float]:
        ledger = cfg.parent / "ledger.db"
        d = Daemon(self.tools["syncd"], cfg, ledger, self.logs / "f-syncd.log").start()
        try:
            t0 = time.perf_counter()
            d.wait(lambda: d.meta("ready") == "1", 600, "ready")
            ready_s = time.perf_counter() - t0
            d.wait(lambda: d.backlog() == 0, 600, "idle")
            time.sleep(1.0)
            return {"hwm": _vm(d.pid, "VmHWM"), "rss": _vm(d.pid, "VmRSS"), "ready_s": ready_s}
        finally:
            d.stop()

    # --- (e): daemon latency ------------------------------------------------------------------
    def scenario_e(self) -> Result:
        s = self.sizes
        res = Result("e", f"daemon latency, {s.e_rate:.0f} files/s for {s.e_seconds:.0f}s, "
                          f"settle_seconds={s.e_settle}")
        srv = self.server()
        watch = self.work / "e-watch"
        try:
            srv.bucket("latency")
            cfg = self.syncd_config(srv, "latency", watch, self.work / "e", fresh=True, settle=s.e_settle)
            daemon = Daemon(self.tools["syncd"], cfg, self.work / "e" / "ledger.db", self.logs / "e-syncd.log")
            daemon.start()
            try:
                daemon.wait(lambda: daemon.meta("ready") == "1", 120, "ready")
                cpu0 = daemon.cpu()
                closed, readable = self._write_and_poll(srv, watch, s)
                cpu = daemon.cpu() - cpu0
                hwm = _vm(daemon.pid, "VmHWM")
            finally:
                daemon.stop()
            stored = srv.stored("latency")
        finally:
            srv.stop()
        n = len(closed)
        head = [readable[i] - closed[i] for i in range(n) if i in readable]
        put = [stored[k] - closed[i] for i in range(n) if (k := latency_key(i)) in stored]
        res.extra = {"files": n, "readable": len(head), "settle": s.e_settle, "daemon_cpu_s": cpu,
                     "daemon_hwm_mib": hwm, "head": pctl(head), "stored": pctl(put)}
        if len(head) < n:
            res.notes.append(f"{n - len(head)} of {n} files were not readable within the wait")
        self.say(f"  (e) {len(head)}/{n} readable; HEAD p50 {res.extra['head']['p50']:.3f}s "
                 f"p99 {res.extra['head']['p99']:.3f}s; server-side p50 {res.extra['stored']['p50']:.3f}s "
                 f"p99 {res.extra['stored']['p99']:.3f}s; daemon CPU {cpu:.1f}s")
        return res

    def _write_and_poll(self, srv: MotoServer, watch: Path, s: Sizes) -> tuple[list[float], dict[int, float]]:
        """Write files at a steady rate; HEAD each from close + settle every POLL seconds until it is there."""
        n = int(s.e_rate * s.e_seconds)
        closed: list[float] = []
        readable: dict[int, float] = {}
        heap: list[tuple[float, int]] = []
        cond = threading.Condition()
        done = threading.Event()
        payload = os.urandom(4096)

        def writer() -> None:
            t0 = time.monotonic()
            for i in range(n):
                delay = t0 + i / s.e_rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                with open(watch / latency_key(i).rsplit("/", 1)[1], "wb") as fh:
                    fh.write(payload)
                t = time.time()
                closed.append(t)
                with cond:
                    heapq.heappush(heap, (t + s.e_settle, i))
                    cond.notify()
            done.set()

        def poller() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
            while True:
                with cond:
                    while not heap:
                        if done.is_set() and not heap:
                            return
                        cond.wait(0.1)
                    due, i = heapq.heappop(heap)
                wait = due - time.time()
                if wait > 0:
                    time.sleep(wait)
                conn.request("HEAD", f"/latency/{latency_key(i)}", headers=FAKE_AUTH)
                resp = conn.getresponse()
                resp.read()
                now = time.time()
                if resp.status == 200:
                    readable[i] = now
                elif now - closed[i] < s.e_settle + 30:
                    with cond:
                        heapq.heappush(heap, (now + POLL, i))

        threads = [threading.Thread(target=writer)] + [threading.Thread(target=poller) for _ in range(POLLERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return closed, readable

    # --- (g): restore of (a) ------------------------------------------------------------------
    def scenario_g(self) -> Result:
        s = self.sizes
        res = Result("g", f"restore of (a) after deleting the local tree, {s.a_files:,} files", unit="files",
                     work=s.a_files)
        srv = self.server()
        try:
            srv.bucket("restore")
            watch = self.work / "g" / "watch"
            shutil.copytree(self.a_data(), watch)
            self.push("syncd", srv, "restore", watch, self.work / "g" / "syncd", self.logs / "g-syncd.log",
                      fresh=True)
            self.check_count(srv, "restore", s.a_files, "(g) upload")
            for r in range(self.rounds):
                for name in self.order(r):
                    if name == "syncd":
                        shutil.rmtree(watch)
                        smp = self.push("syncd", srv, "restore", watch, self.work / "g" / "syncd",
                                        self.logs / "g-syncd.log")
                        dest = watch
                    else:
                        dest = self.work / "g" / f"{name}-dest"
                        if dest.exists():
                            shutil.rmtree(dest)
                        dest.mkdir()
                        smp = self.pull(name, srv, "restore", dest, self.logs / f"g-{name}.log")
                    got = data.count_files(dest)
                    if got != s.a_files:
                        raise RuntimeError(f"(g) {name}: restored {got} files, expected {s.a_files}")
                    res.add(name, smp)
                    self.say(f"  (g) round {r + 1} {name}: {smp.wall:.2f}s wall, {smp.cpu:.2f}s CPU, "
                             f"{smp.rss_mib:.0f} MiB")
        finally:
            srv.stop()
        return res


POLL = 0.025  # seconds between HEADs of one object
POLLERS = 4
# moto does not check signatures, but an unsigned request is anonymous and denied
FAKE_AUTH = {"Authorization": "AWS4-HMAC-SHA256 Credential=testing/20250101/us-east-1/s3/aws4_request, "
                              "SignedHeaders=host, Signature=00", "x-amz-date": "20250101T000000Z"}


def latency_key(i: int) -> str:
    return f"{KEY_PREFIX}/l{i:06d}.bin"


def pctl(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    v = sorted(values)
    return {"p50": v[int(0.50 * (len(v) - 1))], "p99": v[int(0.99 * (len(v) - 1))], "max": v[-1]}


class Daemon:
    """`syncd run` as a child process; readiness and backlog read from its ledger."""

    def __init__(self, tool: Tool, cfg: Path, ledger: Path, log: Path) -> None:
        self.argv = [*tool.argv, "--config", str(cfg), "run"]
        self.ledger = ledger
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Daemon:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=bench_env(),
                                         stdin=subprocess.DEVNULL)
        return self

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
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

    def meta(self, name: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE name=?", (name,))
        return rows[0][0] if rows else None

    def backlog(self) -> int:
        rows = self._query("SELECT count(*) FROM files WHERE state IN ('pending','uploading')")
        return rows[0][0] if rows else -1

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait(self, cond, timeout: float, what: str) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not cond():
            if self.proc.poll() is not None:
                raise RuntimeError(f"syncd run exited {self.proc.returncode} before {what} (log {self.log})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"syncd run: not {what} after {timeout}s (log {self.log})")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
