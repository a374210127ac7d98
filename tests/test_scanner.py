"""Scanner decisions (stat-only comparison with the ledger)."""

from __future__ import annotations

from syncd.config import WatchConfig
from syncd.ledger import Ledger
from syncd.scanner import Scanner


def watch(tmp_path, **kw) -> WatchConfig:
    root = tmp_path / "w"
    root.mkdir(exist_ok=True)
    return WatchConfig(path=root, prefix="w", **kw)


def test_walk_order_matches_the_ledger_order(tmp_path):
    w = watch(tmp_path)
    names = ["a-b", "a/x", "a0", "b", "é", "a/b/c", "A"]
    for n in names:
        p = w.path / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(n)
    led = Ledger(tmp_path / "l.db")
    Scanner(led, w, "", settle=0).run()
    # a second scan over the same tree finds everything unchanged: the merge join lined up
    stats = Scanner(led, w, "", settle=0).run()
    assert stats.unchanged == 0 and stats.changed == len(names)  # still pending: not uploaded
    rows = led.query("SELECT path FROM files ORDER BY path")
    assert sorted(n for n in names) == [r["path"] for r in rows]
    led.close()


def test_missing_files_restore_at_start_and_delete_while_running(tmp_path):
    w = watch(tmp_path, on_delete="mirror")
    led = Ledger(tmp_path / "l.db")
    led.upsert_many([
        {"watch": "w", "path": "gone.txt", "state": "synced", "op": None, "remote_sha256": "ab", "key": "w/gone.txt"},
        {"watch": "w", "path": "never.txt", "state": "pending", "op": "put", "key": "w/never.txt"},
        {"watch": "w", "path": "restoring.txt", "state": "failed", "op": "get", "key": "w/restoring.txt"},
        {"watch": "w", "path": "tomb.txt", "state": "deleted", "op": None, "key": "w/tomb.txt"},
    ])
    s = Scanner(led, w, "", settle=0, missing="delete").run()
    assert s.deletions == 1 and s.forgotten == 1
    by = {r["path"]: r for r in led.query("SELECT * FROM files")}
    assert (by["gone.txt"]["state"], by["gone.txt"]["op"]) == ("deleting", "delete")
    assert "never.txt" not in by  # vanished before upload: nothing to remember
    assert (by["restoring.txt"]["state"], by["restoring.txt"]["op"]) == ("failed", "get")
    assert by["tomb.txt"]["state"] == "deleted"
    led.update(by["gone.txt"]["id"], state="synced", op=None)
    s = Scanner(led, w, "", settle=0, missing="restore").run()
    assert s.to_restore == 2  # gone.txt and the failing restore; never the tombstone
    led.close()


def test_unreadable_directory_leaves_its_rows_alone(tmp_path, monkeypatch):
    import os

    w = watch(tmp_path, on_delete="mirror")
    (w.path / "locked").mkdir()
    (w.path / "locked/a.txt").write_text("a")
    led = Ledger(tmp_path / "l.db")
    Scanner(led, w, "", settle=0).run()
    led.db.execute("UPDATE files SET state='synced', op=NULL, remote_sha256='x'")
    real = os.scandir

    def scandir(p):
        if str(p).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(p))
        return real(p)

    monkeypatch.setattr(os, "scandir", scandir)
    s = Scanner(led, w, "", settle=0, missing="delete").run()
    assert s.deletions == 0 and s.unreadable_dirs == ["locked/"]
    assert led.get("w", "locked/a.txt")["state"] == "synced"
    led.close()


def test_a_bad_name_is_warned_about_once_not_at_every_change(tmp_path, caplog):
    import logging
    import os

    w = watch(tmp_path)
    bad = w.path / "back\\slash.txt"  # a name that cannot become a portable key
    led = Ledger(tmp_path / "l.db")
    with caplog.at_level(logging.WARNING, logger="syncd.scanner"):
        for i in range(3):  # written to again and again
            bad.write_text("x" * (i + 1))
            os.utime(bad, ns=(i * 10**9, i * 10**9))
            assert Scanner(led, w, "", settle=0).run().bad_names == 1
    warnings = [r for r in caplog.records if "back\\slash.txt" in r.getMessage()]
    assert len(warnings) == 1
    (row,) = led.query("SELECT state, error_kind, size FROM files")
    assert (row["state"], row["error_kind"], row["size"]) == ("failed", "name", 3)  # the row follows the file
    led.close()


def test_a_catch_up_backlog_is_not_fresh_and_goes_oldest_first(tmp_path):
    """Files written while syncd was stopped (an hour and a day ago) are a catch-up, not what the
    app has just closed: the fresh lane leaves them to the other workers (it stays free for the
    app's next file), and they go oldest first. A file written a moment ago is fresh."""
    import os
    import time

    w = watch(tmp_path)
    now = time.time()
    for name, age in (("hour.txt", 3600), ("day.txt", 86400), ("now.txt", 0)):
        (w.path / name).write_text(name)
        os.utime(w.path / name, (now - age, now - age))
    led = Ledger(tmp_path / "l.db")
    Scanner(led, w, "", settle=2.0).run()
    lane = led.claim(("put",), time.time() + 3, limit=16, batch_bytes=1 << 20, fresh=60, fresh_only=True)
    assert [r["path"] for r in lane] == ["now.txt"]
    rest = led.claim(("put",), time.time() + 3, limit=16, batch_bytes=1 << 20, fresh=60)
    assert [r["path"] for r in rest] == ["day.txt", "hour.txt"]
    led.close()
