"""No window (issue 13): files are uploaded the moment their writer closes them, and with
`lazy_restore` the daemon is READY before the restore has finished (SPEC §2, §4.1, §6).

The daemon runs in-process (a thread, a real watchdog observer) against a `file://` remote.
`settle_seconds` is set far beyond every deadline here, so only the close path can make a file
durable in time: without it these tests time out.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from syncd.config import load_config
from syncd.daemon import Daemon
from syncd.lazy import PRESENT, RESTORED, restore_now
from syncd.remote.local import LocalRemote
from tests.conftest import free_port, wait_for, write_config
from tests.daemon_util import write_file

NEVER = 3600.0  # settle_seconds that no test waits for


def config(tmp_path: Path, *, settle: float = NEVER, workers: int = 4, **syncd_opts) -> Path:
    opts = {"ledger": str(tmp_path / "state" / "ledger.db"), "settle_seconds": settle, "workers": workers,
            "health_listen": "", "rescan_interval": 0, **syncd_opts}
    return write_config(tmp_path / "syncd.toml", remote={"url": f"file://{tmp_path / 'remote'}"},
                        watches=[{"path": str(tmp_path / "up"), "prefix": "up"}], syncd=opts)


@contextmanager
def running(cfg_path: Path) -> Iterator[Daemon]:
    """`syncd run` in a thread; stopped (and checked to have stopped cleanly) at the end."""
    d = Daemon(load_config(cfg_path))
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(d.run()), name="test-daemon")
    t.start()
    try:
        yield d
    finally:
        d.stop.set()
        t.join(30)
        assert not t.is_alive() and result == [0]


def ready(d: Daemon) -> bool:
    return d.phase == "running" and d.ledger is not None and d.ledger.get_meta("ready") == "1"


def remote_bytes(tmp_path: Path, rel: str) -> bytes | None:
    p = tmp_path / "remote" / "up" / rel
    try:
        return p.read_bytes()
    except FileNotFoundError:
        return None


# --- upload_on_close ---------------------------------------------------------------------------

def test_500_files_closed_by_their_writer_are_all_durable_without_settling(tmp_path: Path) -> None:
    files = {f"d{i % 10}/f{i:03d}.bin": os.urandom(64 + i) for i in range(500)}
    for d_ in {rel.split("/")[0] for rel in files}:
        # before the start: files written into a directory younger than its inotify watch have
        # no close event (PITFALLS §1); they settle
        (tmp_path / "up" / d_).mkdir(parents=True, exist_ok=True)
    port = free_port()
    with running(config(tmp_path, health_listen=f"127.0.0.1:{port}")) as d:
        wait_for(lambda: ready(d), 30, what="ready")
        for rel, data in files.items():
            with open(tmp_path / "up" / rel, "wb") as f:  # written, then closed by its writer
                f.write(data)
        wait_for(lambda: all(remote_bytes(tmp_path, rel) == data for rel, data in files.items()), 120, 0.2,
                 "all 500 closed files in the remote")
        # (the object is durable a moment before the ledger records it)
        wait_for(lambda: d.ledger.counts("up")["synced"] == 500, 30, what="500 rows synced")

        def delays() -> dict[str, float]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
            return {s.name: s.value for fam in text_string_to_metric_families(text)
                    if fam.name == "syncd_upload_delay_seconds" for s in fam.samples}

        # the loss window was measured for each of them, and /metrics shows it
        wait_for(lambda: delays()["syncd_upload_delay_seconds_count"] == 500, 30, what="500 delays observed")


def test_a_file_appended_in_chunks_with_closes_between_ends_with_its_final_content(tmp_path: Path) -> None:
    with running(config(tmp_path)) as d:
        wait_for(lambda: ready(d), 30, what="ready")
        path = tmp_path / "up" / "log.txt"
        whole = b""
        for i in range(40):  # each close races with the upload the previous one started
            chunk = f"chunk {i:02d} ".encode() * (1 + i * 50)
            with open(path, "ab") as f:
                f.write(chunk)
            whole += chunk
        wait_for(lambda: remote_bytes(tmp_path, "log.txt") == whole, 60, what="the final content uploaded")
        wait_for(lambda: d.ledger.get("up", "log.txt")["state"] == "synced", 30, what="synced")
        # rewritten right after: the last content wins again
        path.write_bytes(b"rewritten")
        wait_for(lambda: remote_bytes(tmp_path, "log.txt") == b"rewritten", 60, what="the rewrite uploaded")


SETTLE_LONG = 30.0  # a settle no deadline below reaches: only a close (or a lease, syncd.leases) is in time


APP = """
import os, sys
root = sys.argv[1]
for i, rel in enumerate(sys.argv[2:]):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:  # no pause: made, written and closed at once
        f.write(os.urandom(100 + i))
