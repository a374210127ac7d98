"""WAN scenarios (issue 16): the bench server answers every request 50 or 200 ms late.

Real S3 is tens of milliseconds away (a few hundred on another continent): there the number of
requests in flight decides, not the client's CPU. Opt-in: `bench/run.py --wan` (or `--only`
with the letters below); `--latency-ms N` runs them at N ms only.

- (w) first upload, 2,000 x 4 KiB (a fresh server per run), then
- (y) the no-op resync of that upload by the same tool, on the same server, and
- (x) restore of syncd's upload of the same files into an empty dir (as (g)).

Every tool at its defaults (syncd: 8 workers; aws s3 sync: 10 requests at once; rclone: 4
transfers, 8 checkers, size + modtime) and rclone also tuned (`--transfers 16 --checksum
--fast-list`, the flags of the loopback scenarios). Targets (issue 16, 1): syncd >= 2.0x the
files/s of aws s3 sync for upload and restore, and >= 1.0x rclone `--transfers 16`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from bench import data
from bench.report import Verdict
from bench.s3server import LATENCY_HOW, MotoServer
from bench.scenarios import KEY_PREFIX, Bench, Result
from bench.tools import Sample, Tool, measure, rclone_env

WAN = "wxy"  # --only letters: upload, restore, no-op
LATENCIES = (50.0, 200.0)
RCLONE_DEFAULTS = "rclone-defaults"
SETTINGS = {
    "syncd": "defaults (workers 8)",
    "aws": "defaults (10 requests at once)",
    RCLONE_DEFAULTS: "defaults (--transfers 4 --checkers 8, size + modtime)",
    "rclone": "tuned: --transfers 16 --checksum --fast-list",
}
LABEL = {"syncd": "syncd resync", "aws": "aws s3 sync", RCLONE_DEFAULTS: "rclone sync", "rclone": "rclone sync"}
TITLES = {"w": "first upload", "x": "restore into an empty dir", "y": "no-op resync"}


def rounds_for(latency_ms: float, given: int | None) -> int:
    """Few rounds: a run at 200 ms takes minutes per tool (aws ~45 s, rclone at its defaults more)."""
    if given is not None:
        return given
    return 2 if latency_ms <= 50 else 1


def rclone_defaults(tool: Tool, src: str, dst: str) -> list[str]:
    # --s3-no-check-bucket only spares one bucket-creation request per run (the bucket exists)
    return [*tool.argv, "sync", src, dst, "--s3-no-check-bucket", "-q"]


class WanBench(Bench):
    """The scenarios of bench.scenarios on a server `latency_ms` away, plus rclone at its defaults."""

    def __init__(self, tools: dict[str, Tool], work: Path, sizes, rounds: int, latency_ms: float,
                 say=print, server_kind: str = "waitress") -> None:
        wan_tools = dict(tools)
        if "rclone" in tools:  # defaults first, tuned after: the table reads in that order
            wan_tools = {k: v for k, v in tools.items() if k != "rclone"}
            wan_tools[RCLONE_DEFAULTS] = tools["rclone"]
            wan_tools["rclone"] = tools["rclone"]
        super().__init__(wan_tools, work, sizes, rounds, say=say, server_kind=server_kind)
        self.latency_ms = latency_ms
        self.tag = f"{latency_ms:g}ms"

    def server(self) -> MotoServer:
        return MotoServer(latency_ms=self.latency_ms, kind=self.server_kind).start(self.logs / f"moto-{self.tag}.log")

    def push(self, name: str, srv: MotoServer, bucket: str, src: Path, run_dir: Path, log: Path,
             fresh: bool = False) -> Sample:
        if name == RCLONE_DEFAULTS:
            return measure(rclone_defaults(self.tools[name], str(src), f"bench:{bucket}/{KEY_PREFIX}"),
                           env=rclone_env(srv.endpoint, self.work / "rclone.conf"), log=log)
        return super().push(name, srv, bucket, src, run_dir, log, fresh=fresh)

    def pull(self, name: str, srv: MotoServer, bucket: str, dest: Path, log: Path) -> Sample:
        if name == RCLONE_DEFAULTS:
            return measure(rclone_defaults(self.tools[name], f"bench:{bucket}/{KEY_PREFIX}", str(dest)),
                           env=rclone_env(srv.endpoint, self.work / "rclone.conf"), log=log)
        return super().pull(name, srv, bucket, dest, log)

    def _line(self, key: str, r: int, name: str, s: Sample) -> None:
        self.say(f"  ({key}) {self.tag} round {r + 1} {name}: {s.wall:.2f}s wall, {s.cpu:.2f}s CPU, "
                 f"{s.rss_mib:.0f} MiB")

    def upload_and_noop(self, want: str) -> dict[str, Result]:
        """(w) and (y): each run a fresh server; the tool's no-op follows its own upload there."""
        s = self.sizes
        w = Result(f"w{self.latency_ms:g}", f"{self.tag} per request: first upload, {s.a_files:,} x "
                   f"{s.a_size // 1024} KiB", unit="files", work=s.a_files)
        y = Result(f"y{self.latency_ms:g}", f"{self.tag} per request: no-op resync of (w), {s.a_files:,} files",
                   unit="files", work=s.a_files)
        src = self.a_data()
        # unmeasured, on loopback: the first upload after the dataset was written pays for page reclaim
        warm = MotoServer(kind=self.server_kind).start(self.logs / "moto-warmup.log")
        try:
            warm.bucket("warmup")
            self.push("syncd", warm, "warmup", src, self.work / "wan-warmup", self.logs / "wan-warmup.log",
                      fresh=True)
        finally:
            warm.stop()
        for r in range(self.rounds):
            for name in self.order(r):
                srv = self.server()
                try:
                    bucket = f"w-{name}-{r}"
                    run_dir = self.work / f"w{self.tag}" / f"{name}-{r}"
                    srv.bucket(bucket)
                    smp = self.push(name, srv, bucket, src, run_dir, self.logs / f"w-{name}.log", fresh=True)
                    self.check_count(srv, bucket, s.a_files, f"(w) {name}")
                    w.add(name, smp)
                    self._line("w", r, name, smp)
                    if "y" in want:
                        stored = srv.stored(bucket)  # key -> when stored: a PUT of the same key shows too
                        smp = self.push(name, srv, bucket, src, run_dir, self.logs / f"y-{name}.log")
                        if srv.stored(bucket) != stored:
                            raise RuntimeError(f"(y) {name}: the no-op run uploaded something")
                        y.add(name, smp)
                        self._line("y", r, name, smp)
                finally:
                    srv.stop()
                shutil.rmtree(self.work / f"w{self.tag}" / f"{name}-{r}", ignore_errors=True)
        out = {}
        if "w" in want:
            out[w.key] = w
        if "y" in want:
            out[y.key] = y
        return out

    def restore(self) -> Result:
        """(x): syncd uploads once (not measured); each tool then restores it into an empty dir."""
        s = self.sizes
        res = Result(f"x{self.latency_ms:g}", f"{self.tag} per request: restore into an empty dir, "
                     f"{s.a_files:,} files", unit="files", work=s.a_files)
        srv = self.server()
        base = self.work / f"x{self.tag}"
        try:
            srv.bucket("restore")
            watch = base / "watch"
            shutil.copytree(self.a_data(), watch)
            self.push("syncd", srv, "restore", watch, base / "syncd", self.logs / "x-syncd.log", fresh=True)
            self.check_count(srv, "restore", s.a_files, "(x) upload")
            for r in range(self.rounds):
                for name in self.order(r):
                    if name == "syncd":  # its ledger knows the files: the tree is gone, so it restores
                        shutil.rmtree(watch)
                        smp = self.push("syncd", srv, "restore", watch, base / "syncd", self.logs / "x-syncd.log")
                        dest = watch
                    else:
                        dest = base / f"{name}-dest"
                        if dest.exists():
                            shutil.rmtree(dest)
                        dest.mkdir(parents=True)
                        smp = self.pull(name, srv, "restore", dest, self.logs / f"x-{name}.log")
                    got = data.count_files(dest)
                    if got != s.a_files:
                        raise RuntimeError(f"(x) {name}: restored {got} files, expected {s.a_files}")
                    res.add(name, smp)
                    self._line("x", r, name, smp)
        finally:
            srv.stop()
            shutil.rmtree(base, ignore_errors=True)
        return res


