"""GET / : the status page, and its two POST actions (SPEC §6).

One self-contained HTML page rendered on the server: CSS inline, no script (a meta refresh
reloads it), no external asset, so it works on an air-gapped host and on a phone. Its data come
from `syncd.status.collect` (the same object as GET /status) and `Daemon.health()` (the reason
GET /healthz gives). Everything from the ledger is hostile input (file names, error texts): it
is HTML-escaped, control and bidi characters are shown escaped as everywhere else
(`syncd.names.shown`: `\\n`, `\\x1b`, `\\u202e`), and the Content-Security-Policy forbids
scripts, frames and foreign form targets, so even a slip could not run anything.

It is for people (issue 23): failed files turn the banner amber and show in the title even
while /healthz is 200 (red stays for a 503), times read "5 min ago" with the exact time, the
last hour is a picture (`syncd.history`), and on a phone each failure is a block (CSS only).

"Retry failed" and "Rescan" are forms POSTing to /actions/retry and /actions/rescan with a
random token made when the endpoint starts (per process): another site cannot read the page,
so it cannot forge the form (CSRF). A wrong token (a page from before a restart) does nothing
and leads (303) to the current page, which says so. The access rule (loopback or bearer token)
is http.py's; these handlers run only after it.
"""

from __future__ import annotations

import hmac
import html
import secrets
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from syncd.history import History, Sample, picture
from syncd.ledger import STATES
from syncd.names import shown
from syncd.status import collect

if TYPE_CHECKING:
    from syncd.daemon import Daemon
    from syncd.http import Handler

ACTIONS = ("/actions/retry", "/actions/rescan")
REFRESH_S = 5
MAX_FORM = 4096  # the form is one token; anything larger is not ours
# No script at all; inline styles only; forms may only post back here; never framed (clickjacking).
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

CSS = """
body{font:15px/1.4 system-ui,sans-serif;margin:0 auto;max-width:60rem;padding:.75rem;color:#222}
h1{font-size:1.3rem;margin:.2rem 0 .6rem}h2{font-size:1.1rem;margin:1.2rem 0 .3rem;overflow-wrap:anywhere}
.banner{padding:.6rem .8rem;border-radius:.4rem;font-weight:600;overflow-wrap:anywhere}
.ok{background:#dff3e0;color:#14521a}.bad{background:#fbe0e0;color:#7a1212}.warn{background:#fdf0c9;color:#6b4a00}
.notice{background:#e6eefc;padding:.4rem .8rem;border-radius:.4rem;margin-top:.5rem;overflow-wrap:anywhere}
.notice.warn{background:#fdf0c9}
.scroll{overflow-x:auto}table{border-collapse:collapse;margin:.3rem 0}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
td.p{overflow-wrap:anywhere;unicode-bidi:isolate;font-family:ui-monospace,monospace;font-size:.9em}
td.err{overflow-wrap:anywhere}time,.exact{white-space:nowrap}.failures .exact{display:none}
.actions{display:flex;flex-wrap:wrap;gap:.5rem;margin:.8rem 0}.actions form{margin:0}
button{font:inherit;padding:.5rem 1rem;border-radius:.4rem;border:1px solid #888;background:#fff}
.muted{color:#666;font-size:.9em}
.picture{margin:.6rem 0 0}.picture svg{display:block;width:100%;height:7rem;background:#fafafa;border:1px solid #ddd}
.picture .bar{fill:#7aa7e0}.picture .line{fill:none;stroke:#c0392b;stroke-width:2}
.legend,.axis{display:flex;flex-wrap:wrap;justify-content:space-between;gap:0 1rem}
.key-up{color:#2f6db5}.key-backlog{color:#c0392b}.verdict{font-weight:600;margin:.2rem 0}
@media (max-width:40rem){
.failures,.failures tbody,.failures tr,.failures td{display:block}.failures thead{display:none}
.failures tr{border:1px solid #ccc;border-radius:.4rem;margin:.5rem 0;padding:.3rem .6rem}
.failures td{border:0;padding:.1rem 0;text-align:left}
.failures td[data-label]::before{content:attr(data-label) ": ";color:#666}
.failures .exact{display:inline}
}
""".strip()


def text(value: Any) -> str:
    """`value` as HTML text: shown as names are everywhere (controls, invisible or reordering
    characters made visible), then HTML-escaped."""
    return html.escape("" if value is None else shown(value), quote=True)


