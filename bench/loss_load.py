"""(k) the loss window under load, with kills (issue 22), opt-in: `bench/run.py --only k`.

(h) (bench/loss_window.py) measures one writer on an idle daemon and one kill. Here the host is
busy and killed at random moments:

- `K_WRITERS` app threads write at `k_rate` files/s together, sizes log-uniform from 1 KiB to
  1 MiB (mean about 150 KB), each file written and closed by its writer, unique content. Each
  writer starts a new directory every `K_NEW_DIR_EVERY` files (the first files of a fresh
  `2026/12/01/`: the watcher walks it and asks for read leases). One operation in
  `K_DELETE_EVERY` is instead the deletion of one of the writer's own files written at least
  `K_DELETE_AGE` s before (uploaded by then, usually), acknowledged when `unlink` returns.
- Two modes: `steady` (the writers alone) and `backlog` (`k_backlog` files of the same sizes
  written while syncd was stopped, mtimes a day old: the start's scan queues them, a catch-up
  behind the app's files).
- Each run: a fresh moto server and host (watch directory, ledger), `syncd run` with its defaults
  (8 workers, settle_seconds 2.0, upload_on_close, on_delete = "keep"); at READY the writers
  start; after a random moment (uniform in `k_kill_between`, seeded) syncd is killed (`kill -9`)
  and the watched directory and the ledger are deleted (the host is gone).
- Durable: an upload when the server stored its object; a deletion (of a file the server had
  stored) when the server stored its tombstone (`.syncd/tombstones/<path>`): without it a new
  host restores the file. Both times are the server's clock (`time.time()` on this host, as the
  writers'). Acknowledged-to-durable p50/p99/max per run, over what was acknowledged more than
  `ACK_MARGIN` s before the kill and became durable; lost: acknowledged more than 0.5 s / 1 s
  before the kill and not durable (an upload of a file deleted meanwhile is not counted).

Targets (issue 22): in the `backlog` runs, uploads (files up to 1 MiB at 50 files/s with the
backlog behind them) close -> durable p99 <= 0.5 s; in every run, 0 uploads or deletions lost
that were acknowledged more than 1 s before the kill.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.loss_window import _config, _free_port, _fresh, _key
from bench.report import Verdict
from bench.scenarios import Daemon, Result, pctl

if TYPE_CHECKING:
    from bench.s3server import MotoServer
    from bench.scenarios import Bench

LOAD = "k"
K_WRITERS = 4
K_MIN, K_MAX = 1024, 1024 * 1024
K_NEW_DIR_EVERY = 100
K_DELETE_EVERY = 5  # one operation in five is a deletion (10/s at 50 files/s)
K_DELETE_AGE = 2.0
ACK_MARGIN = 1.0  # the latency figures cover what was acknowledged this long before the kill
MARGINS = (0.5, 1.0)  # lost counts: acknowledged more than this before the kill, not durable
TOMBS = ".syncd/tombstones"


def _size(rng: random.Random) -> int:
    return int(math.exp(rng.uniform(math.log(K_MIN), math.log(K_MAX))))


class LoadWriter(threading.Thread):
    """One app thread: a file (or a deletion) every `writers / rate` s until `stop`."""

    def __init__(self, watch: Path, n: int, rate: float, seed: int) -> None:
        super().__init__(name=f"bench-writer-{n}", daemon=True)
        self.watch, self.n, self.period = watch, n, 1.0 / rate
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.closed: list[tuple[str, float]] = []  # (relative path, when its writer closed it)
        self.deleted: list[tuple[str, float]] = []  # (relative path, when unlink returned)

    def run(self) -> None:
        t0, i, files = time.monotonic(), 0, 0
        alive: list[tuple[str, float]] = []
        while not self.stop.is_set():
            delay = t0 + i * self.period - time.monotonic()
            if delay > 0 and self.stop.wait(delay):
                return
            i += 1
            try:
                old = [k for k, (_r, t) in enumerate(alive) if t < time.time() - K_DELETE_AGE]
                if i % K_DELETE_EVERY == 0 and old:
                    rel, _t = alive.pop(self.rng.choice(old))
                    os.unlink(self.watch / rel)
                    self.deleted.append((rel, time.time()))
                    continue
                d = self.watch / f"w{self.n}" / f"day{files // K_NEW_DIR_EVERY:03d}"
                if files % K_NEW_DIR_EVERY == 0:
                    d.mkdir(parents=True, exist_ok=True)
                rel = f"w{self.n}/{d.name}/f{files:06d}.bin"
                with open(self.watch / rel, "wb") as f:
                    f.write(self.rng.randbytes(_size(self.rng)))
                t = time.time()
            except OSError:
                return  # the host is gone
            files += 1
            self.closed.append((rel, t))
            alive.append((rel, t))


def _backlog(watch: Path, n: int, seed: int) -> int:
    """`n` files written while syncd was stopped (a day old): the start's scan queues them."""
    rng = random.Random(seed)
    old = time.time() - 86400
    total = 0
    for i in range(n):
        p = watch / "backlog" / f"b{i // 100:02d}" / f"b{i:05d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(_size(rng))
        p.write_bytes(data)
        os.utime(p, (old, old))
        total += len(data)
    return total


