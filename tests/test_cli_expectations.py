"""What users of rclone / aws-cli expect from the command line, and logs an operator can use
(issue 14, findings 13-18; SPEC §3, §4.6, §6)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import sqlite3
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, wait_for, write_config
from tests.daemon_util import DaemonProc, write_file


def file_env(tmp_path: Path, **syncd_opts) -> tuple[Path, Path, Path]:
    """A config with a file:// remote: (config, watch root, remote root)."""
    root, remote = tmp_path / "uploads", tmp_path / "remote"
    root.mkdir()
    opts = {"ledger": str(tmp_path / "state" / "ledger.db"), "settle_seconds": 0, "workers": 2,
            "health_listen": ""}
    opts.update(syncd_opts)
    cfg = write_config(tmp_path / "syncd.toml", remote={"url": f"file://{remote}"},
                       watches=[{"path": str(root), "prefix": "uploads"}], syncd=opts)
    return cfg, root, remote


def run_syncd(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "syncd", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, **kw)


# --- 13: the progress bar --------------------------------------------------------------------


def run_in_terminal(args: list[str], env: dict[str, str], timeout: float = 120) -> tuple[int, str]:
    """Run with stdin and stderr on a pseudo-terminal (stdout too): (exit code, all output)."""
    master, slave = pty.openpty()
    # 24 rows x 120 columns: a new pty is 0 x 0, where tqdm draws a bar of no width
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


def test_resync_progress_bar_advances_in_a_terminal_and_logs_print_above_it(tmp_path):
    cfg, root, _remote = file_env(tmp_path)
    for i in range(5):
        write_file(root / f"f{i}.txt", b"x" * (i + 1))
    # every update redrawn (tqdm's default redraws at most every 0.1 s: 5 files finish sooner)
    env = {**os.environ, "TQDM_MININTERVAL": "0"}
    code, out = run_in_terminal([sys.executable, "-m", "syncd", "--config", str(cfg), "-v", "resync"], env)
    assert code == 0, out
    assert "uploaded 5, restored 0" in out
    counts = [int(n) for n in re.findall(r"\b(\d)/5\b", out)]
    assert counts and max(counts) == 5, out  # the bar counted up to the total
    assert any(0 < n < 5 for n in counts) or counts.count(5) >= 1
    # -v logs a line per upload while the bar shows: each log line stands alone, never glued to
    # the bar's text (tqdm's logging redirect clears the bar, prints the line, redraws the bar)
    segments = re.split(r"[\r\n]+", out)
    log_lines = [s for s in segments if "DEBUG syncd.transfers: uploaded" in s]
    assert len(log_lines) == 5, out
    for s in log_lines:
        assert "file/s" not in s and "%|" not in s and not re.search(r"\d/5\b", s.split("uploaded")[0]), s


def test_no_progress_leaves_a_terminal_without_a_bar_for_resync_and_restore(tmp_path):
    """SPEC §3: a progress bar on a terminal, not with `-q` or `--no-progress`."""
    cfg, root, _remote = file_env(tmp_path)
    for i in range(5):
        write_file(root / f"f{i}.txt", b"x" * (i + 1))
    env = {**os.environ, "TQDM_MININTERVAL": "0"}
    code, out = run_in_terminal([sys.executable, "-m", "syncd", "--config", str(cfg), "resync", "--no-progress"],
                                env)
    assert code == 0 and "uploaded 5, restored 0" in out, out
    assert not re.search(r"\b\d/5\b", out) and "file/s" not in out, out
    for i in range(5):
        (root / f"f{i}.txt").unlink()
    code, out = run_in_terminal([sys.executable, "-m", "syncd", "--config", str(cfg), "restore", "--no-progress"],
                                env)
    assert code == 0 and "restored 5" in out, out
    assert not re.search(r"\b\d/5\b", out) and "file/s" not in out, out
    code, out = run_in_terminal([sys.executable, "-m", "syncd", "--config", str(cfg), "restore", "--overwrite"],
                                env)
    assert code == 0 and "file/s" in out, out  # without the flag the bar shows


