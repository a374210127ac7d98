"""A fresh S3 server on 127.0.0.1 in a child process, with a fast seeding side door.

`MotoServer().start()` runs this file as a script. The child serves S3 over HTTP (moto's S3
app alone on waitress, connections kept alive, objects in memory, request logging off) and reads
commands on stdin, one JSON object per line, answering one JSON line on stdout:

- `{"op": "bucket", "name": B}`: create bucket B.
- `{"op": "seed", "bucket": B, "prefix": P, "root": DIR}`: store every file under DIR as
  `P/<relative path>` straight into moto's backend (no HTTP; 100,000 objects in seconds), with
  the metadata syncd writes (`syncd-sha256`, `syncd-mtime-ns`).
- `{"op": "count", "bucket": B, "prefix": P}`: how many keys of B start with P.
- `{"op": "stored", "bucket": B}`: when each key of B was stored (server clock, Unix seconds):
  every PUT is timestamped, so the daemon-latency benchmark can cross-check its HEAD polling.

`MotoServer(latency_ms=50)` delays every request by that much before moto sees it: real S3 is
tens of milliseconds away (a few hundred on another continent), where the number of requests
in flight decides, not the client's CPU. The delay sleeps in the request's own thread (waitress
serves each request in one of its threads), so it costs no CPU and delays concurrent requests independently,
like a WAN round trip (there is no netem in this kernel: PITFALLS §9).

`MotoServer(kind=...)` picks the server (`bench/run.py --server`, issue 24):
- "waitress" (the default): as above.
- "werkzeug": the same moto S3 app on werkzeug's threaded server, as moto's own server mode serves
  it (`MotoRequestHandler`): it answers `Connection: close`, so every request opens a TCP
  connection and a server thread. Same side door, same latency wrapper.
- "s3rver": s3rver (Node, objects in files in a temp dir; keeps connections alive), installed
  from npm where the tests install it (`install_s3rver`). The child is then a Python wrapper that
  starts node and answers the same commands over HTTP (it has no side door): `seed` PUTs with
  boto3 (with syncd's metadata), `count` lists, `stored` reads the mtimes of s3rver's object files
  (the server's clock when it wrote the body). Latency: a delay line in a TCP proxy in the
  wrapper, in front of node: each request's bytes reach s3rver `latency_ms` later.

PITFALLS §3, §8: moto grows large during big uploads, so each benchmark starts its own server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ACCOUNT = "123456789012"
SERVERS = ("waitress", "werkzeug", "s3rver")  # bench/run.py --server
S3RVER_VERSION = "3.7.1"  # tests/conftest.py installs it through install_s3rver too
S3RVER_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER"}  # the only key it takes
# what each server is, for the report's header
DESCRIPTION = {
    "waitress": "moto's S3 app on waitress (connections kept alive, as S3 does)",
    "werkzeug": "moto's S3 app on werkzeug's threaded server, as moto's own server mode (`Connection: close`: "
                "every request opens a TCP connection and a server thread)",
    "s3rver": f"s3rver {S3RVER_VERSION} (Node; objects in files in a temp dir; connections kept alive)",
}
LATENCY_HOW = {
    "waitress": "the delay sleeps in the server's request thread, costing no CPU",
    "werkzeug": "the delay sleeps in the server's request thread, costing no CPU",
    "s3rver": "the delay is a delay line in a TCP proxy in front of s3rver: each request's bytes reach it "
              "that much later (answers are not delayed)",
}
THREADS = 256  # requests served at once: more than any tool keeps in flight (syncd 32 small + parts)


class MotoServer:
    """Parent-side handle on one child server process."""

    def __init__(self, latency_ms: float = 0.0, kind: str = "waitress") -> None:
        if kind not in SERVERS:
            raise ValueError(f"unknown server {kind!r}: choose from {', '.join(SERVERS)}")
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.latency_ms = latency_ms
        self.kind = kind
        self.pids: list[int] = []  # the processes that serve: the child, and node for s3rver

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_path: Path | None = None) -> MotoServer:
        err = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.latency_ms), self.kind],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"{self.kind} server did not start: {line.strip()!r} (log: {log_path})")
        fields = line.split()  # PORT <port> [PID <node's pid>]
        self.port = int(fields[1])
        self.pids = [self.proc.pid] + ([int(fields[3])] if len(fields) > 3 else [])
        return self

    def call(self, **cmd: Any) -> Any:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        if "error" in reply:
            raise RuntimeError(f"{self.kind} server: {cmd['op']}: {reply['error']}")
        return reply["result"]

    def bucket(self, name: str) -> None:
        self.call(op="bucket", name=name)

    def seed(self, bucket: str, prefix: str, root: Path) -> int:
        return self.call(op="seed", bucket=bucket, prefix=prefix, root=str(root))

    def count(self, bucket: str, prefix: str) -> int:
        return self.call(op="count", bucket=bucket, prefix=prefix)

    def stored(self, bucket: str) -> dict[str, float]:
        return self.call(op="stored", bucket=bucket)

    def cpu(self) -> float:
        """CPU seconds (user + sys) the server has used so far (s3rver: node's and its wrapper's)."""
        assert self.proc is not None
        total = 0.0
        for pid in self.pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def rss_mib(self) -> float:
        assert self.proc is not None
        return _vm(self.pids[-1], "VmRSS")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
        self.pids = []

    def __enter__(self) -> MotoServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _vm(pid: int, field: str) -> float:
    """A `Vm*` line of /proc/PID/status, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


