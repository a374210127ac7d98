"""The mass-deletion guard: the one place that decides whether deletions go ahead (SPEC §4.5, §4.12).

A mass deletion is the worst failure of a mirror tool: an `rm -rf` in a watch, a bucket emptied
by another tool, a wrong bucket. Whatever queues deletions asks here:

- a rescan (`after_rescan`) and a listing (`listing_may_delete`) count theirs: more than
  `max_deletes` pause every deletion (`pause`: meta `deletes_paused`, /healthz 503) until
  `syncd retry --deletes`; a listing that found no object at all deletes nothing locally (the
  files are uploaded again: a wiped or wrong bucket must not wipe the hosts);
- a worker asks `allowed()` before each deletion: more than `max_deletes` queued within
  `DELETE_WINDOW` pause every deletion the same way;
- the events consumer (shared watches) asks `judge_events` inside the transaction that queues a
  local deletion for a remote deletion event. Such deletions are due `EVENT_GRACE` seconds
  later, so that a burst is judged whole before any file goes. They pause when the watch's
  local deletions from events not done yet would remove most of its files (at least
  `MASS_FLOOR` of them, and more than it keeps), when more than `max_deletes` deletions were
  queued within `DELETE_WINDOW`, or when some of the watch's event deletions are paused already
  (those of files synced here since that pause began excepted: they were not among the files
  the burst would have removed, so they are judged among themselves; paused with the burst, an
  empty listing would upload them again, and another host's app deletion would be undone).
  Paused, they are rows (op `unlink`, `due_at` = `PAUSED`, the reason in `last_error`), durable
  before the event's message is deleted. The next listing of the watch judges them again
  (`reconcile.cancel_held`): one that found other objects but not theirs confirms them (they
  are deleted), an empty one deletes nothing and has the files uploaded again (so the hosts
  converge after a wipe without an operator), and an object that is back cancels its deletion,
  as its creation event does; `syncd retry --deletes` releases them at once.

`MASS_FLOOR` = 3: a watch of one or two files (an app's single settings file) follows its
remote deletions as before; from three files on, losing most of them at once waits for a
listing, as an empty listing does for any number of files. `EVENT_GRACE` = 10 s: S3 sends the
events of one `aws s3 rm --recursive` or DeleteObjects as it deletes (moto: 30 deletions reach
a host's ledger within about a second); ten seconds more before another host's deletion shows
here costs nothing, a file lost on every host costs everything.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite_utils

    from syncd.config import Config
    from syncd.ledger import Ledger

log = logging.getLogger(__name__)
DELETE_WINDOW = 60.0  # seconds over which max_deletes counts deletions
EVENT_GRACE = 10.0
MASS_FLOOR = 3
HELD = 1e18  # due_at of a local deletion a listing holds until it ends (never due by itself)
PAUSED = 2e18  # due_at of a local deletion from an event, paused until a listing or `retry --deletes`
PAUSED_AT = "events_paused_at:"  # meta: when a watch's event deletions were paused (+ the watch)
HAD_TTL = 5.0  # seconds a watch's file count is reused within a burst of events (counting is O(files))


def event_rule(pending: int, had: int, recent: int, max_deletes: int) -> str | None:
    """Why local deletions from remote deletion events must wait (None: they may go ahead).

    `pending`: the watch's local deletions from events not done yet, the new one included;
    `had`: its files before them (synced, plus those pending); `recent`: deletions of every
    kind queued within DELETE_WINDOW, the new one included."""
    if recent > max_deletes:
        return f"{recent} deletions within {DELETE_WINDOW:.0f}s exceed max_deletes={max_deletes}"
    if pending >= MASS_FLOOR and 2 * pending > had:
        return f"remote deletion events would remove {pending} of its {had} files at once"
    return None


def recent_deletions(db: sqlite_utils.Database) -> int:
    """Deletions (remote, and local ones for shared watches) queued within DELETE_WINDOW, not
    counting those queued before the last `syncd retry --deletes` (released_at)."""
    got = db.execute("SELECT value FROM meta WHERE name='deletes_released_at'").fetchone()
    since = max(time.time() - DELETE_WINDOW, float(got[0]) if got else 0.0)
    return int(db.execute("SELECT count(*) FROM files WHERE state IN ('deleting','deleted') AND queued_at>?",
                          [since]).fetchone()[0])


class DeleteGuard:
    """The guard of one ledger (one per Engine: `resync` and `run` alike)."""

    def __init__(self, cfg: Config, ledger: Ledger) -> None:
        self.max_deletes = cfg.max_deletes
        self.ledger = ledger
        self._lock = threading.Lock()
        self._had: dict[str, tuple[int, float]] = {}  # watch -> (files it had, when counted)

    # --- the pause of every deletion (max_deletes) -------------------------------------------
    def pause(self, why: str) -> None:
        """Pause every deletion (remote and local) until `syncd retry --deletes` (SPEC §4.5)."""
        with self._lock:  # workers may all hit the cap at once: one log line, one reason
            if self.ledger.get_meta("deletes_paused"):
                return
            log.error("pausing deletions: %s exceeds max_deletes=%d; check the watch and the remote, then run "
                      "`syncd retry --deletes` to release them", why, self.max_deletes)
            self.ledger.set_meta("deletes_paused", why)

    def allowed(self) -> bool:
        """Asked by a worker before each deletion, so the cap holds even when workers delete
        faster than the daemon's supervisor ticks."""
        self.check_rate()
        return not self.ledger.get_meta("deletes_paused")

    def check_rate(self) -> None:
        """More than max_deletes deletions queued within DELETE_WINDOW pause them all."""
        if self.ledger.get_meta("deletes_paused"):
            return
        n = recent_deletions(self.ledger.db)
        if n > self.max_deletes:
            self.pause(f"{n} deletions queued within {DELETE_WINDOW:.0f}s")

    def after_rescan(self, watch: str, deletions: int) -> None:
        if deletions > self.max_deletes:
            self.pause(f"{deletions} deletions in one rescan of {watch}")

    def listing_may_delete(self, watch: str, where: str, objects: int, deletions: int) -> bool:
        """A listing holds `deletions` local deletions: False when none may happen (the listing
        found no object: the files are uploaded again instead); more than max_deletes pause."""
        if objects == 0:
            log.warning("the listing of %s found no object while the ledger holds %d synced files: nothing is "
                        "deleted locally (a wiped or wrong bucket must not wipe the hosts); they are uploaded "
                        "again", where, deletions)
            return False
        if deletions > self.max_deletes:
            self.pause(f"{deletions} local deletions in one listing of {watch}")
        return True

    # --- local deletions from remote deletion events (shared watches) ------------------------
    def judge_events(self, db: sqlite_utils.Database, watch: str) -> str | None:
        """In the transaction that queued a local deletion from an event (on its connection):
        pause the watch's event deletions not done yet when the rule says so; returns why."""
        paused, pending = db.execute(
            "SELECT coalesce(sum(due_at>=?), 0), coalesce(sum(due_at<?), 0) FROM files "
            "WHERE watch=? AND state='deleting' AND op='unlink'", [PAUSED, HELD, watch]).fetchone()
        since = float("inf")  # what was synced here before the pause: the files a burst threatens
        rule = None
        if paused:
            got = db.execute("SELECT last_error FROM files WHERE watch=? AND state='deleting' AND op='unlink' "
                             "AND due_at>=? LIMIT 1", [watch, PAUSED]).fetchone()
            why = got[0] or "paused"
            mark = db.execute("SELECT value FROM meta WHERE name=?", [PAUSED_AT + watch]).fetchone()
            since = float(mark[0]) if mark else since
            # files synced here since the pause began were not among those the burst would have
            # removed: their deletions (another host's app) are judged among themselves, not
            # paused with the burst, which an empty listing would undo (uploaded again). A burst
            # among them (another wipe) pauses them too, and a pause begins again from now
            later, kept = db.execute(
                "SELECT coalesce(sum(state='deleting'), 0), coalesce(sum(state='synced'), 0) FROM files "
                "WHERE watch=? AND synced_at>? AND ((state='deleting' AND op='unlink' AND due_at<?) "
                "OR state='synced')", [watch, since, HELD]).fetchone()
            if later:
                rule = event_rule(later, later + kept, recent_deletions(db), self.max_deletes)
        else:
            rule = event_rule(pending, self._files_had(db, watch, pending), recent_deletions(db), self.max_deletes)
            if rule is None:
                return None
        if rule is not None:
            since = float("inf")
            why = f"{rule}; waiting for a listing to confirm them, or `syncd retry --deletes`"
            log.error("pausing local deletions in %s: %s", watch, why)
            from syncd.ledger import put_meta  # here: the ledger imports this module

            put_meta(db, PAUSED_AT + watch, repr(time.time()))
        cur = db.execute("UPDATE files SET due_at=?, queued_at=NULL, last_error=?, gen=gen+1 WHERE watch=? "
                         "AND state='deleting' AND op='unlink' AND lease_until IS NULL AND due_at<? "
                         "AND coalesce(synced_at, 0)<=?", [PAUSED, why, watch, HELD, since])
        return why if cur.rowcount else None

    def _files_had(self, db: sqlite_utils.Database, watch: str, pending: int) -> int:
        """The watch's files before the pending deletions (synced + pending), counted again at
        most every HAD_TTL seconds: within a burst the sum stays the same (synced rows become
        pending ones), and counting reads every row of the watch."""
        now = time.monotonic()
        got = self._had.get(watch)
        if got is None or now - got[1] > HAD_TTL or got[0] < pending:
            synced = db.execute("SELECT count(*) FROM files WHERE watch=? AND state='synced'", [watch]).fetchone()[0]
            got = self._had[watch] = (synced + pending, now)
        return got[0]

    # --- what /healthz says -------------------------------------------------------------------
    def health(self) -> str | None:
        """Why deletions wait (the /healthz 503 reason), None when they do not."""
        why = self.ledger.get_meta("deletes_paused")
        if why:
            return f"deletions paused ({why}); release with `syncd retry --deletes`"
        rows = self.ledger.query(
            "SELECT watch, count(*) AS n, max(last_error) AS why FROM files WHERE state='deleting' AND op='unlink' "
            "AND due_at>=? GROUP BY watch", [PAUSED])
        if not rows:
            return None
        return "local deletions paused: " + "; ".join(f"{r['n']} in {r['watch']} ({r['why']})" for r in rows)


def release(ledger: Ledger) -> tuple[str | None, int]:
    """`syncd retry --deletes`: lift the max_deletes pause and release the paused local deletions
    from events (due now). Returns (the pause's reason, local deletions released)."""
    from syncd.ledger import put_meta

    was = ledger.get_meta("deletes_paused")
    now = time.time()
    with ledger.write() as w:
        # queued_at = released_at: what was released is not counted against the cap again
        put_meta(w, "deletes_released_at", str(now))
        w.execute("DELETE FROM meta WHERE name='deletes_paused'")
        n = w.execute("UPDATE files SET due_at=?, queued_at=?, last_error=NULL, gen=gen+1 WHERE state='deleting' "
                      "AND op='unlink' AND due_at>=?", [now, now, PAUSED]).rowcount
    return was, n