# --- 14: dry runs name every file; -v logs every transfer ----------------------------------


def plan_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if re.match(r"^(upload|restore|delete) ", ln)]


def test_resync_dry_run_names_every_file_then_the_summary(tmp_path, syncd):
    cfg, root, _remote = file_env(tmp_path)
    for name in ("sub/a.txt", "b.txt", "gone.txt", "keep.txt"):
        write_file(root / name, name.encode())
    assert syncd("--config", str(cfg), "resync").code == 0
    (root / "sub/a.txt").unlink()  # missing locally: restored
    write_file(root / "c.txt", b"new")  # new: uploaded
    write_file(root / "b.txt", b"changed!")  # changed: uploaded
    (root / "gone.txt").unlink()  # a deletion a stopped daemon queued: sent by the next drain
    con = sqlite3.connect(tmp_path / "state" / "ledger.db")
    with con:
        con.execute("UPDATE files SET state='deleting', op='delete' WHERE path='gone.txt'")
    con.close()
    r = syncd("--config", str(cfg), "resync", "--dry-run")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert sorted(plan_lines(r.out)) == ["delete uploads/gone.txt", "restore uploads/sub/a.txt",
                                         "upload uploads/b.txt", "upload uploads/c.txt"]
    assert lines[-1] == "dry run: would upload 2, would restore 1, would delete 1, unchanged 1, failed 0"
    # --no-upload: nothing would be uploaded or deleted, so nothing of that is named
    r = syncd("--config", str(cfg), "resync", "--dry-run", "--no-upload")
    assert plan_lines(r.out) == ["restore uploads/sub/a.txt"]
    assert "would upload 0, would restore 1," in r.out


def test_verify_dry_run_names_the_objects_it_would_upload_again(tmp_path, syncd):
    cfg, root, remote = file_env(tmp_path)
    for name in ("a.txt", "b.txt"):
        write_file(root / name, name.encode())
    assert syncd("--config", str(cfg), "resync").code == 0
    (remote / "uploads/b.txt").unlink()  # the object is gone; the ledger still says synced
    r = syncd("--config", str(cfg), "resync", "--dry-run", "--verify")
    assert r.code == 0, r.err
    assert plan_lines(r.out) == ["upload uploads/b.txt"]
    assert "would upload 1," in r.out


def test_dry_run_of_a_lost_ledger_names_what_the_listing_restores(tmp_path, syncd):
    cfg, root, _remote = file_env(tmp_path)
    for i in range(3):
        write_file(root / f"d/{i}.bin", b"%d" % i)
    assert syncd("--config", str(cfg), "resync").code == 0
    (tmp_path / "state" / "ledger.db").unlink()
    (root / "d/1.bin").unlink()
    r = syncd("--config", str(cfg), "resync", "--dry-run")
    assert r.code == 0, r.err
    assert "restore uploads/d/1.bin" in plan_lines(r.out)
    assert r.out.splitlines()[-1].startswith("dry run:")


def test_a_dry_run_creates_no_ledger_and_no_lock_file_and_leaves_one_unchanged(tmp_path, syncd):
    """Issue 25: `resync --dry-run` on a new host left an empty ledger and lock file behind."""
    cfg, root, remote = file_env(tmp_path)
    write_file(root / "a.txt", b"a")
    write_file(remote / "uploads" / "r.txt", b"r")
    state = tmp_path / "state"
    for args in (["resync", "--dry-run"], ["restore", "--dry-run"]):
        r = syncd("--config", str(cfg), *args)
        assert r.code == 0, r.err
        assert "restore uploads/r.txt" in plan_lines(r.out), r.out
        assert not state.exists(), sorted(p.name for p in state.iterdir())
    assert syncd("--config", str(cfg), "resync", "--no-restore").code == 0
    write_file(root / "b.txt", b"b")
    # an existing ledger is only read (SQLite's read-only open may leave its -wal/-shm index)
    before = {p.name: p.read_bytes() for p in state.iterdir() if not p.name.endswith(("-wal", "-shm"))}
    for args in (["resync", "--dry-run"], ["restore", "--dry-run"]):
        r = syncd("--config", str(cfg), *args)
        assert r.code == 0, r.err
        assert "restore uploads/r.txt" in plan_lines(r.out), r.out
        assert {p.name: p.read_bytes() for p in state.iterdir() if not p.name.endswith(("-wal", "-shm"))} == before
    assert "upload uploads/b.txt" in plan_lines(syncd("--config", str(cfg), "resync", "--dry-run").out)


