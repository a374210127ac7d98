"""`syncd status` and GET /status: read from the ledger, whether or not a daemon runs."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

from syncd.config import Config
from syncd.ledger import STATES, Ledger, ledger_failure
from syncd.lock import holder
from syncd.names import shown

FAILURES_SHOWN = 20


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def last_listing(ledger: Ledger, prefix: str) -> float | None:
    """When the watch's last complete listing of the remote ended (SPEC §3)."""
    rows = ledger.query("SELECT listed_at FROM watches WHERE prefix=?", [prefix])
    return rows[0]["listed_at"] if rows else None


def collect(cfg: Config, ledger: Ledger | None = None, now: float | None = None) -> dict[str, Any]:
    """The object of SPEC §3 `status --json`."""
    now = time.time() if now is None else now
    h = holder(cfg.ledger)
    daemon: dict[str, Any] = {"running": bool(h["running"] and h.get("role") == "run"),
                              "pid": h["pid"] if h.get("role") == "run" else None}
    if h["running"] and h.get("role") != "run":
        daemon["busy"] = {"command": h.get("role"), "pid": h["pid"]}
    own = ledger is None and cfg.ledger.exists()
    if own:
        ledger = Ledger(cfg.ledger, check=False, readonly=True, config=cfg.path)  # a reader: never writes
    try:
        if ledger is not None:
            ready = ledger.get_meta("ready")
            if daemon["running"] and ready is not None:
                daemon["ready"] = ready == "1"
            if daemon["running"]:
                _daemon_meta(ledger, daemon)
        watches = []
        for w in cfg.watches:
            entry: dict[str, Any] = {"prefix": w.prefix, "path": str(w.path)}
            if ledger is None:
                entry.update(counts=dict.fromkeys(STATES, 0), oldest_pending_age_s=None, last_success=None,
                             failures=[], failures_total=0, backlog=0, last_listing=None)
            else:
                counts = ledger.counts(w.prefix)
                if not h["running"]:  # only a process holding the lock uploads: rows a stopped
                    # one left claimed (a full disk) wait, and are given back at the next start
                    counts["pending"] += counts["uploading"]
                    counts["uploading"] = 0
                oldest = ledger.oldest_pending(w.prefix)
                fails, total = ledger.failures(w.prefix, FAILURES_SHOWN)
                entry.update(
                    counts=counts,
                    backlog=counts["pending"] + counts["uploading"] + counts["deleting"],
                    oldest_pending_age_s=None if oldest is None else round(max(0.0, now - oldest), 1),
                    last_success=_iso(ledger.last_success(w.prefix)),
                    failures=[{"path": f["path"], "error": f["last_error"], "attempts": f["attempts"],
                               "updated_at": _iso(f["updated_at"])} for f in fails],
                    failures_total=total,
                    last_listing=_iso(last_listing(ledger, w.prefix)),
                )
            watches.append(entry)
    except sqlite3.Error as e:
        raise ledger_failure(cfg.ledger, e, "read", cfg.path) from e
    finally:
        if own and ledger is not None:
            ledger.close()
    return {"daemon": daemon, "watches": watches}


def _daemon_meta(ledger: Ledger, daemon: dict[str, Any]) -> None:
    """What the running daemon keeps in the ledger for other processes: the remote's current
    failure (a startup listing retried for minutes says why) and its startup restore."""
    try:
        remote = json.loads(ledger.get_meta("remote_error") or "null")
        restore = json.loads(ledger.get_meta("startup_restore") or "null")
    except ValueError:
        return
    if remote and remote.get("error"):
        daemon["remote_error"] = {"error": remote["error"], "since": _iso(remote.get("since"))}
    if restore:
        daemon["startup_restore"] = {k: restore.get(k) for k in ("total", "restored", "failed")}


def render_text(data: dict[str, Any], now: float) -> str:
    """`syncd status`: names and errors escaped (SPEC §4.14; the JSON keeps them as they are)."""
    d = data["daemon"]
    lines = []
    if d["running"]:
        ready = "" if "ready" not in d else (", ready" if d["ready"] else ", starting (restore running)")
        lines.append(f"daemon: running (pid {d['pid']}{ready})")
    else:
        lines.append("daemon: not running")
    if d.get("busy"):
        lines.append(f"  ({d['busy']['command']} running, pid {d['busy']['pid']})")
    if d.get("remote_error"):
        lines.append(f"  remote failing since {d['remote_error']['since']}: {shown(d['remote_error']['error'])} (retrying)")
    r = d.get("startup_restore")
    if r and r.get("total"):
        lines.append(f"  startup restore: {r['restored']} of {r['total']} restored"
                     + (f", {r['failed']} failed (listed below)" if r.get("failed") else ""))
    for w in data["watches"]:
        c = w["counts"]
        lines.append(f"{shown(w['prefix']) or '(no prefix)'}  {shown(w['path'])}")
        lines.append("  " + ", ".join(f"{k} {c[k]}" for k in STATES))
        age = w["oldest_pending_age_s"]
        lines.append(f"  backlog: {w['backlog']} files" + (f", oldest {age:.0f}s" if age is not None else ""))
        lines.append(f"  last success: {w['last_success'] or 'never'}")
        lines.append(f"  last remote listing: {w.get('last_listing') or 'never'}")
        if w["failures_total"]:
            lines.append(f"  failures ({len(w['failures'])} of {w['failures_total']}, most recent first):")
            for f in w["failures"]:
                lines.append(f"    {shown(f['path'])}: {shown(f['error'])} ({f['attempts']} attempts, {f['updated_at']})")
    return "\n".join(lines)
