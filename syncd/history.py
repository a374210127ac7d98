"""The last hour of the daemon, per minute, for the status page's picture (SPEC §6).

An operator's first question is "is it keeping up?": uploads per minute against the backlog
answer it. `History` keeps 60 per-minute samples in memory (a ring buffer: nothing on disk, it
starts empty at each start): the uploads counted in that minute (the run's upload counter,
`Stats.uploaded`, read at each observation) and the backlog at its last observation (rows
pending, uploading or deleting, as `status` counts them). `Sampler` observes every
`SAMPLE_S` seconds from its own thread, so minutes nobody looked at are in the picture too;
the page observes as it renders, so its last (current, partial) minute is up to date.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from syncd.errors import LedgerError

if TYPE_CHECKING:
    from syncd.daemon import Daemon

log = logging.getLogger(__name__)
MINUTES = 60
SAMPLE_S = 5.0  # a count over the state index: cheap even with a million rows


@dataclass(frozen=True)
class Sample:
    minute: int  # minutes since the epoch (UTC)
    uploads: int  # uploads counted in that minute
    backlog: int  # files waiting at its last observation


class History:
    """Per-minute samples of the last `MINUTES` minutes; safe to share between threads."""

    def __init__(self, minutes: int = MINUTES) -> None:
        self._keep = minutes - 1  # closed minutes; the current one is the 60th
        self._closed: deque[Sample] = deque(maxlen=self._keep)
        self._lock = threading.Lock()
        self._minute: int | None = None
        self._base = 0  # the upload counter when the current minute began
        self._total = 0
        self._backlog = 0

    def observe(self, now: float, uploaded_total: int, backlog: int) -> None:
        """The run's upload counter and the backlog at `now`."""
        minute = int(now // 60)
        with self._lock:
            if self._minute is None:
                self._minute, self._base = minute, uploaded_total
            elif minute > self._minute:
                self._closed.append(Sample(self._minute, self._total - self._base, self._backlog))
                # minutes without an observation (a stalled host): nothing uploaded, backlog as last seen
                for m in range(max(self._minute + 1, minute - self._keep), minute):
                    self._closed.append(Sample(m, 0, self._backlog))
                self._minute, self._base = minute, self._total
            self._total, self._backlog = uploaded_total, backlog

    def samples(self) -> list[Sample]:
        """Oldest first; the last one is the current minute so far."""
        with self._lock:
            if self._minute is None:
                return []
            return [*self._closed, Sample(self._minute, self._total - self._base, self._backlog)]


class Sampler:
    """Observes the daemon every `interval` seconds into `history`, while the endpoint serves."""

    def __init__(self, daemon: Daemon, history: History, interval: float = SAMPLE_S) -> None:
        self.daemon = daemon
        self.history = history
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="syncd-history", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def observe(self) -> None:
        """One observation; nothing while the engine or the ledger is not there yet."""
        d = self.daemon
        if d.engine is None or d.ledger is None:
            return
        watches = [w.prefix for w in d.cfg.watches]
        try:  # the backlog as `status` counts it, summed over the watches (the state index: cheap)
            backlog = d.ledger.query(
                f"SELECT count(*) AS n FROM files WHERE state IN ('pending','uploading','deleting') "
                f"AND watch IN ({','.join('?' * len(watches))})", watches)[0]["n"]
        except LedgerError as e:  # said by /healthz and the log already; the picture has a gap
            log.debug("history: no sample: %s", e)
            return
        self.history.observe(time.time(), d.engine.stats.uploaded, backlog)

    def _run(self) -> None:
        said = False
        try:
            while True:
                try:
                    self.observe()
                except Exception:  # noqa: BLE001 - a bug here must not end the picture, nor repeat
                    if not said:
                        log.exception("history: sample failed")
                    said = True
                if self._stop.wait(self.interval):
                    return
        finally:
            if self.daemon.ledger is not None:
                self.daemon.ledger.close_thread()


# --- the picture: inline SVG drawn here, no script (the page's CSP allows none) ---------------

W, H = 600, 100  # viewBox units: a minute is W / MINUTES wide; stretched to the page's width
TREND_MINUTES = 10


def _about(minutes: float) -> str:
    return f"about {max(1, round(minutes))} min" if minutes < 90 else f"about {minutes / 60:.0f} h"


def verdict(samples: list[Sample]) -> tuple[str, str]:
    """(tone, sentence): is it keeping up? From the backlog now and `TREND_MINUTES` ago."""
    if not samples:
        return "", "No samples yet."
    cur = samples[-1]
    past = [s for s in samples if s.minute > cur.minute - TREND_MINUTES]
    first, span = past[0], cur.minute - past[0].minute
    uploads = sum(s.uploads for s in past)
    done = f"{uploads:,} uploaded in {span + 1} min"
    if cur.backlog == 0:
        return "ok", "Keeping up: nothing waiting" + (f" ({done})." if uploads else ".")
    if span == 0:
        return "", f"{cur.backlog:,} files waiting ({done}); the trend shows from the next minute."
    if cur.backlog < first.backlog:
        rate = (first.backlog - cur.backlog) / span
        return "ok", (f"Catching up: backlog down {first.backlog - cur.backlog:,} in {span} min ({done}); "
                      f"empty in {_about(cur.backlog / rate)} at this rate.")
    if cur.backlog > first.backlog:
        return "warn", f"Falling behind: backlog up {cur.backlog - first.backlog:,} in {span} min ({done})."
    if uploads:
        return "", f"Backlog steady at {cur.backlog:,} ({done}): files arrive as fast as they go."
    return "warn", f"Not moving: {cur.backlog:,} files waiting, nothing uploaded in {span + 1} min."


def picture(samples: list[Sample], now: float) -> str:
    """The last hour as HTML: a sentence, uploads per minute as bars and the backlog as a line
    (each on its own scale, given in the legend), oldest left, the current minute right."""
    tone, sentence = verdict(samples)
    slot = W / MINUTES
    current = int(now // 60)
    shown = [s for s in samples if 0 <= current - s.minute < MINUTES]
    top_up = max([s.uploads for s in shown] + [1])
    top_backlog = max([s.backlog for s in shown] + [1])
    bars, points = [], []
    for s in shown:
        x = (MINUTES - 1 - (current - s.minute)) * slot
        at = time.strftime("%H:%M", time.gmtime(s.minute * 60))
        h = s.uploads / top_up * (H - 4)
        bars.append(f'<rect class="bar" x="{x + 1:.1f}" y="{H - h:.1f}" width="{slot - 2:.1f}" height="{h:.1f}">'
                    f"<title>{at} UTC: {s.uploads:,} uploaded, backlog {s.backlog:,}</title></rect>")
        points.append(f"{x + slot / 2:.1f},{H - 2 - s.backlog / top_backlog * (H - 4):.1f}")
    line = ""
    if len(points) > 1:
        line = f'<path class="line" d="M{" L".join(points)}" vector-effect="non-scaling-stroke"/>'
    elif points:  # one minute so far: a point, not a line
        cx, cy = points[0].split(",")
        line = f'<circle class="line" cx="{cx}" cy="{cy}" r="2"/>'
    waiting = f"top: {top_backlog:,} files" if any(s.backlog for s in shown) else "0 all along"
    since = "" if len(samples) >= MINUTES else f" (since this process started, {len(samples)} min)"
    return "\n".join([
        '<section class="history"><h2>Last hour</h2>',
        f'<p class="verdict {tone}">{sentence}</p>',
        '<div class="picture">',
        f'<svg id="history" viewBox="0 0 {W} {H}" preserveAspectRatio="none" role="img" '
        f'aria-label="uploads per minute and backlog, last {MINUTES} minutes">'
        + "".join(bars) + line + "</svg>",
        f'<div class="axis muted"><span>{MINUTES} min ago</span><span>now</span></div>',
        f'<div class="legend muted"><span class="key-up">&#9632; uploads per minute (top: {top_up:,})</span>'
        f'<span class="key-backlog">&#9473; backlog ({waiting}){since}</span></div>',
        "</div></section>",
    ])
