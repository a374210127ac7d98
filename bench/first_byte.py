"""(i) time to first byte of a missing file through `/files/` during a lazy start (issue 13, 16).

The 404 window of issue 13: a container starts on an empty disk, and the app's requests for files
that only S3 has arrive before the restore has brought them back. With `lazy_restore` and
`serve_files` syncd is READY after the listing and serves such a request by restoring that file
first (`syncd/files.py`), while the rest of the restore runs behind.

1. Lazy start: `i_files` objects (default 10,000 x 16 KiB) are seeded straight into a fresh moto
   server under the watch prefix; `syncd run` starts with `lazy_restore = true`,
   `serve_files = true`, an empty watch directory and a fresh ledger (it lists the remote, queues
   every file for restore, and is READY). The moment the ledger says READY, `i_clients` client
   threads request `i_requests` files (one per equal slice of the listing order, so they are
   spread over the key space and the last slice's is near the end of the restore order; the
   very last file is always one of them) through `GET /files/<watch prefix>/<path>`, one request
   after another, in a random order. Per request: the time to the first byte of the answer and
   to its last byte (connect included: loopback), the status, and whether the body's SHA-256 is
   the seeded file's. Then the restore is left to finish (every file on disk, every row synced).
   For comparison, per requested file: when the background restore would have reached it (the
   median `synced_at` of the 4 files nearest to it in the listing order that no request touched:
   the restore works in that order), and when the whole restore was done; all from READY.
2. For comparison (`i_compare`): the same start without `lazy_restore`, where READY (and any
   answer from the app's files) comes only after the whole restore; and the same requests to a
   daemon with no restore behind them (`restore = false`: each file is fetched on demand
   alone), which shows what the background restore's downloads cost the requests.

No target is defined by the issue: the figures are printed, not judged.
"""

from __future__ import annotations

import bisect
import hashlib
import random
import socket
import statistics
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from bench import data
from bench.scenarios import KEY_PREFIX, WATCH_PREFIX, Daemon, Result, pctl

if TYPE_CHECKING:
    from bench.s3server import MotoServer
    from bench.scenarios import Bench

NEIGHBOURS = 4  # untouched files around a requested one whose restore times say when its turn came
READY_POLL = 0.01
REQUEST_TIMEOUT = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> dict:
    """One `GET path` on a fresh connection: status, first-byte and total times, SHA-256 of the body."""
    t0 = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT)
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        chunks = [s.recv(65536)]
        ttfb = time.perf_counter() - t0
        while chunks[-1]:
            chunks.append(s.recv(1 << 20))
        total = time.perf_counter() - t0
    finally:
        s.close()
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return {"status": status, "ttfb": ttfb, "total": total, "sha256": hashlib.sha256(body).hexdigest(),
            "bytes": len(body)}


