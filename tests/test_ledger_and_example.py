"""The ledger file (SPEC §5) and the example config a fresh clone runs."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from syncd.ledger import SCHEMA_VERSION, Ledger

REPO = Path(__file__).resolve().parent.parent


def test_example_config_runs_without_a_cloud_account(tmp_path, syncd):
    cfg = tmp_path / "syncd.example.toml"
    shutil.copy(REPO / "syncd.example.toml", cfg)
    r = syncd("--config", str(cfg), "resync")
    assert r.code == 0, r.err
    assert (tmp_path / "demo/uploads").is_dir()
    (tmp_path / "demo/uploads/hello.txt").write_text("hello")
    r = syncd("--config", str(cfg), "resync")
    assert "uploaded 1" in r.out
    assert (tmp_path / "demo/remote/uploads/hello.txt").read_text() == "hello"
    assert "/demo/" in (REPO / ".gitignore").read_text()


def test_ledger_schema_wal_and_columns(tmp_path):
    Ledger(tmp_path / "l.db").close()
    con = sqlite3.connect(tmp_path / "l.db")
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 1
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = {r[1] for r in con.execute("PRAGMA table_info(files)")}
    assert {"watch", "path", "size", "mtime_ns", "sha256", "state", "key", "attempts", "last_error",
            "updated_at", "synced_at"} <= cols


def test_corrupt_ledger_is_reported_with_the_recovery_command(tmp_path, syncd):
    from tests.conftest import write_config

    ledger = tmp_path / "l.db"
    ledger.write_bytes(b"this is not a database" * 100)
    cfg = write_config(tmp_path / "s.toml", remote={"url": f"file://{tmp_path / 'r'}"},
                       watches=[{"path": str(tmp_path / "w")}], syncd={"ledger": str(ledger)})
    r = syncd("--config", str(cfg), "resync")
    assert r.code == 2
    assert "corrupt" in r.err and "mv " in r.err and f"syncd --config '{cfg}' resync" in r.err
    assert ledger.read_bytes().startswith(b"this is not")  # never silently replaced


def test_the_corrupt_ledger_advice_works_as_printed_from_another_directory(tmp_path, syncd, monkeypatch):
    """The recovery command names the config that was used (issue 25): run as printed, from
    another directory, it must not fail with "no config file found"."""
    import os
    import subprocess
    import sys

    from tests.conftest import write_config

    ledger = tmp_path / "state dir" / "l.db"
    ledger.parent.mkdir()
    ledger.write_bytes(b"this is not a database" * 100)
    write_config(tmp_path / "s.toml", remote={"url": f"file://{tmp_path / 'r'}"},
                 watches=[{"path": str(tmp_path / "w")}], syncd={"ledger": str(ledger), "health_listen": ""})
    monkeypatch.chdir(tmp_path)
    r = syncd("--config", "s.toml", "resync")  # relative, as an operator types it
    assert r.code == 2 and "corrupt" in r.err, r.err
    advice = r.err.strip().splitlines()[-1].split("remote listing: ", 1)[1]
    assert "--config" in advice and str(tmp_path / "s.toml") in advice, advice
    cmd = advice.replace("syncd ", f"{sys.executable} -m syncd ", 1)
    p = subprocess.run(cmd, shell=True, cwd="/", capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stdout + p.stderr
    assert ledger.with_name("l.db.corrupt").exists() and Ledger(ledger).close() is None


def test_claims_are_exclusive(tmp_path):
    import threading
    import time

    led = Ledger(tmp_path / "l.db")
    led.upsert_many([{"watch": "w", "path": f"f{i}", "state": "pending", "op": "put", "due_at": 0}
                     for i in range(300)])
    got: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        while rows := led.claim(("put",), time.time()):
            with lock:
                got.extend(r["id"] for r in rows)
        led.close_thread()

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(set(got)) and len(got) == 300
    led.close()


def test_a_claim_takes_a_fair_share_of_what_is_due_within_its_bytes(tmp_path):
    import time

    led = Ledger(tmp_path / "l.db")
    led.upsert_many([{"watch": "w", "path": f"f{i:03}", "state": "pending", "op": "put", "due_at": i, "size": 10}
                     for i in range(108)])
    led.update(led.get("w", "f030")["id"], size=1 << 20)

    def take() -> list[str]:
        return [r["path"] for r in led.claim(("put",), time.time(), limit=16, batch_bytes=1 << 20, share=8)]

    assert take() == [f"f{i:03}" for i in range(14)]  # ceil(108 / 8): a long queue goes in batches
    assert take() == [f"f{i:03}" for i in range(14, 26)]  # ceil(94 / 8)
    assert take() == [f"f{i:03}" for i in range(26, 30)]  # the 1 MiB file would pass the bytes
    assert take() == ["f030"]
    due = lambda: led.query("SELECT count(*) AS n FROM files WHERE lease_until IS NULL")[0]["n"]  # noqa: E731
    while due() > 8:
        take()
    left = due()
    assert [len(take()) for _ in range(left)] == [1] * left  # no more due than workers: one each
    assert take() == []
    led.close()


def test_fresh_uploads_are_claimed_before_a_backlog_and_the_fresh_lane_takes_only_small_ones(tmp_path):
    import time

    now = time.time()
    led = Ledger(tmp_path / "l.db")
    old = [{"watch": "w", "path": f"old{i:02}", "state": "pending", "op": "put", "due_at": now - 3600 + i,
            "queued_at": now - 3600, "size": 10} for i in range(20)]
    fresh = [{"watch": "w", "path": name, "state": "pending", "op": "put", "due_at": now - age, "queued_at": now - age,
              "size": size} for name, age, size in (("big", 2.0, 50 << 20), ("new1", 1.0, 10), ("new2", 0.5, 10))]
    led.upsert_many(old + fresh + [{"watch": "w", "path": "restore", "state": "pending", "op": "get",
                                    "due_at": now - 1, "queued_at": now - 1, "size": 10}])

    def take(**kw) -> list[str]:
        return [r["path"] for r in led.claim(("put", "get"), now, limit=16, batch_bytes=1 << 20, **kw)]

    # the fresh lane: fresh small uploads only, the newest first; never the backlog or a large file
    assert take(fresh=60, fresh_only=True, max_size=1 << 20) == ["new2", "new1"]
    assert take(fresh=60, fresh_only=True, max_size=1 << 20) == []
    assert take(fresh=60) == ["big"]  # a large one alone, ahead of the backlog
    assert take(fresh=60) == [f"old{i:02}" for i in range(16)]  # then the rest by due_at (a restore is never fresh)
    assert led.next_due(("put",), after=now) is None  # nothing comes due later: the lane sleeps
    led.close()


def test_fresh_deletions_are_claimed_before_a_backlog_by_the_fresh_lane_and_weigh_nothing(tmp_path):
    import time

    now = time.time()
    led = Ledger(tmp_path / "l.db")
    old = [{"watch": "w", "path": f"old{i:02}", "state": "pending", "op": "put", "due_at": now - 3600 + i,
            "queued_at": now - 3600, "size": 10} for i in range(20)]
    gone = [{"watch": "w", "path": f"gone{i}", "state": "deleting", "op": op, "due_at": now - 1, "queued_at": None,
             "attempts": 0, "size": 900_000} for i, op in enumerate(("tomb", "delete", "trash"))]
    retry = {"watch": "w", "path": "retried", "state": "deleting", "op": "tomb", "due_at": now - 1, "attempts": 2}
    led.upsert_many(old + gone + [retry])
    ops = ("put", "tomb", "delete", "trash")
    lane = led.claim(ops, now, limit=16, batch_bytes=1 << 20, fresh=60, fresh_only=True, max_size=1 << 20)
    # all three in one claim: a deletion's bytes are not its file's (2.7 MB of files here)
    assert sorted(r["path"] for r in lane) == ["gone0", "gone1", "gone2"]
    # a retry is not fresh: it waits its turn behind the backlog
    assert led.claim(ops, now, limit=16, batch_bytes=1 << 20, fresh=60, fresh_only=True) == []
    assert [r["path"] for r in led.claim(ops, now, limit=30, batch_bytes=1 << 20, fresh=60)][-1] == "retried"
    led.close()


def test_finish_does_not_overwrite_an_outside_change(tmp_path):
    import time

    led = Ledger(tmp_path / "l.db")
    led.upsert_many([{"watch": "w", "path": "a", "state": "pending", "op": "put", "due_at": 0}])
    row = led.claim(("put",), time.time())[0]
    led.update(row["id"], state="deleting", op="delete")  # the watcher saw a deletion meanwhile
    assert led.finish(row, state="synced", op=None, remote_sha256="abc") is False
    after = led.get("w", "a")
    assert (after["state"], after["op"], after["remote_sha256"], after["lease_until"]) == (
        "deleting", "delete", "abc", None)
    led.close()


def test_a_finish_after_its_lease_expired_leaves_the_lease_someone_took_since(tmp_path):
    import time

    led = Ledger(tmp_path / "l.db")
    led.upsert_many([{"watch": "w", "path": "a", "state": "pending", "op": "get", "due_at": 0}])
    row = led.claim(("get",), time.time(), lease=0.01)[0]
    theirs = time.time() + 60  # /files/ took the expired lease and recorded its restore
    led.update(row["id"], lease_until=theirs, state="synced", op=None)
    assert led.finish(row, still_op="get", state="synced", op=None) is False
    assert led.get("w", "a")["lease_until"] == theirs
    led.close()


def test_concurrent_finishes_share_commits_and_a_failing_one_undoes_only_itself(tmp_path, monkeypatch):
    import threading
    import time

    led = Ledger(tmp_path / "l.db")
    led.upsert_many([{"watch": "w", "path": f"f{i}", "state": "pending", "op": "put", "due_at": 0}
                     for i in range(200)])
    rows = led.claim(("put",), time.time(), limit=200, batch_bytes=1 << 30)
    assert len(rows) == 200
    commits = 0
    real_write = Ledger.write

    def counted(self):
        nonlocal commits
        commits += 1
        return real_write(self)

    monkeypatch.setattr(Ledger, "write", counted)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(mine: list[dict]) -> None:
        start.wait()
        for row in mine:
            try:
                if row["path"] == "f13":  # a piece that fails inside the shared transaction
                    led.finish(row, no_such_column=1)
                else:
                    assert led.finish(row, state="synced", op=None, remote_sha256=row["path"])
            except sqlite3.OperationalError as e:
                errors.append(e)
        led.close_thread()

    threads = [threading.Thread(target=worker, args=(rows[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1 and "no_such_column" in str(errors[0])
    states = {r["path"]: (r["state"], r["remote_sha256"], r["lease_until"]) for r in led.query("SELECT * FROM files")}
    assert states.pop("f13")[:2] == ("uploading", None)  # its failed piece left it as claimed
    assert all(v == ("synced", k, None) for k, v in states.items())
    assert commits < 200  # grouped: fewer transactions than finishes (one each without grouping)
    led.close()


def test_a_wake_set_between_looking_and_waiting_is_not_lost():
    from syncd.pool import Wake

    wake = Wake()
    seen = wake.seen()
    wake.set()  # another worker finished right after this one looked at the queue...
    wake.set()  # ...and a second waiter would have cleared a plain Event here
    assert wake.wait_after(seen, timeout=5.0) is True  # returns at once, not after the timeout
    assert wake.wait_after(wake.seen(), timeout=0.01) is False
