"""A fault-injecting HTTP/1.1 TCP proxy for S3 tests (asyncio, in a background thread).

It sits between syncd and an S3 server on 127.0.0.1 and, for a seeded fraction of requests:

- ``reset``: forwards the request, then resets the client connection (TCP RST) after a random
  number of bytes of the request body or of the response;
- ``stall``: forwards nothing for ``stall_seconds`` (the client sees no answer), then resets
  (``stall_then="reset"``) or just waits until the client gives up (``stall_then="hang"``);
- ``slowdown`` / ``internal``: answers ``503 SlowDown`` / ``500 InternalError`` itself, with a
  valid S3 XML error body, without reaching the server.

Whether a request is faulted, and how, depends only on the seed, the request line (without the
bucket's name, random per test) and how many times that request line was seen before: the same
seed gives the same faults whatever the order in which concurrent requests arrive, and in the
next run's bucket. No request line is faulted more than ``max_per_request`` times in a row, so a
bounded number of client retries of that request always gets through. That does not bound the
tries of one file, whose try may send several request lines (after a lost answer syncd asks
HEAD before it sends the PUT again, each line with its own streak): ``max_per_path`` caps the
faults of all the requests on one path (one object: any method, any query) until `forgive`,
so a client that retries a whole file N times loses at most that many of its tries to faults.

Armed faults (`arm`): the next `count` requests whose line starts with a method and contains a
needle get a chosen fault, whatever the rates say: the kinds above, and ``lost`` (the whole
request reaches the server, its whole answer is dropped: the client sees a reset after the store
acted), ``cut`` (a reset in the middle of the request: the store never acts), ``truncate`` (the
answer is cut after a few bytes), ``delay`` / ``hold`` (the store acts at once, its answer waits
``delay_seconds`` / ``hold_seconds`` before it goes back: a slow store, not a fault) and ``flip``
(the first body byte of a GET's answer is flipped). The fault explorer (tests/explore) aims its faults at one file this way.

Shaping (not faults, applied to every matching request): ``slow`` forwards the body of requests
whose line contains it at ``slow_rate`` bytes per second (a slow uplink; ``progress`` counts the
bytes sent on), and ``corrupt`` flips the first body byte of every GET response whose request
line contains it (a bit flipped in transit). ``record`` keeps every request's head (its line and
headers) in ``heads``: what a client sent, whichever HTTP stack it uses.

Only ``Content-Length`` bodies are parsed (what boto3 sends over plain HTTP); a connection
that uses ``Transfer-Encoding: chunked`` is passed through untouched.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

KINDS = ("reset", "stall", "slowdown", "internal")
ARMED_KINDS = KINDS + ("lost", "cut", "truncate", "delay", "hold", "flip")
_ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal": (500, "Internal Server Error", "InternalError",
                 "We encountered an internal error. Please try again."),
}


@dataclass
class Rates:
    reset: float = 0.0
    stall: float = 0.0
    slowdown: float = 0.0
    internal: float = 0.0

    def pick(self, x: float) -> str | None:
        for kind in KINDS:
            x -= getattr(self, kind)
            if x < 0:
                return kind
        return None


@dataclass
class _Request:
    line: bytes
    head: bytes
    length: int
    chunked: bool
    expect_continue: bool
    method: str


@dataclass
class Armed:
    kind: str
    method: bytes
    needle: bytes
    left: int


@dataclass
class FaultLog:
    injected: Counter = field(default_factory=Counter)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class FaultProxy:
    """``with FaultProxy(upstream_port, seed=..., rates=Rates(...)) as proxy: proxy.url``"""

    def __init__(self, upstream_port: int, *, seed: int, rates: Rates, stall_seconds: float = 2.0,
                 stall_then: str = "reset", max_per_request: int = 3, max_per_path: int | None = None,
                 upstream_host: str = "127.0.0.1",
                 slow: bytes = b"", slow_rate: int = 0, corrupt: bytes = b"", record: bool = False,
                 cut_bodies: bool = True) -> None:
        """`cut_bodies=False`: a `reset` never cuts a request's body, only the answer (for a
        server that, unlike S3, stores an aborted PUT's body: PITFALLS §8)."""
        self.upstream = (upstream_host, upstream_port)
        self.cut_bodies = cut_bodies
        self.seed = seed
        self.rates = rates
        self.stall_seconds = stall_seconds
        self.stall_then = stall_then
        self.max_per_request = max_per_request
        self.max_per_path = max_per_path
        self.log = FaultLog()
        self.enabled = True
        self.slow, self.slow_rate, self.corrupt = slow, slow_rate, corrupt
        self.progress: Counter = Counter()  # slowed request line -> body bytes forwarded
        self.corrupted = 0  # responses whose body had a byte flipped
        self.heads: list[bytes] | None = [] if record else None  # `record`: every request's line and headers
        self._seen: Counter = Counter()  # request line -> times seen
        self._streak: Counter = Counter()  # request line -> consecutive faults
        self._path_faults: Counter = Counter()  # request path -> faults since `forgive`
        self.armed: list[Armed] = []
        self.fired: Counter = Counter()  # armed kind -> times it fired
        self.delay_seconds = 2.0
        self.hold_seconds = 12.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.port = 0

    # --- lifecycle ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        self._server = loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    # --- decisions ------------------------------------------------------------------------
    def arm(self, kind: str, method: str, needle: bytes, count: int = 1) -> Armed:
        """The next `count` requests `method ...needle...` get fault `kind` (ARMED_KINDS)."""
        assert kind in ARMED_KINDS, kind
        rule = Armed(kind, method.encode() + b" ", needle, count)
        with self.log.lock:
            self.armed.append(rule)
        return rule

    def disarm(self) -> None:
        with self.log.lock:
            self.armed.clear()

    def _armed(self, line: bytes) -> str | None:
        for rule in self.armed:
            if rule.left > 0 and line.startswith(rule.method) and rule.needle in line:
                rule.left -= 1
                self.fired[rule.kind] += 1
                self.log.injected[rule.kind] += 1
                if not rule.left:
                    self.armed.remove(rule)
                return rule.kind
        return None

    def decide(self, line: bytes) -> tuple[str | None, random.Random]:
        """The fault for this occurrence of `line` (deterministic per seed), and its RNG."""
        with self.log.lock:
            self.log.requests += 1
            armed = self._armed(line)
            n = self._seen[line]
            self._seen[line] += 1
            digest = hashlib.sha256(b"%d\0%s\0%d" % (self.seed, _unbucketed(line), n)).digest()
            rng = random.Random(int.from_bytes(digest[:8], "big"))
            if armed is not None:
                return armed, rng
            kind = self.rates.pick(rng.random()) if self.enabled else None
            path = _path(line)
            if kind is not None and (self._streak[line] >= self.max_per_request or (
                    self.max_per_path is not None and self._path_faults[path] >= self.max_per_path)):
                kind = None
            if kind is None:
                self._streak[line] = 0
            else:
                self._streak[line] += 1
                self._path_faults[path] += 1
                self.log.injected[kind] += 1
            return kind, rng

    def forgive(self) -> None:
        """Every path gets its whole ``max_per_path`` again (a new run of the client)."""
        with self.log.lock:
            self._path_faults.clear()

    def counts(self) -> dict[str, int]:
        with self.log.lock:
            return {k: self.log.injected[k] for k in KINDS}

    # --- the connection ------------------------------------------------------------------
    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur = uw = None
        try:
            ur, uw = await asyncio.open_connection(*self.upstream)
            state = {"reset_after": None}  # bytes of response left before a reset, when armed
            pump = asyncio.ensure_future(self._responses(ur, cw, state))
            try:
                await self._requests(cr, cw, uw, state, pump)
            finally:
                pump.cancel()
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            for w in (cw, uw):
                if w is not None and not w.is_closing():
                    w.close()

    async def _requests(self, cr, cw, uw, state, pump) -> None:
        while True:
            req = await _read_head(cr)
            if req is None:
                return
            if self.heads is not None:
                self.heads.append(req.head)
            if req.chunked:  # not parsed: pass the rest of the connection through
                uw.write(req.head)
                await _pipe(cr, uw)
                return
            kind, rng = self.decide(req.line)
            if kind in _ERRORS:
                if not req.expect_continue:  # with 100-continue the client waits: no body comes
                    await _discard(cr, req.length)
                cw.write(_error_response(kind, req.method))
                await cw.drain()
                cw.close()  # a clean close: the client reads the whole answer
                return
            if kind == "stall":
                await self._stall(cr, cw, pump)
                return
            state["hold"] = {"delay": self.delay_seconds, "hold": self.hold_seconds}.get(kind or "", 0.0)
            limit = None
            if kind == "cut":
                limit = rng.randrange(1, len(req.head) + req.length) if req.length else len(req.head) // 2
            elif kind in ("lost", "truncate"):
                # the server gets it all and acts; its answer is dropped whole, or cut short
                state["reset_after"] = 0 if kind == "lost" else rng.randrange(1, 600)
            elif kind == "reset":
                if req.length and rng.random() < 0.5 and self.cut_bodies:  # cut the upload mid-body
                    limit = rng.randrange(1, len(req.head) + req.length)
                else:  # cut the answer after a few bytes
                    state["reset_after"] = rng.randrange(0, 4096)
            slowed = bool(self.slow and self.slow in req.line)
            rate = (lambda: self.slow_rate) if slowed else None  # read as it goes: a test may lift it
            state["flip"] = kind == "flip" or bool(self.corrupt and req.method == "GET" and self.corrupt in req.line)
            state["seen"] = b""
            await _forward(cr, uw, req.head, req.length, limit, rate=rate,
                           progress=(self.progress, req.line) if slowed else None)
            if limit is not None:
                _reset(cw)
                return
            if pump.done():
                return

    async def _stall(self, cr, cw, pump) -> None:
        pump.cancel()
        if self.stall_then == "hang":
            try:  # until the client gives up (its read timeout) or the stall ends
                await asyncio.wait_for(cr.read(), self.stall_seconds)
            except TimeoutError:
                pass
        else:
            await asyncio.sleep(self.stall_seconds)
        _reset(cw)

    async def _responses(self, ur, cw, state) -> None:
        while True:
            data = await ur.read(65536)
            if not data:
                cw.close()
                return
            if state.get("hold"):
                await asyncio.sleep(state["hold"])
                state["hold"] = 0.0
            left = state["reset_after"]
            if left is not None and data.startswith(b"HTTP/1.1 100"):
                left = None  # an interim `100 Continue`: the answer that counts comes after it
            if left is not None:
                if len(data) > left:
                    cw.write(data[:left])
                    await cw.drain()
                    _reset(cw)
                    return
                state["reset_after"] = left - len(data)
            if state.get("flip"):
                data = self._flip(state, data)
            cw.write(data)
            await cw.drain()

    def _flip(self, state: dict, data: bytes) -> bytes:
        """Flip the first body byte of the response that `data` is (a part of)."""
        seen = state["seen"] + data
        end = seen.find(b"\r\n\r\n")
        if end < 0 or end + 4 >= len(seen):  # the body starts in a later chunk
            state["seen"] = seen
            return data
        at = end + 4 - (len(seen) - len(data))  # the first body byte, in this chunk
        state["flip"], state["seen"] = False, b""
        if seen.split(b"\r\n", 1)[0].split(b" ")[1:2] != [b"200"]:
            return data
        self.corrupted += 1
        return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def _path(line: bytes) -> bytes:
    """The path of a request line, without its query: `PUT /b/k?x-id=PutObject HTTP/1.1` -> `/b/k`."""
    parts = line.split(b" ")
    return parts[1].split(b"?", 1)[0] if len(parts) > 1 else line