def _span(seconds: float) -> str:
    """A duration as people say it: `42 s`, `5 min`, `2 h 5 min`, `3 days`."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h} h {m} min" if m else f"{h} h"
    d = s // 86400
    return f"{d} day" if d == 1 else f"{d} days"


def _when(iso: Any, now: float, *, exact: bool = False) -> str:
    """An ISO time of the status data as `<time>`: "5 min ago", the exact time as its title
    (hover) and, with `exact`, beside it. Computed here: the page is rendered at each reload."""
    try:
        t = datetime.strptime(str(iso), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return text(iso)  # not a time syncd wrote: shown as it is
    at = t.strftime("%Y-%m-%d %H:%M:%S UTC")
    ago = now - t.timestamp()
    rel = "just now" if -5 < ago < 5 else f"{_span(ago)} ago" if ago > 0 else f"in {_span(-ago)}"
    tag = f'<time datetime="{text(iso)}" title="{at}">{rel}</time>'
    return tag + f' <span class="muted exact">({at})</span>' if exact else tag


def _listing(value: Any, now: float) -> str:
    """`last_listing` as another part of syncd reports it: a time, or an object of fields."""
    if isinstance(value, dict):
        return ", ".join(f"{text(k)}: {text(v)}" for k, v in value.items())
    return _when(value, now, exact=True)


def _path(value: Any) -> str:
    """A file name that may break after each `/` (a phone shows `photos/2026/` then the name)."""
    return text(value).replace("/", "/<wbr>")


def _watch(w: dict[str, Any], now: float) -> list[str]:
    c = w["counts"]
    states = [s for s in STATES if s in c] + [s for s in c if s not in STATES]
    age = w["oldest_pending_age_s"]
    out = [f'<section class="watch" data-prefix="{text(w["prefix"])}">',
           f'<h2>{text(w["prefix"] or "(no prefix)")} <span class="muted">{_path(w["path"])}</span></h2>',
           f'<p>Backlog: <b class="backlog">{int(w["backlog"]):,}</b> files'
           + ("" if age is None else f', the oldest waiting <span class="age">{_span(age)}</span>')
           + '.<br>Last success: <span class="last-success">'
           + (_when(w["last_success"], now, exact=True) if w["last_success"] else "never") + "</span>"]
    if "last_listing" in w:
        out.append(f'<br>Last remote listing: <span class="last-listing">'
                   f'{_listing(w["last_listing"], now) if w["last_listing"] is not None else "never"}</span>')
    out.append("</p>")
    total = int(w["failures_total"])
    if total:
        shown = len(w["failures"])
        out.append(f'<p>Failures: <b class="failures-total">{total}</b>'
                   + (f" (the {shown} most recent shown)" if shown < total else "") + "</p>")
        # a table on a desktop; one block per failure on a phone (CSS only, the media query)
        out.append('<div class="scroll"><table class="failures"><thead><tr><th>File</th><th>Error</th>'
                   "<th>Attempts</th><th>Last try</th></tr></thead><tbody>")
        for f in w["failures"]:
            out.append(f'<tr><td class="p">{_path(f["path"])}</td><td class="err">{text(f["error"])}</td>'
                       f'<td class="n" data-label="Attempts">{text(f["attempts"])}</td>'
                       # the exact time on hover; beside it on a phone, which has no hover
                       f'<td data-label="Last try">{_when(f["updated_at"], now, exact=True)}</td></tr>')
        out.append("</tbody></table></div>")
    else:
        out.append('<p class="muted">No failed files.</p>')
    # after the failures (what to act on comes first on a phone); one row per state: narrow
    out.append('<table class="counts"><tr><th>State</th><th>Files</th></tr>'
               + "".join(f'<tr><td>{text(s)}</td><td class="n" data-state="{text(s)}">{int(c[s])}</td></tr>'
                         for s in states) + "</table>")
    out.append("</section>")
    return out


def headline(healthy: bool, reason: str, failed: int) -> tuple[str, str, str]:
    """(title, banner class, banner text). Failed files show even while /healthz is 200 (SPEC
    §6: the page is for people): amber; red stays for what /healthz answers 503."""
    n = f"{failed} failed"
    if not healthy:
        return ("syncd: unhealthy" + (f", {n}" if failed else ""), "bad",
                "Unhealthy" + (f" ({n})" if failed else "") + f": {reason}")
    if failed:
        return f"syncd: {n}", "warn", f"{n}; otherwise healthy: {reason}"
    return "syncd: ok", "ok", f"Healthy: {reason}"


def render(data: dict[str, Any], healthy: bool, reason: str, token: str, notice: str = "", *,
           now: float | None = None, samples: list[Sample] | None = None) -> str:
    """The page for `data` (the /status object), the /healthz answer and the last hour's samples."""
    now = time.time() if now is None else now
    d = data["daemon"]
    who = f"pid {int(d['pid'])}" if d.get("pid") else "this process"
    failed = sum(int(w["failures_total"]) for w in data["watches"])
    title, tone, banner = headline(healthy, reason, failed)
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # back to "/" so a notice from an action shows once
        f'<meta http-equiv="refresh" content="{REFRESH_S}; url=/">',
        f"<title>{text(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>syncd <span class=\"muted\">{text(who)}</span></h1>",
        f'<div id="health" class="banner {tone}">{text(banner)}</div>',
    ]
    remote = d.get("remote_error")
    if remote and remote.get("error") and str(remote["error"]) not in reason:  # not twice
        parts.append(f'<p class="remote-error">Remote failing (first failure {_when(remote.get("since"), now)}): '
                     f'{text(remote["error"])} (retrying)</p>')
    if notice:
        warn = notice.startswith("Nothing was done")
        parts.append(f'<div id="notice" class="notice{" warn" if warn else ""}">{text(notice)}</div>')
    parts.append('<div class="actions">')
    for action, label in (("retry", "Retry failed"), ("rescan", "Rescan")):
        parts.append(f'<form method="post" action="/actions/{action}">'
                     f'<input type="hidden" name="token" value="{text(token)}">'
                     f'<button type="submit" id="{action}">{label}</button></form>')
    parts.append("</div>")
    if samples is not None:
        parts.append(picture(samples, now))
    for w in data["watches"]:
        parts += _watch(w, now)
    parts.append(f'<p class="muted">Refreshes every {REFRESH_S}s. The same data as '
                 '<a href="/status">/status</a>; <a href="/metrics">/metrics</a>.</p></body></html>')
    return "\n".join(parts)