def _figures(acked: list[tuple[str, float]], durable: dict[str, float], kill_t: float) -> dict[str, Any]:
    """Latency over what was acknowledged ACK_MARGIN s before the kill; lost per margin."""
    lat = [durable[rel] - t for rel, t in acked if t < kill_t - ACK_MARGIN and rel in durable]
    out: dict[str, Any] = {"acked": len(acked), "latency": pctl(lat), "samples": lat}
    for m in MARGINS:
        lost = [round(kill_t - t, 3) for rel, t in acked if t < kill_t - m and rel not in durable]
        out[f"lost_{m:g}"] = lost  # how long before the kill each was acknowledged
    return out


def run_once(bench: Bench, srv: MotoServer, backlog: int, kill_after: float, seed: int) -> dict[str, Any]:
    s = bench.sizes
    name = f"kill-{seed}"
    srv.bucket(name)
    watch, run_dir = bench.work / f"k-{name}-watch", bench.work / f"k-{name}"
    shutil.rmtree(watch, ignore_errors=True)
    watch.mkdir(parents=True)
    backlog_bytes = _backlog(watch, backlog, seed) if backlog else 0
    cfg = _config(bench, srv, name, watch, run_dir, _free_port())
    writers = [LoadWriter(watch, n, s.k_rate / K_WRITERS, seed * 100 + n) for n in range(K_WRITERS)]
    daemon = Daemon(bench.tools["syncd"], cfg, run_dir / "ledger.db", bench.logs / f"k-{name}-syncd.log").start()
    load = os.getloadavg()[0]
    try:
        daemon.wait(lambda: daemon.meta("ready") == "1", 300, "ready")
        cpu0, start_t = daemon.cpu(), time.time()
        for w in writers:
            w.start()
        time.sleep(kill_after)
        cpu = daemon.cpu() - cpu0
        kill_t = time.time()
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGKILL)  # the host dies: syncd, its disk, its ledger
        for w in writers:
            w.stop.set()
        daemon.proc.wait(10)
        shutil.rmtree(watch, ignore_errors=True)
        for p in run_dir.glob("ledger.db*"):
            p.unlink()
        for w in writers:
            w.join()
    finally:
        daemon.stop()
    time.sleep(0.5)  # a PUT the server had fully received before the kill may still be stored
    stored = {k.removeprefix(f"{_key('')}"): t for k, t in srv.stored(name).items()}
    closed = [(rel, t) for w in writers for rel, t in w.closed if t <= kill_t]
    deleted = [(rel, t) for w in writers for rel, t in w.deleted if t <= kill_t]
    gone = {rel for rel, _t in deleted}
    # an upload of a file the app deleted is not lost when it never arrived: nothing to keep
    uploads = [(rel, t) for rel, t in closed if rel in stored or rel not in gone]
    # a deletion needs a tombstone when the file reached the store (else nothing comes back)
    needed = [(rel, t) for rel, t in deleted if rel in stored]
    tombs = {k.removeprefix(f"{TOMBS}/"): t for k, t in stored.items() if k.startswith(f"{TOMBS}/")}
    done = [stored.get(f"backlog/b{i // 100:02d}/b{i:05d}.bin", math.inf) for i in range(backlog)]
    left = sum(1 for t in done if t > kill_t)
    return {"mode": "backlog" if backlog else "steady", "kill_after_s": kill_after, "load": load,
            "backlog": backlog, "backlog_mb": backlog_bytes / 1e6, "backlog_left": left,
            "backlog_drained_s": max(done) - start_t if backlog and not left else None, "daemon_cpu_s": cpu,
            "uploads": _figures(uploads, stored, kill_t), "deletions": _figures(needed, tombs, kill_t),
            "deleted_unstored": len(deleted) - len(needed)}