# --- the child ----------------------------------------------------------------------------------

def delayed(app: Any, seconds: float) -> Any:
    """The WSGI app `app`, each request answered `seconds` later (a WAN round trip)."""
    if seconds <= 0:
        return app

    def wrapper(environ: dict[str, Any], start_response: Any) -> Any:
        time.sleep(seconds)
        return app(environ, start_response)

    return wrapper


def _serve(latency_ms: float = 0.0, kind: str = "waitress") -> None:
    os.environ.setdefault("MOTO_ACCOUNT_ID", ACCOUNT)
    # objects stay in memory: moto spools bodies above ~5 MiB to temp files, and the disk's
    # writeback made (b)'s server time bimodal (1.1 or 1.3 s for the same upload, whichever tool)
    os.environ.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(1 << 30))
    import hashlib
    import logging
    import threading

    from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
    from moto.s3 import models

    logging.getLogger("waitress").setLevel(logging.ERROR)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # its access log: a line per request
    # moto's S3 app alone, as `moto_server s3` served it: the all-services dispatcher of
    # `ThreadedMotoServer` guesses the service of every request under one global lock (scans of
    # moto's package directory, hundreds of URL patterns), 39% of the server's CPU per PUT. That
    # cost is the same for every client and hid their differences behind the server's ceiling.
    # Served by waitress, which keeps connections alive as S3 does: werkzeug's server (moto's own)
    # closes every connection, so each request cost every client a TCP connect and the server a
    # new thread, on the cores the client runs on. THREADS: every request in flight sleeps its
    # latency in one; bodies stay in memory (waitress spools those above 512 KiB to temp files)
    app = delayed(create_backend_app("s3"), latency_ms / 1000)
    if kind == "werkzeug":  # as moto's server mode (`moto_server`, `ThreadedMotoServer`) serves its app
        from werkzeug.serving import make_server

        wz = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
        threading.Thread(target=wz.serve_forever, daemon=True).start()
        port, close = wz.server_port, wz.shutdown
    else:
        from waitress.server import create_server

        server = create_server(app, host="127.0.0.1", port=0, threads=THREADS, connection_limit=1000,
                               channel_timeout=600, inbuf_overflow=1 << 30, outbuf_overflow=1 << 30, ident="moto")
        threading.Thread(target=server.run, daemon=True).start()
        port, close = server.effective_port, server.close
    backend = models.s3_backends[ACCOUNT]["aws"]
    stored: dict[str, dict[str, float]] = {}
    original_put = backend.put_object

    def put_object(bucket_name: str, key_name: str, *args: Any, **kwargs: Any) -> Any:
        key = original_put(bucket_name, key_name, *args, **kwargs)
        stored.setdefault(bucket_name, {})[key_name] = time.time()
        return key

    backend.put_object = put_object  # type: ignore[method-assign]

    def seed(bucket: str, prefix: str, root: str) -> int:
        n = 0
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                with open(path, "rb") as f:
                    data = f.read()
                key = original_put(bucket, f"{prefix}/{rel}" if prefix else rel, data,
                                   disable_notification=True)
                key.set_metadata({"x-amz-meta-syncd-sha256": hashlib.sha256(data).hexdigest(),
                                  "x-amz-meta-syncd-mtime-ns": str(os.stat(path).st_mtime_ns)})
                n += 1
        return n

    print(f"PORT {port}", flush=True)
    _answer({"bucket": lambda c: bool(backend.create_bucket(c["name"], "us-east-1")),
             "seed": lambda c: seed(c["bucket"], c["prefix"], c["root"]),
             "count": lambda c: sum(1 for k in backend.get_bucket(c["bucket"]).keys if k.startswith(c["prefix"])),
             "stored": lambda c: stored.get(c["bucket"], {})})
    close()