def test_a_dry_run_reads_a_ledger_an_older_syncd_wrote_without_migrating_it(tmp_path, syncd):
    import sqlite_utils

    from syncd.ledger import MIGRATIONS

    cfg, root, remote = file_env(tmp_path)
    write_file(remote / "uploads" / "r.txt", b"r")
    (tmp_path / "state").mkdir()
    db = sqlite_utils.Database(tmp_path / "state" / "ledger.db")
    for i, migrate in enumerate(MIGRATIONS[:-1]):
        migrate(db)
        db.execute(f"PRAGMA user_version={i + 1}")
    db.close()
    r = syncd("--config", str(cfg), "resync", "--dry-run")
    assert r.code == 0, r.err
    assert "restore uploads/r.txt" in plan_lines(r.out), r.out
    con = sqlite3.connect(tmp_path / "state" / "ledger.db")
    assert con.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) - 1
    con.close()


def test_restore_dry_runs_name_every_file(tmp_path, syncd):
    cfg, root, _remote = file_env(tmp_path)
    for name in ("p/one.jpg", "p/two.png", "three.jpg"):
        write_file(root / name, name.encode())
    assert syncd("--config", str(cfg), "resync").code == 0
    (root / "p/one.jpg").unlink()
    (root / "three.jpg").unlink()
    r = syncd("--config", str(cfg), "restore", "--dry-run", "*.jpg")
    assert r.code == 0, r.err
    assert sorted(plan_lines(r.out)) == ["restore uploads/p/one.jpg", "restore uploads/three.jpg"]
    assert r.out.splitlines()[-1] == "dry run: would restore 2, skipped 0, failed 0"
    r = syncd("--config", str(cfg), "restore", "--dry-run", "--to", str(tmp_path / "copy"))
    assert r.code == 0, r.err
    assert sorted(plan_lines(r.out)) == ["restore uploads/p/one.jpg", "restore uploads/p/two.png",
                                         "restore uploads/three.jpg"]
    assert not (tmp_path / "copy").exists()


def test_verbose_logs_every_transfer(tmp_path, syncd):
    cfg, root, _remote = file_env(tmp_path)
    for i in range(4):
        write_file(root / f"f{i}.txt", b"x")
    r = syncd("--config", str(cfg), "resync", "-v")
    assert r.code == 0, r.err
    assert sorted(re.findall(r"uploaded (uploads/f\d\.txt)", r.err)) == [f"uploads/f{i}.txt" for i in range(4)]
    for i in (0, 2):
        (root / f"f{i}.txt").unlink()
    r = syncd("--config", str(cfg), "resync", "-v")
    assert sorted(re.findall(r"restored (uploads/f\d\.txt)", r.err)) == ["uploads/f0.txt", "uploads/f2.txt"]
    # without -v (log_level info) a transfer is not a log line
    (root / "f1.txt").write_bytes(b"changed")
    r = syncd("--config", str(cfg), "resync")
    assert r.code == 0 and "uploaded 1" in r.out and "uploads/f1.txt" not in r.err


# --- 15: global options after the command ----------------------------------------------------


def test_global_options_are_accepted_after_the_command(tmp_path, syncd):
    cfg, root, _remote = file_env(tmp_path)
    write_file(root / "a.txt", b"a")
    r = syncd("resync", "--config", str(cfg), "-v")
    assert r.code == 0, r.err
    assert "uploaded 1" in r.out and "DEBUG" in r.err
    r = syncd("status", "--config", str(cfg))
    assert r.code == 0, r.err
    assert "synced" in r.out
    r = syncd("resync", "-q", "--config", str(cfg))
    assert r.code == 0 and r.err == ""
    # before the command still works, and the command's own options mix with them
    write_file(root / "b.txt", b"b")
    r = syncd("--config", str(cfg), "resync", "--dry-run", "-q")
    assert r.code == 0 and r.out == "upload uploads/b.txt\ndry run: would upload 1, would restore 0, unchanged 1, " \
                                    "failed 0\n" and r.err == ""
    assert "--config" in syncd("resync", "--help").out