def run_wan(tools: dict[str, Tool], work: Path, sizes, only: str, latencies: list[float],
            rounds: int | None, say=print, server_kind: str = "waitress") -> tuple[dict[str, Result], list[str]]:
    """Every WAN scenario in `only` at every latency; returns the results and the failures."""
    results: dict[str, Result] = {}
    failed: list[str] = []
    for ms in latencies:
        bench = WanBench(tools, work, sizes, rounds_for(ms, rounds), ms, say=say, server_kind=server_kind)
        if (work / "a-data").exists():  # made by (a) in this run: the same seeded files
            bench._a_data = work / "a-data"
        if "w" in only or "y" in only:
            say(f"(w)/(y) WAN {ms:g} ms: first upload, then its no-op")
            try:
                results.update(bench.upload_and_noop(only))
            except Exception as e:  # noqa: BLE001 - one broken scenario must not hide the others
                failed.append(f"(w/y {ms:g} ms): {e}")
                say(f"  FAILED: {e}")
        if "x" in only:
            say(f"(x) WAN {ms:g} ms: restore")
            try:
                results[f"x{ms:g}"] = bench.restore()
            except Exception as e:  # noqa: BLE001
                failed.append(f"(x {ms:g} ms): {e}")
                say(f"  FAILED: {e}")
    return results, failed