def _answer(ops: dict[str, Any]) -> None:
    """The child's side of the protocol: one JSON command per stdin line, one JSON answer each
    (`{"result": ...}`, or `{"error": ...}` for the parent to raise), whatever the server."""
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] not in ops:
                raise ValueError(f"unknown op {cmd['op']!r}")
            print(json.dumps({"result": ops[cmd["op"]](cmd)}), flush=True)
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)


# --- s3rver -------------------------------------------------------------------------------------

def install_s3rver() -> Path:
    """s3rver from the npm registry into the tests' cache directory (once): its script.

    The one installer of the project (tests/conftest.py calls it too), under the same file lock:
    two processes (the suite's -n 2, or a bench beside it) would both install it. Raises
    RuntimeError saying why when it cannot work (no node or npm, no registry).
    """
    import fcntl
    import shutil

    base = Path(os.environ.get("SYNCD_S3RVER_DIR") or Path.home() / ".cache" / "syncd-tests" / "s3rver")
    script = base / "node_modules" / "s3rver" / "bin" / "s3rver.js"
    pkg = base / "node_modules" / "s3rver" / "package.json"
    if not (shutil.which("node") and shutil.which("npm")):
        raise RuntimeError("s3rver (the second S3 server) needs node and npm, which are not installed")
    base.mkdir(parents=True, exist_ok=True)
    with open(base.parent / "s3rver.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not pkg.exists() or json.loads(pkg.read_text()).get("version") != S3RVER_VERSION:
            try:
                r = subprocess.run(["npm", "install", "--prefix", str(base), f"s3rver@{S3RVER_VERSION}",
                                    "--no-audit", "--no-fund", "--loglevel=error"],
                                   capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.SubprocessError) as e:
                raise RuntimeError(f"npm install s3rver@{S3RVER_VERSION} failed: {e}") from e
            if r.returncode != 0 or not script.exists():
                raise RuntimeError(f"npm install s3rver@{S3RVER_VERSION} failed: "
                                   f"{(r.stderr or r.stdout).strip()[-300:]}")
    return script


def _die_with_parent() -> None:
    """In node's child before exec: SIGTERM when the wrapper dies, even by SIGKILL (no orphan
    server holding a port and a data dir)."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_s3rver(script: Path, data: Path, *, buckets: tuple[str, ...] = (),
                 stderr: Any = None) -> tuple[subprocess.Popen, int]:
    """s3rver on a free port (with `buckets` made): the process and its port; RuntimeError when
    it does not start. `--openssl-legacy-provider`: without it, listings over 1000 keys fail
    (PITFALLS §8). The tests' s3rver starts here too."""
    import queue
    import threading

    made = [arg for b in buckets for arg in ("--configure-bucket", b)]
    proc = subprocess.Popen(["node", "--openssl-legacy-provider", str(script), "-d", str(data), "-a", "127.0.0.1",
                             "-p", "0", "-s", *made], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=stderr, text=True, preexec_fn=_die_with_parent)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    line, deadline = "", time.monotonic() + 30
    while "listening on" not in line and time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"s3rver did not start: {line.strip() or 'no output'}")
    return proc, int(line.rsplit(":", 1)[1])