# --- 16: once per cause; failure metrics -------------------------------------------------------


def test_a_local_error_is_logged_once_for_many_files(tmp_path):
    """Six restores that hit a full disk (RLIMIT_FSIZE here) are one cause: one warning,
    not six, though each message names its own file."""
    import resource

    cfg, root, remote = file_env(tmp_path)
    for i in range(6):
        write_file(root / f"d{i}/big{i}.bin", os.urandom(1024 * 1024))
    assert run_syncd("--config", str(cfg), "resync").returncode == 0
    for i in range(6):
        (root / f"d{i}/big{i}.bin").unlink()

    def small_files() -> None:  # the ledger stays far below the limit; 1 MiB restores exceed it
        resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, 512 * 1024))

    r = run_syncd("--config", str(cfg), "resync", preexec_fn=small_files)
    assert r.returncode == 1, r.stderr
    assert r.stdout.strip().endswith("failed 6")
    warnings = [ln for ln in r.stderr.splitlines() if " WARNING " in ln and "File too large" in ln]
    assert len(warnings) == 1, r.stderr


def test_cause_groups_ignore_the_path_but_keep_other_words():
    from syncd.logs import generic_cause

    a = generic_cause("OSError: cannot write /srv/up/d1/a.bin: No space left on device",
                      ["backups/uploads/d1/a.bin", "d1/a.bin", "/srv/up/d1/a.bin", "/srv/up/d1"])
    b = generic_cause("OSError: cannot write in /srv/up/d2: No space left on device",
                      ["backups/uploads/d2/b.bin", "d2/b.bin", "/srv/up/d2/b.bin", "/srv/up/d2"])
    assert a == "OSError: cannot write …: No space left on device"
    assert b == "OSError: cannot write in …: No space left on device"
    c = generic_cause("NoSuchKey: get backups/uploads/x.txt: not found", ["backups/uploads/x.txt", "x.txt"])
    d = generic_cause("NoSuchKey: get backups/uploads/y.txt: not found", ["backups/uploads/y.txt", "y.txt"])
    assert c == d == "NoSuchKey: get …: not found"
    # a short path does not eat letters of the message
    assert generic_cause("ENOSPC: No space left: a", ["a"]) == "ENOSPC: No space left: …"


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {s.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}": s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.mark.skipif(sys.platform != "linux", reason="a name that is not UTF-8 needs a Linux file system")
def test_failure_reasons_are_exported_at_zero_and_refused_names_counted(tmp_path):
    port = free_port()
    cfg, root, _remote = file_env(tmp_path, health_listen=f"127.0.0.1:{port}", settle_seconds=0.2)
    d = DaemonProc(cfg, tmp_path / "state" / "ledger.db", tmp_path / "d.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        d.wait_ready()
        m = wait_for(lambda: scrape(url), 30, what="metrics")
        for reason in ("transient", "unreachable", "denied", "credentials", "no_bucket", "not_found",
                       "integrity", "local", "name", "unsafe_key"):
            assert m[f"syncd_failures_total{{reason={reason}}}"] == 0, m
        with open(os.path.join(os.fsencode(root), b"bad-\xff.txt"), "wb") as f:  # not UTF-8: refused
            f.write(b"x")
        wait_for(lambda: scrape(url)["syncd_failures_total{reason=name}"] == 1, 30, what="refused name counted")
    finally:
        assert d.stop() == 0, d.log()


def test_a_refused_remote_key_is_counted():
    from syncd import refusals
    from syncd.config import WatchConfig
    from syncd.engine import remote_files
    from syncd.remote.base import ObjectInfo

    class Listing:
        def list(self, prefix: str):
            yield ObjectInfo(key="b/uploads/ok.txt", size=1)
            yield ObjectInfo(key="b/uploads/../../etc/passwd", size=1)

    watch = WatchConfig(path=Path("/srv/uploads"), prefix="uploads")
    before = refusals.counts().get(refusals.UNSAFE_KEY, 0)
    refused: list = []
    assert [rel for rel, _o in remote_files(Listing(), "b/uploads", watch, (), refused)] == ["ok.txt"]
    assert len(refused) == 1
    assert refusals.counts()[refusals.UNSAFE_KEY] == before + 1


# --- 17: watchdog's warning -------------------------------------------------------------------


def test_a_burst_of_new_directories_writes_no_raw_warning(tmp_path):
    cfg, root, _remote = file_env(tmp_path)
    d = DaemonProc(cfg, tmp_path / "state" / "ledger.db", tmp_path / "d.log").start()
    try:
        d.wait_ready()
        n = 300
        for i in range(n):
            os.makedirs(root / f"d{i}/a/b/c/d")
            (root / f"d{i}/a/b/f.txt").write_bytes(b"x")
        wait_for(lambda: d.states().get("synced", 0) == n, 60, 0.2, "every file of the burst synced")
    finally:
        assert d.stop() == 0, d.log()
    log = d.log()
    assert "RuntimeWarning" not in log and "already exists" not in log, log[:2000]


def test_other_python_warnings_become_log_lines(capsys):
    import logging
    import warnings

    from syncd import logs

    try:
        logging.captureWarnings(False)  # pytest restored `showwarning` after an earlier setup
        logs.setup("info", "text")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("something odd", RuntimeWarning, stacklevel=1)
        err = capsys.readouterr().err
        assert re.search(r"^\S+ \S+ WARNING py\.warnings: .*RuntimeWarning: something odd", err, re.M), err
    finally:
        logging.captureWarnings(False)


# --- 18: journald priorities -----------------------------------------------------------------


def journal_run(tmp_path: Path, name: str, *args: str, match: bool = True) -> list[str]:
    """Run syncd with stderr in a file and JOURNAL_STREAM naming that file (as systemd does when
    stderr is the journal): the lines written to it."""
    path = tmp_path / f"{name}.stderr"
    with open(path, "wb") as f:
        st = os.fstat(f.fileno())
        stream = f"{st.st_dev}:{st.st_ino}" if match else f"{st.st_dev}:{st.st_ino + 1}"
        subprocess.run([sys.executable, "-m", "syncd", *args], stdout=subprocess.DEVNULL, stderr=f, timeout=120,
                       env={**os.environ, "JOURNAL_STREAM": stream})
    return path.read_text(errors="replace").splitlines()


@pytest.mark.skipif(sys.platform != "linux", reason="journald")
def test_lines_carry_journald_priorities_when_stderr_is_the_journal(tmp_path):
    cfg, root, _remote = file_env(tmp_path)
    write_file(root / "a.txt", b"a")
    with open(os.path.join(os.fsencode(root), b"bad-\xff.txt"), "wb") as f:
        f.write(b"x")  # a warning (cannot sync) and a failure line
    lines = journal_run(tmp_path, "resync", "--config", str(cfg), "-v", "resync")
    assert lines and all(re.match(r"^<[3467]>", ln) for ln in lines), lines
    assert any(ln.startswith("<7>") and "DEBUG" in ln for ln in lines), lines
    assert any(ln.startswith("<6>") and " INFO " in ln for ln in lines), lines
    assert any(ln.startswith("<4>") and "WARNING" in ln and "cannot sync" in ln for ln in lines), lines
    assert any(ln.startswith("<3>failed: ") for ln in lines), lines
    lines = journal_run(tmp_path, "error", "--config", str(tmp_path / "missing.toml"), "status")
    assert lines and lines[0].startswith("<3>syncd: error: "), lines
    # stderr redirected elsewhere (JOURNAL_STREAM inherited but not this file): plain lines
    lines = journal_run(tmp_path, "plain", "--config", str(cfg), "resync", match=False)
    assert lines and not any(ln.startswith("<") for ln in lines), lines