def scenario_k(bench: Bench) -> Result:
    s = bench.sizes
    res = Result(LOAD, f"loss window under load: {K_WRITERS} writers, {s.k_rate:g} files/s of 1 KiB-1 MiB, one "
                       f"operation in {K_DELETE_EVERY} a deletion; killed at random moments")
    rng = random.Random(22)
    runs = []
    for mode, backlog in (("steady", 0), ("backlog", s.k_backlog)):
        for _ in range(s.k_kills):
            kill_after = round(rng.uniform(*s.k_kill_between), 1)
            seed = len(runs) + 1
            r = _fresh(bench, lambda b, srv, backlog=backlog, k=kill_after, seed=seed: run_once(b, srv, backlog, k, seed))
            up, de = r["uploads"], r["deletions"]
            bench.say(f"  (k) {mode} kill at {kill_after:g}s (load {r['load']:.1f}): uploads {up['acked']} p50 "
                      f"{up['latency']['p50']:.3f}s p99 {up['latency']['p99']:.3f}s max {up['latency']['max']:.3f}s, "
                      f"lost >0.5s {len(up['lost_0.5'])} >1s {len(up['lost_1'])}; deletions {de['acked']} p50 "
                      f"{de['latency']['p50']:.3f}s p99 {de['latency']['p99']:.3f}s max {de['latency']['max']:.3f}s, "
                      f"lost >0.5s {len(de['lost_0.5'])} >1s {len(de['lost_1'])}"
                      + (f"; backlog left {r['backlog_left']}/{backlog}" if backlog else ""))
            runs.append(r)
    res.extra = {"runs": runs}
    return res


def _pooled(runs: list[dict], what: str) -> dict[str, float]:
    return pctl([x for r in runs for x in r[what]["samples"]])


def verdicts(res: Result | None) -> list[Verdict]:
    if res is None or not res.extra:
        return []
    runs = res.extra["runs"]
    back = [r for r in runs if r["mode"] == "backlog"]
    p = _pooled(back, "uploads")
    t1 = "(k) with a 2,000-file backlog queued: close -> durable p99 <= 0.5 s, files up to 1 MiB at 50 files/s"
    t2 = "(k) killed at random moments: 0 uploads or deletions lost that were acknowledged > 1 s before the kill"
    lost = sum(len(r[w]["lost_1"]) for r in runs for w in ("uploads", "deletions"))
    acked = sum(r[w]["acked"] for r in runs for w in ("uploads", "deletions"))
    return [Verdict(0, t1, "PASS" if back and p["p99"] <= 0.5 else "FAIL",
                    f"p99 {p['p99']:.3f}s over {len(back)} runs (p50 {p['p50']:.3f}s, max {p['max']:.3f}s)"),
            Verdict(0, t2, "PASS" if lost == 0 else "FAIL", f"{lost} lost of {acked} acknowledged in {len(runs)} runs")]


def markdown(res: Result | None, verdicts_: list[Verdict]) -> str:
    if res is None or not res.extra:
        return ""
    out = ["", "## (k) the loss window under load, killed at random moments (issue 22)", "", res.title, "",
           "| target | result | figures |", "|---|---|---|"]
    out += [f"| {v.text} | **{v.status}** | {v.detail} |" for v in verdicts_]
    out += ["", "| run | kill at s | load | backlog left at the kill | uploads | p50 / p99 / max s | lost >0.5 s / >1 s | "
                "deletions | p50 / p99 / max s | lost >0.5 s / >1 s | daemon CPU s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]

    def lat(x: dict) -> str:
        return " / ".join(f"{x['latency'][k]:.3f}" for k in ("p50", "p99", "max"))

    for r in res.extra["runs"]:
        up, de = r["uploads"], r["deletions"]
        left = f"{r['backlog_left']}/{r['backlog']}" if r["backlog"] else "-"
        if r.get("backlog_drained_s") is not None:
            left += f" (drained at {r['backlog_drained_s']:.1f} s)"
        out.append(f"| {r['mode']} | {r['kill_after_s']:g} | {r['load']:.1f} | {left} | {up['acked']} | "
                   f"{lat(up)} | {len(up['lost_0.5'])} / {len(up['lost_1'])} | {de['acked']} | {lat(de)} | "
                   f"{len(de['lost_0.5'])} / {len(de['lost_1'])} | {r['daemon_cpu_s']:.1f} |")
    for mode in ("steady", "backlog"):
        runs = [r for r in res.extra["runs"] if r["mode"] == mode]
        if runs:
            u, d = _pooled(runs, "uploads"), _pooled(runs, "deletions")
            out.append(f"| {mode}, all runs | | | | | {u['p50']:.3f} / {u['p99']:.3f} / {u['max']:.3f} | | | "
                       f"{d['p50']:.3f} / {d['p99']:.3f} / {d['max']:.3f} | | |")
    return "\n".join(out) + "\n"