STALE = ("Nothing was done: the button came from a page older than this syncd process (it restarted "
         "since). This is the current page: press the button again if you still want it.")
STALE_BODY = (b"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>syncd: page expired</title>"
              b"</head><body><p>Nothing was done: the page was older than this syncd process. "
              b"<a href=\"/?stale=1\">Open the current page</a>.</p></body></html>\n")


def _notice(query: str) -> str:
    q = parse_qs(query)
    if "requeued" in q and q["requeued"][0].isdigit():
        return f"Re-queued {int(q['requeued'][0])} failed files."
    if "rescan" in q:
        return "Rescan requested; it runs within a second."
    if "stale" in q:
        return STALE
    return ""


class Console:
    """The page and its actions for one daemon; the token lives as long as the process."""

    def __init__(self, daemon: Daemon, history: History | None = None) -> None:
        self.daemon = daemon
        self.token = secrets.token_urlsafe(32)
        self.history = history

    def page(self, query: str = "") -> bytes:
        d = self.daemon
        now = time.time()
        data = collect(d.cfg, d.ledger, now)
        healthy, reason = d.health()
        samples = None
        if self.history is not None:
            if d.engine is not None:  # the current minute as of now, not as of the last sample
                self.history.observe(now, d.engine.stats.uploaded, sum(int(w["backlog"]) for w in data["watches"]))
            samples = self.history.samples()
        return render(data, healthy, reason, self.token, _notice(query), now=now, samples=samples).encode("utf-8")

    def token_ok(self, form: bytes) -> bool:
        given = parse_qs(form.decode("ascii", "replace")).get("token", [""])[0]
        return hmac.compare_digest(given.encode(), self.token.encode())

    def act(self, route: str) -> str:
        """Do the action; the query string of the page to go back to."""
        d = self.daemon
        if route == "/actions/retry":
            assert d.ledger is not None and d.engine is not None
            n = d.ledger.requeue_failed()
            d.engine.wake.set()
            return f"requeued={n}"
        d.request_rescan("status page", asked=True)
        return "rescan=1"

    def post(self, h: Handler) -> None:
        """Serve a POST to one of ACTIONS (the caller has applied the access rule)."""
        try:
            length = int(h.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_FORM:
            # the unread body must not be parsed as the next request
            h.send_body(413 if length > MAX_FORM else 400, b"bad form\n", "text/plain; charset=utf-8",
                        headers={"Connection": "close"})
            return
        form = h.rfile.read(length)
        if not self.token_ok(form):
            # a page from before a restart (or not ours): nothing is done, and the browser lands
            # on the current page, which says so; a reload there is a GET, not this POST again
            h.send_body(303, STALE_BODY, "text/html; charset=utf-8", headers={"Location": "/?stale=1", **PAGE_HEADERS})
            return
        if self.daemon.ledger is None or self.daemon.engine is None:
            h.send_body(503, b"starting: try again in a moment\n", "text/plain; charset=utf-8")
            return
        query = self.act(h.route)
        h.send_body(303, b"", "text/plain; charset=utf-8", headers={"Location": "/?" + query})