"""


def test_files_closed_in_just_made_directories_are_uploaded_without_settling(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The app's pattern: a directory per upload (or per day), made and written at once. The
    close usually happens before the directory's inotify watch exists (PITFALLS §10): the
    watcher asks the kernel (a read lease) whether anyone still writes each file it finds."""
    rels = [f"one{i:02d}/f.bin" if i % 2 else f"day{i:02d}/u{i:02d}/f.bin" for i in range(20)]  # 1 and 2 levels
    caplog.set_level(logging.INFO, logger="syncd.watcher")
    with running(config(tmp_path, settle=SETTLE_LONG)) as d:
        wait_for(lambda: ready(d), 30, what="ready")
        # the app is another process: its writes do not wait for this one's threads (the GIL)
        subprocess.run([sys.executable, "-c", APP, str(tmp_path / "up"), *rels], check=True, timeout=60)
        files = {rel: (tmp_path / "up" / rel).read_bytes() for rel in rels}
        wait_for(lambda: all(remote_bytes(tmp_path, rel) == data for rel, data in files.items()), 10, 0.1,
                 f"all 20 files of new directories in the remote well before settle_seconds ({SETTLE_LONG} s)")
        assert d.watcher is not None and d.watcher.leases.granted > 0
    # the method, named once at the start
    lines = [r.getMessage() for r in caplog.records if "new directories" in r.getMessage()]
    assert len(lines) == 1 and "before their watch existed: kernel read leases (F_SETLEASE" in lines[0], lines


def test_a_file_opened_before_its_new_directory_was_watched_is_uploaded_when_closed(tmp_path: Path) -> None:
    """Opened for writing before the watch existed, closed after: the lease is refused (a writer
    holds it), and the close that follows is reported by the watch made meanwhile."""
    with running(config(tmp_path, settle=SETTLE_LONG)) as d:
        wait_for(lambda: ready(d), 30, what="ready")
        target = tmp_path / "up" / "late" / "deep" / "held.bin"
        os.makedirs(target.parent)
        with open(target, "wb") as f:
            f.write(b"first part ")
            f.flush()
            # the watcher has walked the new directories and found the file still open
            wait_for(lambda: d.ledger.get("up", "late/deep/held.bin") is not None, 10, what="the file queued")
            f.write(b"and the rest")
        wait_for(lambda: remote_bytes(tmp_path, "late/deep/held.bin") == b"first part and the rest", 10, 0.1,
                 "the content at its close, well before settle_seconds")


HOLDER = r'''
import sys
path = sys.argv[1]
f = open(path, "ab")
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "close":
        f.close()
        print("closed", flush=True)
        break
    f.write(cmd.encode())
    f.flush()
    print("wrote", flush=True)
sys.stdin.read()  # hold on until the test ends
'''


class Holder:
    """Another process that keeps the file open for writing and appends on command."""

    def __init__(self, path: Path) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)

    def send(self, cmd: str) -> None:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        assert self.p.stdout.readline().strip() in ("wrote", "closed")

    def end(self) -> None:
        if self.p.poll() is None:
            self.p.stdin.close()
            self.p.wait(10)
        self.p.stdout.close()


def test_a_file_another_process_keeps_open_for_writing_ends_with_its_final_content(tmp_path: Path) -> None:
    with running(config(tmp_path)) as d:
        wait_for(lambda: ready(d), 30, what="ready")
        path = tmp_path / "up" / "shared.bin"
        holder = Holder(path)
        try:
            holder.send("first-")
            with open(path, "ab") as f:  # a second writer closes: the file is uploaded as it is now
                f.write(b"second-")
            wait_for(lambda: remote_bytes(tmp_path, "shared.bin") == b"first-second-", 60,
                     what="the content at the second writer's close")
            for i in range(5):  # the first writer goes on: not whole yet, nothing closed it
                holder.send(f"more{i}-")
            holder.send("close")
            wait_for(lambda: remote_bytes(tmp_path, "shared.bin") == b"first-second-more0-more1-more2-more3-more4-",
                     60, what="the final content once the holder closed it")
            wait_for(lambda: d.ledger.get("up", "shared.bin")["state"] == "synced", 30, what="synced")
        finally:
            holder.end()


def test_a_writer_that_never_closes_is_still_uploaded_after_settling(tmp_path: Path) -> None:
    """The close of another descriptor must not make the open writer's later writes stick at the
    closed content: they settle and are uploaded as before (settle covers writers that never close)."""
    with running(config(tmp_path, settle=0.5)) as d:
        wait_for(lambda: ready(d), 30, what="ready")
        path = tmp_path / "up" / "open.log"
        holder = Holder(path)
        try:
            holder.send("a-")
            with open(path, "ab") as f:
                f.write(b"b-")
            holder.send("c-")  # and the holder keeps it open to the end
            wait_for(lambda: remote_bytes(tmp_path, "open.log") == b"a-b-c-", 60, what="the settled content")
        finally:
            holder.end()


