"""(l) the bandwidth limit (`bwlimit`, issue 24 item 2), opt-in: `bench/run.py --only l`.

For small files (`l_small_size`, 4 KiB) and large ones (`l_large_size`, 64 MiB, each in one
streamed PUT), `syncd resync` uploads a tree with `bwlimit` set, then restores it into the
emptied directory (same ledger: every file missing) with the same limit. The tree is sized so
that each direction takes about `l_seconds` at the limit. syncd talks to the bench's moto server
through a counting proxy on 127.0.0.1 (`Meter`) that reads the HTTP it forwards: it counts the
bodies of PUTs (uploads) and of GETs of objects (restores) per 0.1 s as they leave the proxy,
and, apart, every byte (headers, listings, XML). What `bwlimit` promises is the body rate: it
must stay within 10% of the limit over every 30 s window (`l_window`) of the transfer.

Small files cannot reach 8 MiB/s here (a 4 KiB file costs syncd ~2 ms of CPU: (a) uploads
~1.5 MiB/s of 4 KiB bodies unlimited), so they get a limit they can reach (`l_small_limit`);
large files get 8M (`l_large_limit`), far below (b)'s unlimited rate.
"""

from __future__ import annotations

import math
import shutil
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from bench import data
from bench.report import Verdict
from bench.scenarios import KEY_PREFIX, PREFIX, WATCH_PREFIX, Result
from bench.tools import bench_env, measure, write_syncd_config

if TYPE_CHECKING:
    from bench.scenarios import Bench

RATE = "l"
TICK = 0.1  # seconds per bucket of the proxy's counts
TOLERANCE = 0.10  # the "within 10%"
SEND_BUFFER = 64 * 1024  # the proxy's send buffers (the kernel's default grows to 4 MiB, counted too early)


def parse_limit(text: str) -> int:
    """Bytes/s of a bwlimit value, as syncd reads it."""
    from syncd.bwlimit import parse_rate

    return parse_rate(text)


