"""Scale (issue 16, targets 3 and 4): a large tracked tree, opt-in (`bench/run.py --only m`).

(m) `syncd run` on N unchanged files that its ledger already tracks (the state of a long-running
syncd: every file synced, the remote listed once), for N = 100,000 and 1,000,000 by default
(`--scale-files`): start-to-READY (process start until the ledger's `ready` mark) and peak RSS
(`VmHWM` once ready and idle). The remote is a `file://` directory: a start with a ledger does
not list it (one probe), so what is measured is the scan, the ledger and the merge join. Data
and ledger are generated once per N (minutes for a million files: the time is printed).

Target 3 is read from (d) and (f): `run` start-to-READY at 100,000 files >= 20x faster than
`aws s3 sync`'s no-op of them, and `resync` (d) no slower than that no-op.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench import data
from bench.report import Verdict
from bench.scenarios import WATCH_PREFIX, Bench, Result

SCALE = "m"
DEFAULT_FILES = (100_000, 1_000_000)
FILE_SIZE = 16  # bytes: the scan and the ledger are measured, not the data


def _config(run_dir: Path, watch: Path, remote: Path) -> Path:
    cfg = run_dir / "syncd.toml"
    cfg.write_text("\n".join([
        "[syncd]", f'ledger = "{run_dir / "ledger.db"}"', 'log_level = "info"', "settle_seconds = 2.0",
        'health_listen = ""', "", "[remote]", f'url = "file://{remote}"', "", "[[watch]]", f'path = "{watch}"',
        f'prefix = "{WATCH_PREFIX}"', ""]))
    return cfg


def scenario_m(bench: Bench, counts: tuple[int, ...] = DEFAULT_FILES) -> Result:
    res = Result("m", "`syncd run` on a large tracked tree: start-to-READY and peak RSS (file:// remote)")
    for n in counts:
        t0 = time.perf_counter()
        base = bench.work / f"m{n}"
        tree = data.make_tree(base / "data", n, FILE_SIZE, seed=5)
        remote = base / "remote"
        remote.mkdir(parents=True, exist_ok=True)
        run_dir = base / "syncd"
        run_dir.mkdir(parents=True, exist_ok=True)
        data.seed_ledger(run_dir / "ledger.db", watch=tree, watch_prefix=WATCH_PREFIX, remote_prefix="")
        bench.say(f"  (m) {n:,} files on disk and in syncd's ledger ({time.perf_counter() - t0:.0f}s to prepare)")
        cfg = _config(run_dir, tree, remote)
        for _ in range(bench.rounds):
            info = bench.daemon_idle_rss(cfg)
            res.extra.setdefault(n, []).append(info)
            bench.say(f"  (m) {n:,} tracked files: ready after {info['ready_s']:.1f}s, VmHWM {info['hwm']:.1f} MiB")
    return res


def verdicts(results: dict[str, Result]) -> list[Verdict]:
    out: list[Verdict] = []
    d, f = results.get("d"), results.get("f")
    text = "3. (d)+(f) `run` start-to-READY >= 20x faster than aws s3 sync's no-op; `resync` no slower than it"
    if d is not None and f is not None and "aws" in d.samples and "syncd" in d.samples and f.extra:
        big = max(f.extra)
        ready = statistics.median(x["ready_s"] for x in f.extra[big])
        aws, resync = d.median("aws", "wall"), d.median("syncd", "wall")
        ok = aws / ready >= 20 and resync <= aws
        out.append(Verdict(3, text, "PASS" if ok else "FAIL",
                           f"{big:,} files: READY after {ready:.2f}s = {aws / ready:.1f}x faster than aws "
                           f"({aws:.1f}s); resync {resync:.2f}s"))
    m = results.get("m")
    text = "4. (m) 1,000,000 files: peak RSS <= 150 MiB and <= 1.3x the RSS at 100,000; READY <= 60 s"
    if m is not None and len(m.extra) >= 2:
        (small, s_runs), (large, l_runs) = sorted(m.extra.items())[0], sorted(m.extra.items())[-1]
        hs = statistics.median(x["hwm"] for x in s_runs)
        hl = statistics.median(x["hwm"] for x in l_runs)
        ready = statistics.median(x["ready_s"] for x in l_runs)
        ok = hl <= 150 and hl <= 1.3 * hs and ready <= 60
        out.append(Verdict(4, text, "PASS" if ok else "FAIL",
                           f"{large:,} files: VmHWM {hl:.1f} MiB ({hl / hs:.2f}x {small:,} files' {hs:.1f}), "
                           f"READY after {ready:.1f}s"))
    return out


def markdown(results: dict[str, Result], verdicts_: list[Verdict]) -> str:
    m = results.get("m")
    if not verdicts_ and m is None:
        return ""
    out = ["", "## Scale (issue 16, targets 3 and 4)", "", "| target | result | figures |", "|---|---|---|"]
    out += [f"| {v.text} | **{v.status}** | {v.detail} |" for v in verdicts_]
    if m is not None and m.extra:
        out += ["", "| tracked files | runs | start-to-READY s | VmHWM MiB | VmRSS MiB |", "|---|---|---|---|---|"]
        for n, runs in sorted(m.extra.items()):
            med = {k: statistics.median(r[k] for r in runs) for k in ("ready_s", "hwm", "rss")}
            out.append(f"| {n:,} | {len(runs)} | {med['ready_s']:.1f} | {med['hwm']:.1f} | {med['rss']:.1f} |")
    return "\n".join(out) + "\n"
