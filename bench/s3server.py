"""A fresh moto S3 server on 127.0.0.1 in a child process, with a fast seeding side door.

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
THREADS = 256  # requests served at once: more than any tool keeps in flight (syncd 32 small + parts)


class MotoServer:
    """Parent-side handle on one child server process."""

    def __init__(self, latency_ms: float = 0.0) -> None:
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.latency_ms = latency_ms

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_path: Path | None = None) -> MotoServer:
        err = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.latency_ms)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"moto server did not start: {line!r} (log: {log_path})")
        self.port = int(line.split()[1])
        return self

    def call(self, **cmd: Any) -> Any:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        if "error" in reply:
            raise RuntimeError(f"moto server: {cmd['op']}: {reply['error']}")
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
        """CPU seconds (user + sys) the server has used so far."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        assert self.proc is not None
        return _vm(self.proc.pid, "VmRSS")

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


def _serve(latency_ms: float = 0.0) -> None:
    os.environ.setdefault("MOTO_ACCOUNT_ID", ACCOUNT)
    # objects stay in memory: moto spools bodies above ~5 MiB to temp files, and the disk's
    # writeback made (b)'s server time bimodal (1.1 or 1.3 s for the same upload, whichever tool)
    os.environ.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(1 << 30))
    import hashlib
    import logging
    import threading

    from moto.moto_server.werkzeug_app import create_backend_app
    from moto.s3 import models
    from waitress.server import create_server

    logging.getLogger("waitress").setLevel(logging.ERROR)
    # moto's S3 app alone, as `moto_server s3` served it: the all-services dispatcher of
    # `ThreadedMotoServer` guesses the service of every request under one global lock (scans of
    # moto's package directory, hundreds of URL patterns), 39% of the server's CPU per PUT. That
    # cost is the same for every client and hid their differences behind the server's ceiling.
    # Served by waitress, which keeps connections alive as S3 does: werkzeug's server (moto's own)
    # closes every connection, so each request cost every client a TCP connect and the server a
    # new thread, on the cores the client runs on. THREADS: every request in flight sleeps its
    # latency in one; bodies stay in memory (waitress spools those above 512 KiB to temp files)
    server = create_server(delayed(create_backend_app("s3"), latency_ms / 1000), host="127.0.0.1", port=0,
                           threads=THREADS, connection_limit=1000, channel_timeout=600,
                           inbuf_overflow=1 << 30, outbuf_overflow=1 << 30, ident="moto")
    threading.Thread(target=server.run, daemon=True).start()
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

    print(f"PORT {server.effective_port}", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "bucket":
                backend.create_bucket(cmd["name"], "us-east-1")
                result: Any = True
            elif cmd["op"] == "seed":
                result = seed(cmd["bucket"], cmd["prefix"], cmd["root"])
            elif cmd["op"] == "count":
                bucket = backend.get_bucket(cmd["bucket"])
                result = sum(1 for k in bucket.keys if k.startswith(cmd["prefix"]))
            elif cmd["op"] == "stored":
                result = stored.get(cmd["bucket"], {})
            else:
                raise ValueError(f"unknown op {cmd['op']!r}")
            print(json.dumps({"result": result}), flush=True)
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
    server.close()


if __name__ == "__main__":
    _serve(float(sys.argv[1]) if len(sys.argv) > 1 else 0.0)
