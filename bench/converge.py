"""(s) convergence of shared watches (issue 16, target 5), opt-in: `bench/run.py --only s`.

Two `syncd run` daemons ("hosts" a and b, each with its own ledger and directory) share one
prefix (`mode = "shared"`, `on_delete = "mirror"`, settle_seconds 2.0, the other keys at their
defaults) on one moto server that serves S3, SNS and SQS (moto's all-services
`ThreadedMotoServer` in a child process: bench/s3server.py serves S3 only). An "app" thread
(bench/loss_window.py's Writer) writes files of 4-300 KB on a at `s_rate` files/s, each closed by
its writer; the bench polls b's directory every 20 ms (a download appears atomically, by rename)
and records when each file is there. Convergence = appeared on b - closed on a (both
`time.time()` on this host); every file's bytes on b are compared with a's at the end. Then,
after `s_quiet` quiet seconds (longer than settle), each daemon's /metrics says what it did:
a must have uploaded every file and restored none, b restored every file and uploaded none (a
download must not be uploaded back, nor a's own notifications make a download its own files).

1. events: the bucket notifies an SNS topic, one SQS queue per host subscribed to it (README
   "Several hosts"), each daemon's `events_queue` its own queue, `remote_rescan_interval = 0`
   (the listing runs only at start): what reaches b came by the queue.
   Target: p50 <= settle + 2 s and p99 <= settle + 5 s.
2. listing: no `events_queue`, `remote_rescan_interval = s_rescan` (5 s): b finds a's files in
   its periodic listing. Figures only.
3. (comparison, `s_compare`) 1. with `upload_on_close = false` on both hosts: every upload waits
   for settle_seconds, as before issue 13.

With `upload_on_close` (the default) a's upload starts at the writer's close, so settle_seconds
is not on the path: the target's "settle +" is slack, and the figures say what the path costs;
3. shows the path with settle on it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.loss_window import Writer
from bench.report import Verdict
from bench.scenarios import Daemon, Result, pctl
from bench.tools import CREDENTIALS

if TYPE_CHECKING:
    from bench.scenarios import Bench

CONVERGE = "s"
SETTLE = 2.0  # syncd's default settle_seconds; the target is relative to it
POLL = 0.02  # seconds between two looks at b's directory
DRAIN_WAIT = 60.0  # seconds after the last write for every file to reach b (plus the rescan interval)
PREFIX = "bench"

_SERVER = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
s = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
s.start()
print("PORT", s.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the parent closes our stdin
s.stop()
"""


class AllServices:
    """moto's server with every service (S3, SNS, SQS and S3's notifications) in a child process."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log: Path) -> AllServices:
        with open(log, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True, env=_env())
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"moto server did not start: {line!r} (log {log})")
        self.port = int(line.split()[1])
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **CREDENTIALS}


def fanout(srv: AllServices, bucket: str, hosts: int) -> list[str]:
    """The bucket's notifications to an SNS topic, one SQS queue per host subscribed to it."""
    s3, sqs, sns = srv.client("s3"), srv.client("sqs"), srv.client("sns")
    topic = sns.create_topic(Name=bucket)["TopicArn"]
    queues = []
    for i in range(hosts):
        url = sqs.create_queue(QueueName=f"{bucket}-{i}", Attributes={"VisibilityTimeout": "30"})["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn)
        queues.append(url)
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={"TopicConfigurations": [
        {"TopicArn": topic, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}]})
    return queues


