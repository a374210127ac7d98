"""Paired runs of whole `syncd resync` processes: small transfers in flight per worker, per path.

    python bench/inflight.py --latency-ms 50 --rounds 3 --ops xw \\
        --variants botocore:4,botocore:16,crt:4,crt:16

Each variant `PATH:N` is `[remote] transfers = PATH` with N small-file transfers in flight per
worker (`syncd.lane.PER_WORKER` or `PER_WORKER_CRT`, set in the child before syncd starts; the
awscrt client gets a connection for each). `PATH:N:G` sets awscrt's throughput target to G Gbps
instead, whatever syncd has in flight (its connections: G / 0.4; 10, its default, gives 25). Ops: x = restore of 2,000 x 4 KiB seeded objects into an empty
directory with a fresh ledger, w = upload of the same files to a new prefix with a fresh ledger.
Every round runs each (op, variant) once, the order rotated by one each round, on one fresh bench
server (bench/s3server.py, `--latency-ms` late). Prints every run and, per op, medians and the
median over rounds of each variant's ratio to the first variant (same round: the shared
machine's drift cancels out).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import data, tools  # noqa: E402
from bench.s3server import MotoServer  # noqa: E402

SIZE = 4096
BUCKET = "inflight"
# the child: set the lane's width (and awscrt's throughput target) before syncd runs
CHILD = """
import sys
path, n, g = sys.argv.pop(1), int(sys.argv.pop(1)), float(sys.argv.pop(1))
import syncd.lane as lane
if path == "botocore":
    lane.PER_WORKER = n
else:
    lane.PER_WORKER_CRT = n
if g:  # awscrt's throughput target as given, whatever syncd has in flight
    import syncd.remote.s3_crt as crt
    crt.THROUGHPUT_GBPS, crt.GBPS_PER_CONNECTION = g, 0.0
sys.argv[0] = "syncd"
from syncd.cli import entry
entry()
"""


def config(path: Path, *, endpoint: str, bucket: str, prefix: str, watch: Path, ledger: Path, transfers: str) -> Path:
    tools.TRANSFERS = transfers
    return tools.write_syncd_config(path, endpoint=endpoint, bucket=bucket, prefix=prefix, watch=watch,
                                    watch_prefix="data", ledger=ledger)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ops", default="xw")
    p.add_argument("--variants", default="botocore:4,crt:4")
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    variants = [v.split(":") for v in args.variants.split(",")]
    n_files = args.files
    work = Path(tempfile.mkdtemp(prefix="syncd-inflight-"))
    src = data.make_tree(work / "data", n_files, SIZE, seed=1)
    env = tools.bench_env({"PYTHONPATH": str(ROOT)})  # this tree's syncd, whatever is installed
    runs: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    jobs = [(op, ":".join(v)) for op in args.ops for v in variants]
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC latency {args.latency_ms:g} ms, "
          f"{args.rounds} rounds, load {os.getloadavg()[0]:.1f}", flush=True)
    try:
        for r in range(args.rounds + 1):  # round 0: a warm-up of each, not counted
            srv = MotoServer(latency_ms=args.latency_ms).start(work / "moto.log")
            try:
                srv.bucket(BUCKET)
                srv.seed(BUCKET, "seed/data", src)
                k = r % len(jobs)
                for i, (op, name) in enumerate(jobs[k:] + jobs[:k]):
                    path, n, *g = name.split(":")
                    run = work / f"r{r}-{i}"
                    run.mkdir()
                    if op == "x":
                        watch, prefix = run / "restored", "seed"
                        watch.mkdir()
                    else:
                        watch, prefix = src, f"up{r}-{i}"
                    cfg = config(run / "syncd.toml", endpoint=srv.endpoint, bucket=BUCKET, prefix=prefix,
                                 watch=watch, ledger=run / "ledger.db", transfers=path)
                    argv = [sys.executable, "-c", CHILD, path, n, g[0] if g else "0", "--config", str(cfg), "resync"]
                    load = os.getloadavg()[0]
                    s = tools.measure(argv, env=env, log=work / "syncd.log")
                    got = (data.count_files(watch) if op == "x" else srv.count(BUCKET, f"{prefix}/"))
                    if got != n_files:
                        raise RuntimeError(f"{op} {name}: {got} files, expected {n_files} (log {work}/syncd.log)")
                    print(f"  r{r} {op} {name:14} {s.wall:6.2f} s wall {s.cpu:5.2f} s CPU {s.rss_mib:4.0f} MiB "
                          f"(load {load:.1f})", flush=True)
                    if r:
                        runs.setdefault((op, name), []).append((s.wall, s.cpu, s.rss_mib, load))
                    if op == "x":
                        shutil.rmtree(run)
            finally:
                srv.stop()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    base = ":".join(variants[0])
    for op in args.ops:
        print(f"\n{'restore' if op == 'x' else 'upload'} at {args.latency_ms:g} ms, {args.rounds} rounds:")
        print("| variant | wall s | files/s | CPU s | CPU ms/file | RSS MiB | wall ratio | CPU ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for v in variants:
            name = ":".join(v)
            rs, b = runs[(op, name)], runs[(op, base)]
            wall = statistics.median(x[0] for x in rs)
            cpu = statistics.median(x[1] for x in rs)
            wr = [x[0] / y[0] for x, y in zip(rs, b, strict=True)]
            cr = [x[1] / y[1] for x, y in zip(rs, b, strict=True)]
            print(f"| {name} | {wall:.2f} | {n_files / wall:.0f} | {cpu:.2f} | {cpu / n_files * 1000:.2f} | "
                  f"{statistics.median(x[2] for x in rs):.0f} | {statistics.median(wr):.2f}x "
                  f"({min(wr):.2f}-{max(wr):.2f}) | {statistics.median(cr):.2f}x ({min(cr):.2f}-{max(cr):.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