def verdicts(results: dict[str, Result]) -> list[Verdict]:
    """Issue 16 target 1, per latency, for upload (w) and restore (x)."""
    out: list[Verdict] = []
    for key, res in sorted(results.items(), key=lambda kv: (float(kv[0][1:]), kv[0][0])):
        kind = key[0]
        if kind not in "wx":
            continue
        text = (f"({kind}) {res.title.split(':')[0]}: {TITLES[kind]}: syncd >= 2.0x aws files/s and >= 1.0x "
                f"rclone --transfers 16")
        if not all(t in res.samples for t in ("syncd", "aws")):
            out.append(Verdict(1, text, "SKIP", "not run or aws missing"))
            continue
        ra = res.rate("syncd") / res.rate("aws")
        ok = ra >= 2.0
        parts = [f"syncd {res.rate('syncd'):.0f} files/s = {ra:.2f}x aws ({res.rate('aws'):.0f})"]
        if "rclone" in res.samples:
            rr = res.rate("syncd") / res.rate("rclone")
            ok &= rr >= 1.0
            parts.append(f"{rr:.2f}x rclone --transfers 16 ({res.rate('rclone'):.0f})")
        else:
            parts.append("rclone skipped")
        out.append(Verdict(1, text, "PASS" if ok else "FAIL", "; ".join(parts)))
    return out


def table(results: dict[str, Result]) -> list[str]:
    """One table of every WAN run: which tool, at which settings, how fast, ratios syncd / peer."""
    head = ["latency", "scenario", "tool", "settings", "runs", "wall s", "files/s", "syncd / peer files/s",
            "CPU s", "peak RSS MiB"]
    out = [f"| {' | '.join(head)} |", f"|{'---|' * len(head)}"]
    for key, res in sorted(results.items(), key=lambda kv: (float(kv[0][1:]), "wxy".index(kv[0][0]))):
        if not res.samples:
            continue
        for tool in res.samples:
            ratio = "" if tool == "syncd" or "syncd" not in res.samples else f"{res.rate('syncd') / res.rate(tool):.2f}x"
            out.append("| " + " | ".join([
                f"{float(key[1:]):g} ms", f"({key[0]}) {TITLES[key[0]]}", LABEL.get(tool, tool), SETTINGS.get(tool, ""),
                str(len(res.samples[tool])), f"{res.median(tool, 'wall'):.2f}", f"{res.rate(tool):,.0f}", ratio,
                f"{res.median(tool, 'cpu'):.2f}", f"{res.median(tool, 'rss_mib'):.0f}"]) + " |")
    return out


def markdown(results: dict[str, Result], verdicts_: list[Verdict], server_kind: str = "waitress") -> str:
    if not results:
        return ""
    out = ["", "## WAN: every request delayed (issue 16)", "",
           "| target | result | figures |", "|---|---|---|"]
    out += [f"| {v.text} | **{v.status}** | {v.detail} |" for v in verdicts_]
    out += ["", *table(results), "",
            f"- {LATENCY_HOW[server_kind]}; "
            + ("the server closes every connection (`Connection: close`), so every request costs a TCP handshake "
               "(on loopback, not delayed)" if server_kind == "werkzeug" else
               "the server keeps connections alive, as S3 does (every tool pools them), so a request costs no "
               "TCP handshake"),
            "- rclone 1.60 sends a HEAD beside each uploaded file's PUT; at its defaults it also reads each "
            "object's modtime (a HEAD) to compare in the no-op"]
    return "\n".join(out) + "\n"


README = Path(__file__).with_name("README.md")
START, END = "<!-- wan:start -->", "<!-- wan:end -->"


def publish(md: str, header: list[str]) -> None:
    """The WAN table into bench/README.md, between its markers (added at the end when missing)."""
    text = README.read_text()
    md = md.replace("\n## ", "\n### ")  # a subsection there
    block = "\n".join([START, *header[2:], md.rstrip(), END])
    if START in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _m: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n## WAN figures\n\n" + block + "\n"
    README.write_text(text)
    print("published: the WAN table in bench/README.md")