def _config(run_dir: Path, watch: Path, endpoint: str, bucket: str, queue: str, rescan: float,
            on_close: bool, port: int) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = ["[syncd]", f'ledger = "{run_dir / "ledger.db"}"', f"settle_seconds = {SETTLE}",
             f'health_listen = "127.0.0.1:{port}"', f"remote_rescan_interval = {rescan:g}", "",
             "[remote]", f'url = "s3://{bucket}/{PREFIX}"', f'endpoint_url = "{endpoint}"', 'region = "us-east-1"',
             *([f'events_queue = "{queue}"'] if queue else []), "",
             "[[watch]]", f'path = "{watch}"', 'prefix = "shared"', 'mode = "shared"', 'on_delete = "mirror"',
             *([] if on_close else ["upload_on_close = false"])]
    cfg = run_dir / "syncd.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def _counters(port: int) -> dict[str, float]:
    """syncd_uploads_total and syncd_remote_changes_total{kind} from a daemon's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == "syncd_uploads_total":
                out["uploads"] = smp.value
            elif smp.name == "syncd_remote_changes_total":
                out[smp.labels["kind"]] = smp.value
    return out


def _files(root: Path) -> list[str]:
    out = []
    for top, _dirs, names in os.walk(root):
        out += [os.path.relpath(os.path.join(top, n), root) for n in names if not n.startswith(".syncd-")]
    return out


def converge(bench: Bench, events: bool, on_close: bool = True) -> dict:
    """One run: a writes, b is watched; what reached b, and when."""
    s = bench.sizes
    name = ("events" if events else "listing") + ("" if on_close else "-settle")
    rescan = 0.0 if events else s.s_rescan
    base = bench.work / f"s-{name}"
    srv = AllServices().start(bench.logs / f"s-{name}-moto.log")
    daemons: list[Daemon] = []
    try:
        bucket = f"converge-{name}"
        srv.client("s3").create_bucket(Bucket=bucket)
        queues = fanout(srv, bucket, 2) if events else ["", ""]
        watches = [base / "a-watch", base / "b-watch"]
        writer = Writer(watches[0], s.s_rate, s.s_files, seed=16)  # makes a's directories first
        watches[1].mkdir(parents=True, exist_ok=True)
        ports = [_free_port(), _free_port()]
        for host, watch, queue, port in zip("ab", watches, queues, ports, strict=True):
            cfg = _config(base / host, watch, srv.endpoint, bucket, queue, rescan, on_close, port)
            daemons.append(Daemon(bench.tools["syncd"], cfg, base / host / "ledger.db",
                                  bench.logs / f"s-{name}-{host}.log").start())
        for d in daemons:
            d.wait(lambda d=d: d.meta("ready") == "1", 120, "ready")
        cpu0 = [d.cpu() for d in daemons]
        seen: dict[str, float] = {}
        writer.start()
        deadline = None
        while True:
            now = time.time()
            for rel in _files(watches[1]):
                seen.setdefault(rel, now)
            if not writer.is_alive():
                if deadline is None:
                    deadline = time.monotonic() + DRAIN_WAIT + rescan
                if all(rel in seen for rel, _t in writer.closed) or time.monotonic() > deadline:
                    break
            for d in daemons:
                if d.proc is not None and d.proc.poll() is not None:
                    raise RuntimeError(f"syncd run exited {d.proc.returncode} (log {d.log})")
            time.sleep(POLL)
        cpu = [d.cpu() - c for d, c in zip(daemons, cpu0, strict=True)]
        time.sleep(s.s_quiet)  # a bench, not a test: what would bounce back has had its chance
        counters = [_counters(p) for p in ports]
    finally:
        for d in daemons:
            d.stop()
        srv.stop()
    closed = dict(writer.closed)
    arrived = [rel for rel in closed if rel in seen]
    wrong = [rel for rel in arrived if (watches[1] / rel).read_bytes() != (watches[0] / rel).read_bytes()]
    lat = [seen[rel] - closed[rel] for rel in arrived]
    return {"files": len(closed), "arrived": len(arrived), "wrong": wrong, "latency": pctl(lat),
            "min": min(lat, default=float("nan")), "rescan": rescan, "cpu_a": cpu[0], "cpu_b": cpu[1],
            "extra_on_b": sorted(set(seen) - set(closed))[:10], "a": counters[0], "b": counters[1]}


def scenario_s(bench: Bench) -> Result:
    s = bench.sizes
    res = Result("s", f"shared watches: {s.s_files} files of 4-300 KB at {s.s_rate:g}/s on host a, "
                      f"until byte-complete on host b (settle_seconds {SETTLE:g}, upload_on_close)")
    runs = [("events", True, True), ("listing", False, True)] + ([("settle", True, False)] if s.s_compare else [])
    for key, events, on_close in runs:
        r = converge(bench, events, on_close)
        how = "events_queue (SNS -> SQS per host)" if events else f"listing every {r['rescan']:g} s"
        how += "" if on_close else ", upload_on_close = false (comparison)"
        bench.say(f"  (s) {how}: {r['arrived']}/{r['files']} on b, {len(r['wrong'])} wrong; close on a -> on b "
                  f"p50 {r['latency']['p50']:.3f}s p99 {r['latency']['p99']:.3f}s max {r['latency']['max']:.3f}s "
                  f"(min {r['min']:.3f}s); daemon CPU a {r['cpu_a']:.1f}s b {r['cpu_b']:.1f}s")
        res.extra[key] = r
        bounced = _bounced(r)
        if bounced:
            bench.say(f"  (s) {how}: {bounced}")
            res.notes.append(f"{how}: {bounced}")
        if r["arrived"] < r["files"] or r["wrong"]:
            res.notes.append(f"{how}: {r['files'] - r['arrived']} of {r['files']} files not on b "
                             f"{DRAIN_WAIT + r['rescan']:.0f}s after the last write, {len(r['wrong'])} with other bytes")
    return res


def _bounced(r: dict) -> str:
    """What the daemons did beyond a uploading every file once and b restoring each: '' if nothing."""
    a, b, n = r["a"], r["b"], r["files"]
    want = {"a uploads": (a.get("uploads"), n), "b uploads": (b.get("uploads"), 0),
            "a remote changes": (sum(a.get(k, 0) for k in ("restored", "replaced", "deleted")), 0),
            "b restored": (b.get("restored"), n), "b replaced or deleted": (b.get("replaced", 0) + b.get("deleted", 0), 0)}
    return ", ".join(f"{k} {got:g} (expected {exp})" for k, (got, exp) in want.items() if got != exp)


def verdicts(res: Result | None) -> list[Verdict]:
    text = (f"5. (s) shared watches with events_queue: on the other host within settle + 2 s at p50 and "
            f"settle + 5 s at p99 (settle {SETTLE:g} s)")
    if res is None or "events" not in res.extra:
        return []
    r = res.extra["events"]
    p50, p99 = r["latency"]["p50"], r["latency"]["p99"]
    ok = (p50 <= SETTLE + 2 and p99 <= SETTLE + 5 and r["arrived"] == r["files"] and not r["wrong"]
          and not _bounced(r))
    return [Verdict(5, text, "PASS" if ok else "FAIL",
                    f"p50 {p50:.2f}s, p99 {p99:.2f}s ({r['arrived']}/{r['files']} on b, {len(r['wrong'])} wrong)")]


def markdown(res: Result | None, verdicts_: list[Verdict]) -> str:
    if res is None or not res.extra:
        return ""
    out = ["", "## Shared watches: convergence (issue 16, target 5)", "", res.title, "",
           "| target | result | figures |", "|---|---|---|"]
    out += [f"| {v.text} | **{v.status}** | {v.detail} |" for v in verdicts_]
    out += ["", "| remote changes by | on b | p50 s | p99 s | max s | min s | daemon CPU a / b s | "
                "uploads a / b, restored by b |", "|---|---|---|---|---|---|---|---|"]
    for key, how in (("events", "events_queue, remote_rescan_interval 0"),
                     ("listing", "listing, remote_rescan_interval {:g}"),
                     ("settle", "(comparison) events_queue, upload_on_close = false: settle on the path")):
        if (r := res.extra.get(key)) is not None:
            out.append(f"| {how.format(r['rescan'])} | {r['arrived']}/{r['files']} | {r['latency']['p50']:.3f} | "
                       f"{r['latency']['p99']:.3f} | {r['latency']['max']:.3f} | {r['min']:.3f} | "
                       f"{r['cpu_a']:.1f} / {r['cpu_b']:.1f} | {r['a'].get('uploads', 0):g} / "
                       f"{r['b'].get('uploads', 0):g}, {r['b'].get('restored', 0):g} |")
    out += [f"- {n}" for n in res.notes]
    return "\n".join(out) + "\n"
