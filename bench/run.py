"""syncd vs `aws s3 sync` vs `rclone sync` on a local moto S3 server (issue 7).

    python bench/run.py [--quick] [--rounds N] [--only abcdefg] [--no-install] [--publish]
    python bench/run.py --wan [--latency-ms N] [--wan-rounds N]     # WAN scenarios (w)(x)(y), opt-in
    python bench/run.py --only m [--scale-files 100000,1000000]     # scale (m), opt-in
    python bench/run.py --only i [--latency-ms 50]                  # first byte via /files/ (i), opt-in
    python bench/run.py --only s                                    # shared watches converging (s), opt-in
    python bench/run.py --only l                                    # the bandwidth limit (l), opt-in
    python bench/run.py --only k                                    # the loss window under load, kills (k), opt-in
    python bench/run.py --only ag --server werkzeug|s3rver          # another S3 server (default waitress)

Setup installs missing peers (awscli: pip into bench/.venv, else apt; rclone: apt) or skips them
with a line saying so. Each scenario starts a fresh S3 server on 127.0.0.1 (`--server`: moto's S3
app on waitress, the default; on werkzeug, as moto's own server mode; or s3rver), generates seeded
data in a temp dir, and runs the tools alternately for N rounds (default 3; `--quick`: small
sizes, 1 round). Prints medians, ratios (syncd / peer) and PASS/FAIL per target, and writes
bench/results/latest.md (every sample: latest.json). `--publish` also copies the report to
bench/RESULTS.md and puts the summary table in README.md's Performance section.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import first_byte, loss_window, report, tools  # noqa: E402
from bench.s3server import DESCRIPTION, LATENCY_HOW, S3RVER_CREDENTIALS, SERVERS, install_s3rver  # noqa: E402
from bench.scenarios import FULL, QUICK, Bench, Result  # noqa: E402
from bench.wan import LATENCIES, WAN, run_wan  # noqa: E402
from bench.wan import markdown as wan_markdown  # noqa: E402
from bench.wan import publish as wan_publish  # noqa: E402
from bench.wan import verdicts as wan_verdicts_of  # noqa: E402

RESULTS = ROOT / "bench" / "results"
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
ALL = "abcdefgh"
FIRST_BYTE = "i"  # opt-in: first byte through /files/ during a lazy start (bench/first_byte.py)
# what --server cannot run, and why (issue 24): (m) and (s) never use the bench server
_NO_SERVER = {"m": "(m) reads a file:// remote, no server",
              "s": "(s) needs SNS and SQS: it always runs on moto's all-services server (`ThreadedMotoServer`)"}
_SIDE_DOOR = "seeds its objects straight into moto's backend (s3rver has no side door; seeding over HTTP " \
             "is not adapted to it)"
_MOTO_CLOCK = "reads when each object was stored from a hook in moto's backend (not checked against s3rver's " \
              "file times)"
NOT_ON = {
    "waitress": {},
    "werkzeug": dict(_NO_SERVER),
    "s3rver": {**_NO_SERVER, "d": f"(d)/(f) {_SIDE_DOOR}", "f": f"(d)/(f) {_SIDE_DOOR}", "i": f"(i) {_SIDE_DOOR}",
               "e": f"(e) HEAD-polls with moto's test credentials and {_MOTO_CLOCK}",
               "h": f"(h) {_MOTO_CLOCK}", "k": f"(k) {_MOTO_CLOCK}",
               "l": "(l) is measured on moto's servers only"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 1 round: a smoke test of a few minutes")
    p.add_argument("--rounds", type=int, help="rounds per scenario (default 3, --quick 1)")
    p.add_argument("--only", default=ALL, help=f"scenarios to run, e.g. 'ac' (default {ALL})")
    p.add_argument("--no-install", action="store_true", help="do not install missing peers; skip them")
    p.add_argument("--peers", default="aws,rclone", help="peers to compare with (default aws,rclone)")
    p.add_argument("--workdir", type=Path, help="where datasets go (default: a temp dir, removed after)")
    p.add_argument("--out", type=Path, default=RESULTS / "latest.md", help="markdown report path")
    p.add_argument("--publish", action="store_true",
                   help="also write bench/RESULTS.md and the README summary (full runs)")
    p.add_argument("--latency-ms", type=float, default=0.0,
                   help="delay every request of the bench server by this much (default 0: loopback); "
                        "with --wan: the one latency of the WAN scenarios (default 50 and 200)")
    p.add_argument("--wan", action="store_true",
                   help=f"run the WAN scenarios ({WAN}: upload, restore, no-op at 50 and 200 ms); "
                        "with --only, they are added to its letters")
    p.add_argument("--wan-rounds", type=int, help="rounds of the WAN scenarios (default 2 at <= 50 ms, else 1)")
    p.add_argument("--server", choices=SERVERS, default="waitress",
                   help="the S3 server: moto's S3 app on waitress (default, connections kept alive), on werkzeug "
                        "(as moto's own server mode: every request its own connection) or s3rver (npm)")
    p.add_argument("--transfers", choices=("botocore", "crt", "auto"),
                   help="[remote] transfers of every syncd run (default: syncd's, auto)")
    p.add_argument("--scale-files", default="100000,1000000",
                   help="(m): tracked-tree sizes, smallest first (default 100000,1000000)")
    args = p.parse_args(argv)
    from bench.converge import CONVERGE
    from bench.loss_load import LOAD
    from bench.ratelimit import RATE
    from bench.scale import SCALE

    explicit = args.only != ALL
    if args.wan:
        args.only = WAN if args.only == ALL else args.only + WAN
    bad = set(args.only) - set(ALL + FIRST_BYTE + WAN + SCALE + CONVERGE + RATE + LOAD)
    if bad:
        p.error(f"--only: unknown scenario(s) {''.join(sorted(bad))}; choose from {ALL}, {FIRST_BYTE} (first byte "
                f"through /files/), {WAN} (WAN), {SCALE} (scale), {CONVERGE} (shared watches), {RATE} "
                f"(bandwidth limit) or {LOAD} (the loss window under load)")
    if args.transfers == "crt" and RATE in args.only:
        p.error(f"--transfers crt: ({RATE}) sets bwlimit, which syncd refuses with crt (use auto)")
    why = NOT_ON[args.server]
    refused = list(dict.fromkeys(why[c] for c in args.only if c in why))
    if refused and explicit:
        p.error(f"--server {args.server}: " + "; ".join(refused) + ". Run them with --server waitress")
    args.skipped = refused  # the default set: the others run, the report says what was left out
    args.only = "".join(c for c in args.only if c not in why)
    tools.TRANSFERS = args.transfers or ""
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    return args


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores{', ' + cpu if cpu else ''}; {platform.platform()}; Python {platform.python_version()}"


def run(args: argparse.Namespace) -> int:
    saved = dict(tools.CREDENTIALS)
    if args.server == "s3rver":  # the only key s3rver takes; every tool's environment gets it (tools.bench_env)
        tools.CREDENTIALS.update(S3RVER_CREDENTIALS)
    try:
        return _run(args)
    finally:
        tools.CREDENTIALS.clear()
        tools.CREDENTIALS.update(saved)


def _run(args: argparse.Namespace) -> int:
    from bench.converge import CONVERGE, scenario_s
    from bench.converge import markdown as converge_markdown
    from bench.converge import verdicts as converge_verdicts
    from bench.loss_load import LOAD, scenario_k
    from bench.loss_load import markdown as load_markdown
    from bench.loss_load import verdicts as load_verdicts
    from bench.ratelimit import RATE, scenario_l
    from bench.ratelimit import markdown as rate_markdown
    from bench.ratelimit import verdicts as rate_verdicts
    from bench.scale import SCALE, scenario_m
    from bench.scale import markdown as scale_markdown
    from bench.scale import verdicts as scale_verdicts

    say = print
    if args.server == "s3rver":
        try:
            say(f"setup: s3rver: {install_s3rver()}")
        except RuntimeError as e:
            say(f"setup: --server s3rver: {e}")
            return 2
    for x in args.skipped:
        say(f"--server {args.server}: skipped: {x}")
    found = tools.setup(install=not args.no_install, say=say)
    wanted = {p.strip() for p in args.peers.split(",") if p.strip()}
    found = {k: v for k, v in found.items() if k == "syncd" or k in wanted}
    sizes = QUICK if args.quick else FULL
    work = args.workdir or Path(tempfile.mkdtemp(prefix="syncd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(found, work, sizes, args.rounds, say=say, latency_ms=args.latency_ms, server_kind=args.server)
    wan_results: dict[str, Result] = {}
    scale_results: dict[str, Result] = {}
    converge_results: dict[str, Result] = {}
    rate_results: dict[str, Result] = {}
    load_results: dict[str, Result] = {}
    results: dict[str, Result] = {}
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    failed: list[str] = []
    steps = [("a", bench.scenario_a), ("b", bench.scenario_b), ("c", bench.scenario_c),
             ("d", None), ("e", bench.scenario_e), ("g", bench.scenario_g),
             ("h", lambda: loss_window.scenario_h(bench)), ("i", lambda: first_byte.scenario_i(bench))]
    try:
        for key, fn in steps:
            if key == "d":
                if "d" not in args.only and "f" not in args.only:
                    continue
                say("(d)+(f) a large tracked tree: no-op start, then daemon RSS")
                try:
                    d, f = bench.scenario_d_f()
                    if "d" in args.only:
                        results["d"] = d
                    if "f" in args.only:
                        results["f"] = f
                except Exception as e:  # noqa: BLE001 - one broken scenario must not hide the others
                    failed.append(f"(d)/(f): {e}")
                    say(f"  FAILED: {e}")
                continue
            if key not in args.only:
                continue
            say(f"({key})")
            try:
                results[key] = fn()
            except Exception as e:  # noqa: BLE001
                failed.append(f"({key}): {e}")
                say(f"  FAILED: {e}")
        if set(args.only) & set(WAN):
            wan_results, wan_failed = run_wan(
                found, work, sizes, args.only, [args.latency_ms] if args.latency_ms else list(LATENCIES),
                args.wan_rounds, say=say, server_kind=args.server)
            failed += wan_failed
        if SCALE in args.only:
            say("(m) a large tracked tree: start-to-READY and RSS (file:// remote)")
            try:
                scale_results["m"] = scenario_m(bench, tuple(int(x) for x in args.scale_files.split(",")))
            except Exception as e:  # noqa: BLE001
                failed.append(f"(m): {e}")
                say(f"  FAILED: {e}")
        if CONVERGE in args.only:
            say("(s) shared watches: a file written on host a, until it is on host b")
            try:
                converge_results["s"] = scenario_s(bench)
            except Exception as e:  # noqa: BLE001
                failed.append(f"(s): {e}")
                say(f"  FAILED: {e}")
        if RATE in args.only:
            say("(l) bwlimit: the rate of uploads and restores, small and large files")
            try:
                rate_results["l"] = scenario_l(bench)
            except Exception as e:  # noqa: BLE001
                failed.append(f"(l): {e}")
                say(f"  FAILED: {e}")
        if LOAD in args.only:
            say("(k) the loss window under load: writers, a backlog, kills at random moments")
            try:
                load_results["k"] = scenario_k(bench)
            except Exception as e:  # noqa: BLE001
                failed.append(f"(k): {e}")
                say(f"  FAILED: {e}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - t0

    # target N is about scenario ALL[N-1]
    verdicts = [v for v in report.verdicts(results) if ALL[v.n - 1] in args.only]
    cmd = "python bench/run.py " + " ".join(sys.argv[1:]) if sys.argv[1:] else "python bench/run.py"
    header = [
        "# syncd benchmark",
        "",
        f"- command: `{cmd.strip()}` ({'QUICK: small sizes, indicative only' if args.quick else 'full sizes'}, "
        f"{args.rounds} round(s), medians), {elapsed / 60:.1f} min, "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}; client and server share the cores; load average "
        f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (above 1-2, other work competed)",
        "- tools: " + "; ".join(t.version if t.version.startswith(t.name.split()[0]) else f"{t.name} {t.version}"
                                for t in found.values()),
        f"- peers skipped: {', '.join(sorted({'aws', 'rclone'} - set(found))) or 'none'}",
        f"- server (`--server {args.server}`): {DESCRIPTION[args.server]}",
        "- syncd config: defaults (workers 8, checksum sha256"
        f"{', transfers ' + args.transfers if args.transfers else ''}) with settle_seconds "
        f"{sizes.e_settle}; rclone `--checksum --fast-list --transfers {tools.RCLONE_TRANSFERS}`; "
        "aws s3 sync defaults",
    ]
    if args.latency_ms:
        header.append(f"- every request of the bench server delayed by {args.latency_ms:g} ms "
                      f"({LATENCY_HOW[args.server]})")
    if wan_results:
        header.append(f"- WAN scenarios: rounds {args.wan_rounds or 'per latency: 2 at 50 ms, 1 at 200 ms'}; "
                      "tools at their defaults, rclone also tuned (the table says which)")
    header += [f"- not run on {args.server}: {x}" for x in args.skipped]
    header += [f"- FAILED {x}" for x in failed]
    md = report.markdown(results, verdicts, header)
    wan_verdicts = wan_verdicts_of(wan_results)
    md += wan_markdown(wan_results, wan_verdicts, args.server)
    big_verdicts = scale_verdicts({**results, **scale_results})
    md += scale_markdown(scale_results, big_verdicts)
    shared_verdicts = converge_verdicts(converge_results.get("s"))
    md += converge_markdown(converge_results.get("s"), shared_verdicts)
    limit_verdicts = rate_verdicts(rate_results.get("l"))
    md += rate_markdown(rate_results.get("l"), limit_verdicts)
    kill_verdicts = load_verdicts(load_results.get("k"))
    md += load_markdown(load_results.get("k"), kill_verdicts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    args.out.with_suffix(".json").write_text(json.dumps(raw({**results, **wan_results, **scale_results,
                                                                   **converge_results, **rate_results,
                                                                   **load_results}), indent=1))
    say("")
    for v in verdicts:
        say(f"{v.status:4}  {v.n}. {v.text}: {v.detail}")
    for v in wan_verdicts:
        say(f"{v.status:4}  WAN {v.text}: {v.detail}")
    for v in big_verdicts:
        say(f"{v.status:4}  scale {v.text}: {v.detail}")
    for v in shared_verdicts:
        say(f"{v.status:4}  shared {v.text}: {v.detail}")
    for v in limit_verdicts:
        say(f"{v.status:4}  {v.text}: {v.detail}")
    for v in kill_verdicts:
        say(f"{v.status:4}  {v.text}: {v.detail}")
    for x in failed:
        say(f"FAILED {x}")
    say(f"report: {args.out}")
    if args.publish:
        if results:  # a WAN-only run leaves the loopback figures as they are
            publish(md, report.summary_table(results, verdicts), header)
        if wan_results:
            wan_publish(wan_markdown(wan_results, wan_verdicts, args.server), header)
    return 1 if failed else 0


def raw(results: dict[str, Result]) -> dict:
    """Every sample of every run, for a closer look than the medians."""
    return {k: {"title": r.title, "unit": r.unit, "work": r.work, "extra": r.extra,
                "samples": {t: [dataclasses.asdict(s) for s in v] for t, v in r.samples.items()}}
            for k, r in results.items()}


def publish(md: str, summary: str, header: list[str]) -> None:
    (ROOT / "bench" / "RESULTS.md").write_text(md)
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = "\n".join([README_START, *header[2:], "", summary.rstrip(), README_END])
    if README_START in text:
        text = re.sub(re.escape(README_START) + r".*?" + re.escape(README_END), lambda _m: block, text,
                      flags=re.S)
    else:
        text = text.rstrip() + "\n\n## Performance\n\n" + block + "\n"
    readme.write_text(text)
    print("published: bench/RESULTS.md and the README summary")


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