def _unbucketed(line: bytes) -> bytes:
    """The request line without the bucket's name, the first segment of a path-style request
    (the tests' buckets are named at random): what the faults of a seed are drawn from."""
    return re.sub(rb"^(\S+ /)[^/?\s]+", rb"\1{bucket}", line)


async def _read_head(r: asyncio.StreamReader) -> _Request | None:
    try:
        head = await r.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.split(b"\r\n")
    headers = {}
    for ln in lines[1:]:
        if b":" in ln:
            k, v = ln.split(b":", 1)
            headers[k.strip().lower()] = v.strip().lower()
    return _Request(
        line=lines[0], head=head, length=int(headers.get(b"content-length", b"0") or 0),
        chunked=b"chunked" in headers.get(b"transfer-encoding", b""),
        expect_continue=headers.get(b"expect") == b"100-continue",
        method=lines[0].split(b" ", 1)[0].decode("ascii", "replace"),
    )


async def _forward(r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes, length: int,
                   limit: int | None = None, rate: Callable[[], int] | None = None,
                   progress: tuple[Counter, bytes] | None = None) -> None:
    """Send `head` and `length` bytes of body read from `r`; only the first `limit` bytes if set;
    at most `rate()` bytes per second of body while that is not 0."""
    left = len(head) + length if limit is None else limit
    w.write(head[:left])
    left -= min(left, len(head))
    body = length
    while left > 0 and body > 0:
        now_rate = rate() if rate is not None else 0
        chunk = await r.read(min(left, body, max(1, now_rate // 20) if now_rate else 65536))
        if not chunk:
            raise ConnectionError("client closed mid-body")
        w.write(chunk)
        left -= len(chunk)
        body -= len(chunk)
        if now_rate:
            await w.drain()
            await asyncio.sleep(len(chunk) / now_rate)
        if progress is not None:
            progress[0][progress[1]] += len(chunk)
    await w.drain()


async def _discard(r: asyncio.StreamReader, n: int) -> None:
    while n > 0:
        chunk = await r.read(min(n, 65536))
        if not chunk:
            return
        n -= len(chunk)


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(65536):
        w.write(data)
        await w.drain()


def _reset(w: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
    sock = w.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    w.transport.abort()


def _error_response(kind: str, method: str) -> bytes:
    status, reason, code, message = _ERRORS[kind]
    rid = hashlib.sha256(f"{kind}{method}".encode()).hexdigest()[:16].upper()
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>{rid}</RequestId>"
            f"<HostId>faultproxy</HostId></Error>").encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nx-amz-request-id: {rid}\r\nConnection: close\r\n\r\n")
    return head.encode() + (b"" if method == "HEAD" else body)