# --- what crosses the proxy ---------------------------------------------------------------------
class HttpCounter:
    """Follows one direction of an HTTP/1.1 connection and says how many of the bytes fed are
    bodies that count: request bodies of PUTs (`side="request"`), or response bodies of GETs of
    objects (`side="response"`: a path /bucket/key, no listing). `pending` carries each request's
    (method, target) from the request side to the response side of the same connection."""

    def __init__(self, side: str, pending: deque) -> None:
        self.side, self.pending = side, pending
        self.head = b""
        self.left = 0  # body bytes of the current message still to come
        self.tail = 0  # of which the last ones are framing (a chunk's CRLF), not body
        self.chunked = False
        self.counts = False

    def feed(self, buf: bytes) -> int:
        counted = 0
        while buf:
            if self.left > 0:  # inside a body (or a chunk and its CRLF)
                n = min(self.left, len(buf))
                if self.counts:
                    counted += max(0, min(n, self.left - self.tail))
                self.left -= n
                self.tail = min(self.tail, self.left)
                buf = buf[n:]
                continue
            self.head += buf  # a head, or a chunk's size line: wait for its end
            end = b"\n" if self.chunked else b"\r\n\r\n"
            k = self.head.find(end)
            if k < 0:
                return counted
            line, buf, self.head = self.head[:k + len(end)], self.head[k + len(end):], b""
            if not self.chunked:
                self._start(line)
            elif line.strip():
                size = int(line.strip().split(b";")[0], 16)
                # the last chunk: its CRLF (syncd's store sends no trailers), then the next message
                self.left, self.tail, self.chunked = (2, 2, False) if size == 0 else (size + 2, 2, True)
        return counted

    def _start(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        length = int(fields.get("content-length", "0") or 0)
        chunked = "chunked" in fields.get("transfer-encoding", "").lower()
        if self.side == "request":
            method, target = lines[0].split(" ")[:2]
            self.pending.append((method, target))
            self.counts = method == "PUT"
        else:
            status = int(lines[0].split(" ")[1])
            if status < 200:  # 100 Continue: the final answer follows
                self.left, self.tail, self.counts, self.chunked = 0, 0, False, False
                return
            method, target = self.pending.popleft() if self.pending else ("", "")
            path, _, query = target.partition("?")
            self.counts = method == "GET" and path.strip("/").count("/") >= 1 and "list-type" not in query
            if method == "HEAD" or status in (204, 304):
                length, chunked = 0, False
        self.left, self.tail, self.chunked = (0, 0, True) if chunked else (length, 0, False)


class Meter:
    """A TCP proxy from 127.0.0.1:port to the server that counts, per TICK, the body bytes
    (`HttpCounter`) and all bytes of each direction, when they leave the proxy."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.lock = threading.Lock()
        self.ticks: dict[int, list[int]] = {}  # tick -> [up body, up all, down body, down all]
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.closed = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Meter:
        t = threading.Thread(target=self._accept, name="bench-meter", daemon=True)
        t.start()
        return self

    def reset(self) -> None:
        with self.lock:
            self.ticks = {}

    def stop(self) -> None:
        self.closed = True
        self.sock.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            for s in (client, server):  # a byte counted as sent is in the receiver's kernel, not queued here
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            pending: deque = deque()
            for src, dst, side, col in ((client, server, "request", 0), (server, client, "response", 2)):
                t = threading.Thread(target=self._pump, args=(src, dst, HttpCounter(side, pending), col), daemon=True)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, counter: HttpCounter, col: int) -> None:
        try:
            while buf := src.recv(256 * 1024):
                body = counter.feed(buf)
                dst.sendall(buf)
                tick = int(time.monotonic() / TICK)
                with self.lock:
                    row = self.ticks.setdefault(tick, [0, 0, 0, 0])
                    row[col] += body
                    row[col + 1] += len(buf)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def series(self, col: int) -> list[tuple[int, int, int]]:
        """(tick, body bytes, all bytes) of one direction (0 up, 2 down), in time order."""
        with self.lock:
            return sorted((t, r[col], r[col + 1]) for t, r in self.ticks.items())


def window_rates(series: list[tuple[int, int, int]], window: float) -> dict[str, float]:
    """The body rate over the transfer (from its first body byte to its last) and the lowest
    and highest rate of every `window`-second window inside it (bytes/s); all bytes too."""
    ticks = [(t, b, a) for t, b, a in series if b]
    if not ticks:
        return {"seconds": 0.0, "body": 0.0, "all": 0.0, "min": 0.0, "max": 0.0, "windows": 0, "bytes": 0}
    first, last = ticks[0][0], ticks[-1][0]
    body = {t: b for t, b, _ in series}
    everything = sum(a for t, _, a in series if first <= t <= last)
    span = (last - first + 1) * TICK
    total = sum(body.values())
    n = round(window / TICK)
    per_window = [sum(body.get(t, 0) for t in range(s, s + n)) / window for s in range(first, last - n + 2)]
    return {"seconds": span, "body": total / span, "all": everything / span, "bytes": total,
            "min": min(per_window) if per_window else math.nan, "max": max(per_window) if per_window else math.nan,
            "windows": len(per_window)}


# --- the scenario -------------------------------------------------------------------------------
def _run_one(bench: Bench, cls: str, size: int, limit: str) -> dict[str, Any]:
    s = bench.sizes
    rate = parse_limit(limit)
    files = max(1, math.ceil(rate * s.l_seconds / size))
    base = bench.work / f"l-{cls}"
    src = data.make_tree(base / "data", files, size, seed=7)
    watch = base / "watch"
    shutil.copytree(src, watch)
    srv = bench.server()
    meter = Meter(srv.port).start()
    out: dict[str, Any] = {"files": files, "size": size, "limit": limit, "rate": rate}
    try:
        srv.bucket(f"limit-{cls}")
        cfg = write_syncd_config(base / "syncd.toml", endpoint=meter.endpoint, bucket=f"limit-{cls}", prefix=PREFIX,
                                 watch=watch, watch_prefix=WATCH_PREFIX, ledger=base / "ledger.db", bwlimit=limit)
        argv = [*bench.tools["syncd"].argv, "--config", str(cfg), "resync", "--no-progress"]
        for direction, col in (("upload", 0), ("restore", 2)):
            if direction == "restore":
                shutil.rmtree(watch)
            meter.reset()
            smp = measure(argv, env=bench_env(), log=bench.logs / f"l-{cls}-{direction}.log")
            if direction == "upload":
                if srv.count(f"limit-{cls}", KEY_PREFIX + "/") != files:
                    raise RuntimeError(f"(l) {cls}: not every file was uploaded")
            elif data.count_files(watch) != files:
                raise RuntimeError(f"(l) {cls}: restored {data.count_files(watch)} files, expected {files}")
            res = window_rates(meter.series(col), s.l_window)
            res.update(wall=smp.wall, cpu=smp.cpu)
            out[direction] = res
            bench.say(f"  (l) {cls} {direction}, bwlimit {limit}: {res['body'] / 1024:,.0f} KiB/s of bodies over "
                      f"{res['seconds']:.1f}s ({res['body'] / rate:.3f}x the limit; {s.l_window:g}s windows "
                      f"{res['min'] / rate:.3f}x-{res['max'] / rate:.3f}x; all bytes {res['all'] / rate:.3f}x)")
    finally:
        meter.stop()
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)
    return out


def scenario_l(bench: Bench) -> Result:
    s = bench.sizes
    res = Result(RATE, f"bwlimit: uploads and restores of {s.l_small_size // 1024} KiB files at "
                       f"{s.l_small_limit} and of {s.l_large_size // (1024 * 1024)} MiB files at {s.l_large_limit}, "
                       f"about {s.l_seconds:g} s each, {s.l_window:g} s windows")
    for cls, size, limit in (("small", s.l_small_size, s.l_small_limit), ("large", s.l_large_size, s.l_large_limit)):
        res.extra[cls] = _run_one(bench, cls, size, limit)
    res.extra["window"] = s.l_window
    return res


def verdicts(res: Result | None) -> list[Verdict]:
    if res is None:
        return []
    out = []
    window = res.extra.get("window", 30)
    for cls in ("small", "large"):
        r = res.extra.get(cls)
        if r is None:
            continue
        for direction in ("upload", "restore"):
            x = r[direction]
            lo, hi = x["min"] / r["rate"], x["max"] / r["rate"]
            ok = x["windows"] > 0 and lo >= 1 - TOLERANCE and hi <= 1 + TOLERANCE
            out.append(Verdict(0, f"(l) {cls} files ({_size(r['size'])}), {direction}: the rate holds within 10% of "
                                  f"bwlimit {r['limit']} over every {window:g} s window", "PASS" if ok else "FAIL",
                               f"{lo:.3f}x-{hi:.3f}x in {x['windows']} windows; {x['body'] / 1024:,.0f} KiB/s over "
                               f"{x['seconds']:.1f} s"))
    return out


def _size(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n >= 1024 * 1024 else f"{n // 1024} KiB"


def markdown(res: Result | None, verdicts_: list[Verdict]) -> str:
    if res is None or not res.extra:
        return ""
    out = ["", "## Bandwidth limit (issue 24)", "", res.title, "", "| target | result | figures |", "|---|---|---|"]
    out += [f"| {v.text} | **{v.status}** | {v.detail} |" for v in verdicts_]
    out += ["", "| files | bwlimit | direction | files x size | transfer s | bodies KiB/s | x limit | "
                "windows min-max x limit | all bytes x limit | syncd wall s | syncd CPU s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cls in ("small", "large"):
        r = res.extra.get(cls)
        if r is None:
            continue
        for direction in ("upload", "restore"):
            x = r[direction]
            out.append(f"| {cls} | {r['limit']} | {direction} | {r['files']:,} x {_size(r['size'])} | "
                       f"{x['seconds']:.1f} | {x['body'] / 1024:,.0f} | {x['body'] / r['rate']:.3f} | "
                       f"{x['min'] / r['rate']:.3f}-{x['max'] / r['rate']:.3f} | {x['all'] / r['rate']:.3f} | "
                       f"{x['wall']:.1f} | {x['cpu']:.1f} |")
    return "\n".join(out) + "\n"