def test_a_closed_file_written_again_afterwards_waits_for_settle(tmp_path: Path) -> None:
    """The worker's side alone: a close recorded at one content does not let a later content
    (a descriptor still open) skip settle_seconds."""
    from syncd.engine import Engine
    from syncd.ledger import Ledger
    from syncd.scanner import Scanner

    cfg = load_config(config(tmp_path))
    (tmp_path / "up").mkdir()
    ledger = Ledger(cfg.ledger)
    try:
        engine = Engine(cfg, ledger, LocalRemote(tmp_path / "remote"), oneshot=False)
        engine.prepare()
        w = cfg.watches[0]
        path = tmp_path / "up" / "a.bin"
        path.write_bytes(b"closed content")
        st = path.stat()
        Scanner(ledger, w, "", settle=cfg.settle_seconds).run()

        def attempt() -> None:
            for row in ledger.claim(("put",), time.time() + NEVER * 2):
                engine.transfers.handle(row)

        attempt()  # no close recorded: it waits for settle_seconds
        assert remote_bytes(tmp_path, "a.bin") is None
        engine.closes.record("up", "a.bin", st.st_size, st.st_mtime_ns)
        wait_for(lambda: time.time() > st.st_mtime_ns / 1e9 + 0.05, 5, what="the mtime's tick to pass")
        attempt()
        assert remote_bytes(tmp_path, "a.bin") == b"closed content"
        with open(path, "ab") as f:  # another descriptor writes on; nothing closed it
            f.write(b" and more")
        Scanner(ledger, w, "", settle=cfg.settle_seconds).run()
        attempt()
        assert remote_bytes(tmp_path, "a.bin") == b"closed content"
        row = ledger.get("up", "a.bin")
        assert row["state"] == "pending" and row["due_at"] > time.time() + NEVER / 2
    finally:
        ledger.close()


# --- lazy_restore --------------------------------------------------------------------------------

@pytest.fixture
def slow_remote(monkeypatch: pytest.MonkeyPatch):
    """Restores from the file remote block until `gate` is set; `let_through` keys pass at once."""
    gate = threading.Event()
    let_through: set[str] = set()
    real_get = LocalRemote.get

    def get(self, key, dest):
        if key not in let_through:
            gate.wait(60)
        return real_get(self, key, dest)

    monkeypatch.setattr(LocalRemote, "get", get)
    yield gate, let_through
    gate.set()


def test_lazy_restore_is_ready_before_the_restore_finishes_and_the_restore_completes(
        tmp_path: Path, slow_remote) -> None:
    gate, let_through = slow_remote
    files = {f"p/{i:02d}.jpg": os.urandom(100 + i) for i in range(30)}
    for rel, data in files.items():  # as an earlier container left them: this host has nothing
        write_file(tmp_path / "remote" / "up" / rel, data)
    first = "p/29.jpg"  # last in the queue's order
    let_through.add(f"up/{first}")
    with running(config(tmp_path, lazy_restore=True)) as d:
        wait_for(lambda: ready(d), 30, what="READY while the restores are held back")
        ok, reason = d.health()
        assert ok and reason.startswith("ok (restoring "), reason
        assert d.lazy is not None and d.lazy.remaining() >= 29
        # an on-demand request goes first, ahead of everything queued
        assert restore_now(d.engine, "up", first) == RESTORED
        assert (tmp_path / "up" / first).read_bytes() == files[first]
        assert restore_now(d.engine, "up", first) == PRESENT
        assert d.ledger.get("up", first)["state"] == "synced"
        # the app writes meanwhile: its uploads do not wait behind the restore
        (tmp_path / "up" / "new.txt").write_bytes(b"new")
        wait_for(lambda: remote_bytes(tmp_path, "new.txt") == b"new", 60, what="an upload during the restore")
        assert d.lazy.remaining() >= 28
        gate.set()
        wait_for(lambda: all((tmp_path / "up" / rel).exists() for rel in files), 60, what="the restore to finish")
        for rel, data in files.items():
            assert (tmp_path / "up" / rel).read_bytes() == data
        wait_for(lambda: d.health() == (True, "ok"), 30, what="plain ok once restored")
        # counted once the file is at its name and the row let go: a moment after it appears
        wait_for(lambda: d.engine.stats.restored == 30, 10, what="30 restores counted")


def test_lazy_restore_serves_every_requested_file_while_the_queue_is_held_back(tmp_path: Path, slow_remote) -> None:
    """With serve_files, a file requested during the lazy restore is served (restored ahead of
    the queue), even one a restore worker has claimed in its batch but not started."""
    gate, let_through = slow_remote
    files = {f"p/{i:02d}.jpg": os.urandom(100 + i) for i in range(30)}
    for rel, data in files.items():
        write_file(tmp_path / "remote" / "up" / rel, data)
    wanted = ["p/03.jpg", "p/20.jpg", "p/29.jpg"]  # behind held-back rows in the workers' batches
    let_through.update(f"up/{rel}" for rel in wanted)
    port = free_port()
    with running(config(tmp_path, lazy_restore=True, serve_files=True, workers=2,
                        health_listen=f"127.0.0.1:{port}")) as d:
        wait_for(lambda: ready(d), 30, what="READY while the restores are held back")
        for rel in wanted:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/files/up/{rel}", timeout=60) as r:
                assert r.status == 200 and r.read() == files[rel]
        assert d.lazy is not None and d.lazy.remaining() >= 30 - len(wanted)
        gate.set()
        wait_for(lambda: all((tmp_path / "up" / rel).exists() for rel in files), 60, what="the restore to finish")
        assert all((tmp_path / "up" / rel).read_bytes() == data for rel, data in files.items())