def delay_proxy(upstream: int, latency_ms: float) -> int:
    """A TCP proxy on 127.0.0.1 to `upstream` in a daemon thread: its port. Client -> server bytes
    go through a delay line (each chunk forwarded `latency_ms` after it arrived, in order): a
    request reaches the server that much later, however many are in flight, as over a WAN (and
    as the moto servers' sleeping wrapper). Answers pass straight through."""
    import asyncio
    import threading

    delay = latency_ms / 1000
    ready: list[int] = []
    started = threading.Event()

    async def close(writer: asyncio.StreamWriter) -> None:
        try:
            writer.close()
            await writer.wait_closed()
        except OSError:
            pass

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lag: float) -> None:
        loop = asyncio.get_running_loop()
        line: asyncio.Queue = asyncio.Queue()

        async def send() -> None:
            while True:
                due, chunk = await line.get()
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                if not chunk:
                    break
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while True:
                chunk = await reader.read(1 << 16)
                line.put_nowait((loop.time() + lag, chunk))
                if not chunk:
                    break
            await sender
        except OSError:
            sender.cancel()
        finally:
            await close(writer)

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            await close(client_w)
            return
        await asyncio.gather(forward(client_r, server_w, delay), forward(server_r, client_w, 0.0),
                             return_exceptions=True)

    async def main() -> None:
        srv = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        ready.append(srv.sockets[0].getsockname()[1])
        started.set()
        async with srv:
            await srv.serve_forever()

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
    started.wait(30)
    if not ready:
        raise RuntimeError("the delay proxy did not start")
    return ready[0]


def _serve_s3rver(latency_ms: float = 0.0) -> None:
    """The child for kind "s3rver": node behind this wrapper, which answers the same commands over HTTP."""
    import hashlib
    import shutil
    import signal
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from botocore.config import Config

    def stop(*_a: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)  # MotoServer.stop(): node and the data dir go with this process
    data = Path(tempfile.mkdtemp(prefix="bench-s3rver-"))
    node: subprocess.Popen | None = None
    try:
        try:
            node, node_port = start_s3rver(install_s3rver(), data)
            port = delay_proxy(node_port, latency_ms) if latency_ms > 0 else node_port
        except RuntimeError as e:
            print(f"ERROR {e}", flush=True)
            return
        # straight to node (not through the delay): the commands are the bench's, not a tool's
        client = boto3.client(
            "s3", endpoint_url=f"http://127.0.0.1:{node_port}", region_name="us-east-1",
            aws_access_key_id=S3RVER_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3RVER_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            config=Config(max_pool_connections=16, request_checksum_calculation="when_required",
                          response_checksum_validation="when_required", s3={"addressing_style": "path"}))

        def put(bucket: str, key: str, path: str) -> None:
            with open(path, "rb") as f:
                body = f.read()
            client.put_object(Bucket=bucket, Key=key, Body=body,
                              Metadata={"syncd-sha256": hashlib.sha256(body).hexdigest(),
                                        "syncd-mtime-ns": str(os.stat(path).st_mtime_ns)})

        def seed(bucket: str, prefix: str, root: str) -> int:
            jobs = []
            for dirpath, _dirs, filenames in os.walk(root):
                rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
                for name in filenames:
                    rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                    jobs.append((f"{prefix}/{rel}" if prefix else rel, os.path.join(dirpath, name)))
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda job: put(bucket, *job), jobs))
            return len(jobs)

        def count(bucket: str, prefix: str) -> int:
            return sum(page.get("KeyCount", 0) for page in
                       client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix))

        def stored(bucket: str) -> dict[str, float]:
            # s3rver keeps key K as the file K._S3rver_object: its mtime is when the body was written
            out: dict[str, float] = {}
            top = data / bucket
            suffix = "._S3rver_object"
            for dirpath, _dirs, filenames in os.walk(top):
                rel_dir = os.path.relpath(dirpath, top).replace(os.sep, "/")
                for name in filenames:
                    if name.endswith(suffix):
                        key = name[: -len(suffix)]
                        out[key if rel_dir == "." else f"{rel_dir}/{key}"] = \
                            os.stat(os.path.join(dirpath, name)).st_mtime_ns / 1e9
            return out

        print(f"PORT {port} PID {node.pid}", flush=True)
        _answer({"bucket": lambda c: bool(client.create_bucket(Bucket=c["name"])),
                 "seed": lambda c: seed(c["bucket"], c["prefix"], c["root"]),
                 "count": lambda c: count(c["bucket"], c["prefix"]),
                 "stored": lambda c: stored(c["bucket"])})
    finally:
        if node is not None:
            node.terminate()
            try:
                node.wait(10)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait(10)
        shutil.rmtree(data, ignore_errors=True)

if __name__ == "__main__":
    _latency = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
    _kind = sys.argv[2] if len(sys.argv) > 2 else "waitress"
    if _kind == "s3rver":
        _serve_s3rver(_latency)
    else:
        _serve(_latency, _kind)