def pick(paths: list[str], n: int, rng: random.Random) -> list[str]:
    """`n` paths, one at random from each of `n` equal slices of `paths` (the listing order),
    the last path always among them (the end of the restore order)."""
    n = max(1, min(n, len(paths)))
    out = [paths[rng.randrange(i * len(paths) // n, (i + 1) * len(paths) // n)] for i in range(n)]
    out[-1] = paths[-1]
    return out


class Clients:
    """`n` threads that GET every path of `want` once through /files/, in a random order, one
    request after another each: `start()` at READY, `join()` returns path -> answer."""

    def __init__(self, port: int, want: dict[str, str], n: int) -> None:
        self.port = port
        self.todo = list(want)
        random.Random(7).shuffle(self.todo)
        self.results: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, name=f"bench-client-{i}") for i in range(n)]

    def start(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def join(self) -> dict[str, dict]:
        for t in self.threads:
            t.join()
        return self.results

    def _client(self) -> None:
        while True:
            with self.lock:
                if not self.todo:
                    return
                rel = self.todo.pop()
            try:
                r = get(self.port, f"/files/{WATCH_PREFIX}/{rel}")
            except (OSError, ValueError) as e:
                r = {"status": 0, "ttfb": float("nan"), "total": float("nan"), "sha256": "", "error": str(e)}
            with self.lock:
                self.results[rel] = r


def answers(results: dict[str, dict], want: dict[str, str]) -> dict:
    """How many answers were 200 with the right bytes, their statuses, TTFB and total."""
    ok = [rel for rel, r in results.items() if r["status"] == 200 and r["sha256"] == want[rel]]
    statuses: dict[str, int] = {}
    for r in results.values():
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    return {"requests": len(want), "right": len(ok), "statuses": statuses,
            "wrong": sorted(rel for rel in want if rel not in ok)[:20],
            "ttfb": pctl([r["ttfb"] for r in results.values()]),
            "total": pctl([r["total"] for r in results.values()])}


def _config(bench: Bench, srv: MotoServer, bucket: str, watch: Path, run_dir: Path, port: int, lazy: bool) -> Path:
    cfg = bench.syncd_config(srv, bucket, watch, run_dir, fresh=True)
    extra = f'health_listen = "127.0.0.1:{port}"\nserve_files = true\nlazy_restore = {str(lazy).lower()}'
    cfg.write_text(cfg.read_text().replace('health_listen = ""', extra, 1))  # in [syncd]
    return cfg


def _served(port: int) -> dict[str, float]:
    """syncd_served_total{source} from the daemon's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {s.labels.get("source", ""): s.value for fam in text_string_to_metric_families(text)
            if fam.name == "syncd_served" for s in fam.samples if s.name.endswith("_total")}


def _seeded(bench: Bench, srv: MotoServer, bucket: str, tree: Path) -> None:
    srv.bucket(bucket)
    n = srv.seed(bucket, KEY_PREFIX, tree)
    if n != bench.sizes.i_files:
        raise RuntimeError(f"(i) seeded {n} objects, expected {bench.sizes.i_files}")


def lazy_start(bench: Bench, srv: MotoServer, tree: Path, want: dict[str, str]) -> dict:
    """Part 1: READY, the requests, then the restore to its end. `want`: path -> sha256."""
    s = bench.sizes
    _seeded(bench, srv, "lazy", tree)
    watch, run_dir = bench.work / "i-lazy-watch", bench.work / "i-lazy"
    watch.mkdir(parents=True)  # empty: the container's fresh disk
    port = _free_port()
    cfg = _config(bench, srv, "lazy", watch, run_dir, port, lazy=True)
    daemon = Daemon(bench.tools["syncd"], cfg, run_dir / "ledger.db", bench.logs / "i-syncd.log")
    t_start = time.time()
    proc = daemon.start().proc
    assert proc is not None

    def restored() -> bool:
        rows = daemon._query("SELECT count(*) FROM files WHERE state='synced'")  # [] while the ledger is busy
        return bool(rows) and rows[0][0] >= s.i_files

    try:
        while daemon.meta("ready") != "1":  # Daemon.wait polls every 50 ms: too coarse here
            if proc.poll() is not None or time.time() - t_start > 600:
                raise RuntimeError(f"(i) syncd run not ready (log {daemon.log})")
            time.sleep(READY_POLL)
        t_ready = time.time()
        clients = Clients(port, want, s.i_clients).start()
        queued_at_ready = daemon._query("SELECT count(*) FROM files WHERE op='get'")
        results = clients.join()
        t_answered = time.time()
        daemon.wait(restored, 1800, "restored")
        served = _served(port)
        rows = daemon._query("SELECT id, path, synced_at FROM files ORDER BY id")
    finally:
        daemon.stop()
    on_disk = data.count_files(watch)
    t_done = max(r[2] or 0.0 for r in rows)
    # when the restore queue would have reached each requested file: its untouched neighbours'
    # restore times (rows are in the listing order, which is the queue's)
    untouched = [(i, r[2]) for i, r in enumerate(rows) if r[1] not in want]
    index = {r[1]: i for i, r in enumerate(rows)}
    reached: dict[str, float] = {}
    for rel in want:
        i = index[rel]
        at = bisect.bisect(untouched, (i, 0.0))
        near = sorted((abs(j - i), t) for j, t in untouched[max(0, at - NEIGHBOURS):at + NEIGHBOURS])
        if near:
            reached[rel] = statistics.median(t for _, t in near[:NEIGHBOURS]) - t_ready
    return {
        **answers(results, want), "files": s.i_files, "clients": s.i_clients,
        "ready_s": t_ready - t_start, "queued_at_ready": queued_at_ready[0][0] if queued_at_ready else -1,
        "answered_s": t_answered - t_ready,
        "reached": pctl(list(reached.values())),
        "done_s": t_done - t_ready, "on_disk": on_disk, "served": served,
    }


def quiet_start(bench: Bench, srv: MotoServer, tree: Path, want: dict[str, str]) -> dict:
    """Part 3: the same requests with no restore behind them (`restore = false`): what an
    on-demand restore costs alone, without the background restore's downloads beside it."""
    _seeded(bench, srv, "quiet", tree)
    watch, run_dir = bench.work / "i-quiet-watch", bench.work / "i-quiet"
    watch.mkdir(parents=True)
    port = _free_port()
    cfg = _config(bench, srv, "quiet", watch, run_dir, port, lazy=False)
    cfg.write_text(cfg.read_text() + "restore = false\n")  # the [[watch]] table is the last one
    daemon = Daemon(bench.tools["syncd"], cfg, run_dir / "ledger.db", bench.logs / "i-quiet-syncd.log").start()
    try:
        daemon.wait(lambda: daemon.meta("ready") == "1", 600, "ready")
        results = Clients(port, want, bench.sizes.i_clients).start().join()
    finally:
        daemon.stop()
    return answers(results, want)


def eager_start(bench: Bench, srv: MotoServer, tree: Path) -> dict:
    """Part 2: the same start without lazy_restore: READY after the whole restore."""
    _seeded(bench, srv, "eager", tree)
    watch, run_dir = bench.work / "i-eager-watch", bench.work / "i-eager"
    watch.mkdir(parents=True)
    cfg = _config(bench, srv, "eager", watch, run_dir, _free_port(), lazy=False)
    daemon = Daemon(bench.tools["syncd"], cfg, run_dir / "ledger.db", bench.logs / "i-eager-syncd.log")
    t_start = time.time()
    daemon.start()
    try:
        daemon.wait(lambda: daemon.meta("ready") == "1", 1800, "ready")
        ready = time.time() - t_start
    finally:
        daemon.stop()
    return {"ready_s": ready, "on_disk": data.count_files(watch)}


def scenario_i(bench: Bench) -> Result:
    s = bench.sizes
    res = Result("i", f"first byte through /files/ during a lazy start of {s.i_files:,} x {s.i_size // 1024} KiB: "
                      f"{s.i_requests} missing files requested at READY by {s.i_clients} clients")
    t0 = time.perf_counter()
    tree = data.make_tree(bench.work / "i-data", s.i_files, s.i_size, seed=6)
    paths = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.bin"))
    want = {rel: hashlib.sha256((tree / rel).read_bytes()).hexdigest()
            for rel in pick(paths, s.i_requests, random.Random(6))}
    bench.say(f"  (i) {s.i_files:,} files generated ({time.perf_counter() - t0:.0f}s)")
    lazy = _fresh(bench, lambda b, srv: lazy_start(b, srv, tree, want))
    bench.say(f"  (i) lazy: READY after {lazy['ready_s']:.2f}s; {lazy['right']}/{lazy['requests']} answered 200 "
              f"with the right bytes; TTFB p50 {lazy['ttfb']['p50']:.3f}s p99 {lazy['ttfb']['p99']:.3f}s; "
              f"the restore would have reached them at p50 {lazy['reached']['p50']:.1f}s p99 "
              f"{lazy['reached']['p99']:.1f}s; whole restore {lazy['done_s']:.1f}s after READY")
    eager = _fresh(bench, lambda b, srv: eager_start(b, srv, tree)) if s.i_compare else None
    if eager is not None:
        bench.say(f"  (i) without lazy_restore: READY after {eager['ready_s']:.1f}s")
    quiet = _fresh(bench, lambda b, srv: quiet_start(b, srv, tree, want)) if s.i_compare else None
    if quiet is not None:
        bench.say(f"  (i) the same requests with no restore behind them: {quiet['right']}/{quiet['requests']} right; "
                  f"TTFB p50 {quiet['ttfb']['p50']:.3f}s p99 {quiet['ttfb']['p99']:.3f}s")
    res.extra = {"lazy": lazy, "eager": eager, "quiet": quiet, "size": s.i_size}
    for what, a in (("lazy start", lazy), ("no restore behind", quiet)):
        if a is not None and a["right"] < a["requests"]:
            res.notes.append(f"{what}: {a['requests'] - a['right']} of {a['requests']} requests did not get 200 "
                             f"with the right bytes (statuses {a['statuses']}): {', '.join(a['wrong'])}")
    for what, got in (("lazy", lazy["on_disk"]), ("without lazy_restore", eager["on_disk"] if eager else s.i_files)):
        if got != s.i_files:
            res.notes.append(f"{what}: {got} of {s.i_files} files on disk at the end")
    return res


def _fresh(bench: Bench, part):  # noqa: ANN001, ANN202 - part(bench, srv) -> dict
    srv = bench.server()  # a fresh server per part: moto keeps every object in memory
    try:
        return part(bench, srv)
    finally:
        srv.stop()


def markdown(res: Result) -> list[str]:
    lz, eg = res.extra["lazy"], res.extra.get("eager")
    out = [
        "| measure (seconds; from READY unless said) | p50 | p99 | max |", "|---|---|---|---|",
        f"| time to first byte of a missing file through /files/ | {lz['ttfb']['p50']:.3f} | "
        f"{lz['ttfb']['p99']:.3f} | {lz['ttfb']['max']:.3f} |",
        f"| time to the last byte ({res.extra['size'] // 1024} KiB) | {lz['total']['p50']:.3f} | "
        f"{lz['total']['p99']:.3f} | {lz['total']['max']:.3f} |",
        *([f"| (comparison) first byte of the same requests with no restore behind them (`restore = false`) | "
           f"{q['ttfb']['p50']:.3f} | {q['ttfb']['p99']:.3f} | {q['ttfb']['max']:.3f} |"]
          if (q := res.extra.get("quiet")) else []),
        f"| (comparison) when the background restore reached the same files | {lz['reached']['p50']:.2f} | "
        f"{lz['reached']['p99']:.2f} | {lz['reached']['max']:.2f} |",
        "",
        "| start | READY after s (from process start) | every file restored after s (from READY) |",
        "|---|---|---|",
        f"| lazy_restore + serve_files | {lz['ready_s']:.2f} | {lz['done_s']:.1f} |",
        *([f"| (comparison) without lazy_restore | {eg['ready_s']:.1f} | (before READY) |"] if eg else []),
        "",
        f"{lz['right']}/{lz['requests']} requests answered 200 with the seeded bytes (statuses: "
        f"{', '.join(f'{k} x{v}' for k, v in sorted(lz['statuses'].items()))}); {lz['clients']} client threads, "
        f"all answered {lz['answered_s']:.2f}s after READY; syncd_served_total: "
        f"{', '.join(f'{k} {v:.0f}' for k, v in sorted(lz['served'].items())) or 'none'}; "
        f"{lz['on_disk']:,}/{lz['files']:,} files on disk at the end.",
    ]
    return out
