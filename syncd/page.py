"""GET / : the status page, and its two POST actions (SPEC §6).

One self-contained HTML page rendered on the server: CSS inline, no script (a meta refresh
reloads it), no external asset, so it works on an air-gapped host and on a phone. Its data come
from `syncd.status.collect` (the same object as GET /status) and `Daemon.health()` (the reason
GET /healthz gives). Everything from the ledger is hostile input (file names, error texts): it
is HTML-escaped, control and bidi characters are shown escaped as everywhere else
(`syncd.names.shown`: `\\n`, `\\x1b`, `\\u202e`), and the Content-Security-Policy forbids
scripts, frames and foreign form targets, so even a slip could not run anything.

"Retry failed" and "Rescan" are forms POSTing to /actions/retry and /actions/rescan with a
random token made when the endpoint starts (per process): another site cannot read the page,
so it cannot forge the form (CSRF). The access rule (loopback or bearer token) is http.py's;
these handlers run only after it.
"""

from __future__ import annotations

import hmac
import html
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

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
h1{font-size:1.3rem;margin:.2rem 0 .6rem}h2{font-size:1.1rem;margin:1.2rem 0 .3rem;word-break:break-all}
.banner{padding:.6rem .8rem;border-radius:.4rem;font-weight:600;word-break:break-word}
.ok{background:#dff3e0;color:#14521a}.bad{background:#fbe0e0;color:#7a1212}
.notice{background:#e6eefc;padding:.4rem .8rem;border-radius:.4rem;margin-top:.5rem}
.scroll{overflow-x:auto}table{border-collapse:collapse;margin:.3rem 0}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
td.p{word-break:break-all;unicode-bidi:isolate;font-family:ui-monospace,monospace;font-size:.9em}
.actions{display:flex;flex-wrap:wrap;gap:.5rem;margin:.8rem 0}.actions form{margin:0}
button{font:inherit;padding:.5rem 1rem;border-radius:.4rem;border:1px solid #888;background:#fff}
.muted{color:#666;font-size:.9em}
""".strip()


def text(value: Any) -> str:
    """`value` as HTML text: shown as names are everywhere (controls, invisible or reordering
    characters made visible), then HTML-escaped."""
    return html.escape("" if value is None else shown(value), quote=True)


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m {s % 60}s"
    return f"{s // 3600}h {s % 3600 // 60}m"


def _listing(value: Any) -> str:
    """`last_listing` as another part of syncd reports it: a time, or an object of fields."""
    if isinstance(value, dict):
        return ", ".join(f"{text(k)}: {text(v)}" for k, v in value.items())
    return text(value)


def _watch(w: dict[str, Any]) -> list[str]:
    c = w["counts"]
    states = [s for s in STATES if s in c] + [s for s in c if s not in STATES]
    age = w["oldest_pending_age_s"]
    out = [f'<section class="watch" data-prefix="{text(w["prefix"])}">',
           f'<h2>{text(w["prefix"] or "(no prefix)")} <span class="muted">{text(w["path"])}</span></h2>',
           # one row per state: narrow enough for a phone without scrolling
           '<table class="counts"><tr><th>State</th><th>Files</th></tr>'
           + "".join(f'<tr><td>{text(s)}</td><td class="n" data-state="{text(s)}">{int(c[s])}</td></tr>'
                     for s in states) + "</table>",
           f'<p>Backlog: <b class="backlog">{int(w["backlog"])}</b> files'
           + ("" if age is None else f', the oldest waiting <span class="age">{text(_age(age))}</span>')
           + f'.<br>Last success: <span class="last-success">{text(w["last_success"] or "never")}</span>']
    if "last_listing" in w:
        out.append(f'<br>Last remote listing: <span class="last-listing">'
                   f'{_listing(w["last_listing"]) if w["last_listing"] is not None else "never"}</span>')
    out.append("</p>")
    total = int(w["failures_total"])
    if total:
        shown = len(w["failures"])
        out.append(f'<p>Failures: <b class="failures-total">{total}</b>'
                   + (f" (the {shown} most recent shown)" if shown < total else "") + "</p>")
        out.append('<div class="scroll"><table class="failures"><tr><th>File</th><th>Error</th>'
                   "<th>Attempts</th><th>Last try (UTC)</th></tr>")
        for f in w["failures"]:
            out.append(f'<tr><td class="p">{text(f["path"])}</td><td class="err">{text(f["error"])}</td>'
                       f'<td class="n">{text(f["attempts"])}</td><td>{text(f["updated_at"])}</td></tr>')
        out.append("</table></div>")
    else:
        out.append('<p class="muted">No failed files.</p>')
    out.append("</section>")
    return out


def render(data: dict[str, Any], healthy: bool, reason: str, token: str, notice: str = "") -> str:
    """The page for `data` (the /status object) and the /healthz answer."""
    d = data["daemon"]
    who = f"pid {int(d['pid'])}" if d.get("pid") else "this process"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # back to "/" so a notice from an action shows once
        f'<meta http-equiv="refresh" content="{REFRESH_S}; url=/">',
        "<title>syncd: " + ("ok" if healthy else "unhealthy") + "</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>syncd <span class=\"muted\">{text(who)}</span></h1>",
        f'<div id="health" class="banner {"ok" if healthy else "bad"}">'
        f'{"Healthy" if healthy else "Unhealthy"}: {text(reason)}</div>',
    ]
    if notice:
        parts.append(f'<div id="notice" class="notice">{text(notice)}</div>')
    parts.append('<div class="actions">')
    for action, label in (("retry", "Retry failed"), ("rescan", "Rescan")):
        parts.append(f'<form method="post" action="/actions/{action}">'
                     f'<input type="hidden" name="token" value="{text(token)}">'
                     f'<button type="submit" id="{action}">{label}</button></form>')
    parts.append("</div>")
    for w in data["watches"]:
        parts += _watch(w)
    parts.append(f'<p class="muted">Refreshes every {REFRESH_S}s. The same data as '
                 '<a href="/status">/status</a>; <a href="/metrics">/metrics</a>.</p></body></html>')
    return "\n".join(parts)


def _notice(query: str) -> str:
    q = parse_qs(query)
    if "requeued" in q and q["requeued"][0].isdigit():
        return f"Re-queued {int(q['requeued'][0])} failed files."
    if "rescan" in q:
        return "Rescan requested; it runs within a second."
    return ""


class Console:
    """The page and its actions for one daemon; the token lives as long as the process."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.token = secrets.token_urlsafe(32)

    def page(self, query: str = "") -> bytes:
        d = self.daemon
        data = collect(d.cfg, d.ledger)
        healthy, reason = d.health()
        return render(data, healthy, reason, self.token, _notice(query)).encode("utf-8")

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
        d.request_rescan("status page")
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
            h.send_body(403, b"forbidden: missing or wrong form token (reload the page)\n",
                        "text/plain; charset=utf-8")
            return
        if self.daemon.ledger is None or self.daemon.engine is None:
            h.send_body(503, b"starting: try again in a moment\n", "text/plain; charset=utf-8")
            return
        query = self.act(h.route)
        h.send_body(303, b"", "text/plain; charset=utf-8", headers={"Location": "/?" + query})
