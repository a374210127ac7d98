"""The bandwidth limit (`bwlimit`, SPEC §2): one token bucket that every byte of every upload and
restore of a process goes through, so a catch-up cannot starve the app's own traffic.

- `parse_rate`: rclone's `--bwlimit` syntax for one plain rate ("8M" = 8 MiB/s; a bare number
  is KiB/s, as in rclone; "0" or "off" = no limit). Timetables and "UP:DOWN" pairs are refused.
- `Limiter.take(n)`: a token bucket (monotonic clock) that may go into debt: a caller reserves
  its bytes at once and sleeps until the bucket has paid them. Threads share the debt, so the
  rate holds across every transfer; after an idle spell at most BURST_SECONDS of the rate passes
  without waiting (plus the one read in flight).
- `MeteredBody`: an upload body (a file or a part) whose reads take tokens while botocore sends
  it. botocore may read a body *before* sending it and rewind it (SigV4 hashes the payload of
  operations that sign it: botocore 1.44 sends PutObject and UploadPart as UNSIGNED-PAYLOAD, older
  ones hashed them on http:// endpoints): such reads are not sent and cost nothing. A
  `before-send` handler (`start_metering`) turns metering on; a seek (a rewind, or a retry
  starting the body over) turns it off. So the limiter counts the bytes actually sent, a retried
  part's included.
- `MeteredWriter`: a restore's destination; each write takes tokens. The body is read from the
  socket only as fast as it is written, so TCP's flow control holds the sender to the rate.

Server-side copies send no bytes and take no tokens. No limit (the default) means no limiter and
no wrapper at all: the unlimited path is unchanged.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from syncd.fsutil import CHUNK

BURST_SECONDS = 0.25  # the bucket's depth: a quarter second of the rate
MIN_CHUNK = 16 * 1024  # reads of our own loops (file:// remote, GET bodies) are never smaller
_UNITS = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_RATE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([bkmgtp]?)", re.IGNORECASE)


def parse_rate(value: str | int | float) -> int:
    """Bytes per second for a `bwlimit` value, 0 for no limit; ValueError saying what is wrong.

    rclone's syntax for a plain rate: a number with an optional suffix B, K, M, G, T or P (binary
    multiples: 1K = 1024 bytes/s; no suffix = K), "off" or "0" for none."""
    if isinstance(value, bool):
        raise ValueError("must be a rate such as \"8M\" (8 MiB/s) or \"0\" for no limit, not true or false")
    if isinstance(value, (int, float)):
        text = repr(value)
        value = str(value)
    else:
        text = repr(value)
    s = value.strip()
    if s.lower() in ("off", "0", ""):
        return 0
    if ":" in s or "," in s or " " in s:
        raise ValueError(f"only one rate for uploads and restores together is supported (such as \"8M\"), "
                         f"not a timetable or an UP:DOWN pair: {text}")
    m = _RATE.fullmatch(s)
    if not m:
        raise ValueError(f"must be a number with an optional suffix B, K, M, G, T or P (\"8M\" = 8 MiB/s), "
                         f"\"off\" or \"0\", not {text}")
    rate = float(m.group(1)) * _UNITS[(m.group(2) or "k").lower()]
    if rate == 0:
        return 0
    if rate < 1:
        raise ValueError(f"is less than 1 byte/s: {text}")
    return int(rate)


def describe(rate: int) -> str:
    """A rate for people: "8 MiB/s", "512 KiB/s", "100 B/s"."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if rate >= size:
            return f"{rate / size:g} {unit}/s"
    return f"{rate} B/s"


class Limiter:
    """A token bucket shared by every transfer of one remote (thread-safe)."""

    def __init__(self, rate: int, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Any] | None = None) -> None:
        if rate <= 0:
            raise ValueError("a Limiter needs a rate above 0")
        self.rate = float(rate)
        self.burst = max(1.0, self.rate * BURST_SECONDS)
        # the size of the reads syncd's own loops make (GET bodies, file:// transfers): an eighth
        # of the burst, within [16 KiB, 1 MiB]. A GET reads its body as fast as the limiter lets
        # it write; smaller reads keep less in flight per connection (bench (l): restores of
        # 64 MiB files at 8M, 30 s windows up to 1.07x the limit with 1 MiB reads, 1.04x with these)
        self.chunk = max(MIN_CHUNK, min(CHUNK, int(self.burst / 8)))
        self._clock = clock
        self._sleep = sleep
        self._stop: threading.Event | None = None
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._at = clock()
        self.taken = 0  # bytes that went through, since the start

    def interrupt_on(self, stop: threading.Event) -> None:
        """Once `stop` is set, nobody waits: transfers in flight finish at once (SPEC §4.10)."""
        self._stop = stop

    def take(self, n: int) -> None:
        """Reserve `n` bytes; return when the bucket has paid for them."""
        if n <= 0:
            return
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            self._tokens -= n
            self.taken += n
            wait = -self._tokens / self.rate
        if wait > 0:
            if self._sleep is not None:
                self._sleep(wait)
            elif self._stop is not None:
                self._stop.wait(wait)
            else:
                time.sleep(wait)


class MeteredBody:
    """An upload body whose reads take tokens while the request is being sent (`start_metering`)."""

    def __init__(self, raw: Any, limiter: Limiter) -> None:
        self._raw, self._limiter = raw, limiter
        self.sending = False

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if self.sending and data:
            self._limiter.take(len(data))
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self.sending = False  # a rewind: the signer's pass is over, or a retry starts the body again
        return self._raw.seek(pos, whence)

    def tell(self) -> int:
        return self._raw.tell()


def start_metering(request: Any, **_: Any) -> None:
    """botocore `before-send` handler (registered first): the body is sent from here on."""
    body = getattr(request, "body", None)
    if isinstance(body, MeteredBody):
        body.sending = True


class MeteredWriter:
    """A restore's destination whose writes take tokens first."""

    def __init__(self, raw: BinaryIO, limiter: Limiter) -> None:
        self._raw, self._limiter = raw, limiter

    def write(self, data: bytes) -> int:
        self._limiter.take(len(data))
        return self._raw.write(data)
