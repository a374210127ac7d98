"""When syncd's own parts fail (issue 14: 1, 2, 3, 6, 10, 12, 20; SPEC §3, §4.10, §4.11).

Real conditions, not mocks: a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) fills the ledger's
"disk"; permissions are tested as `nobody` (root has CAP_DAC_OVERRIDE); signals go to real
`syncd` subprocesses; the stalled endpoint is a socket that accepts and never answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest

from tests.conftest import _new_bucket, free_port, wait_for, write_config
from tests.daemon_util import DaemonProc, http_get

REPO = Path(__file__).resolve().parent.parent


def syncd_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "syncd", "--config", str(config), *args]


def limit_file_size(nbytes: int) -> Callable[[], None]:
    """preexec_fn: files this process writes stop growing at `nbytes` (a full disk for the
    ledger); SIGXFSZ ignored, so the write fails with an error instead of killing it."""

    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.RLIM_INFINITY))

    return pre


def without_dac(cmd: list[str]) -> list[str]:
    """`cmd` without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH: root then meets permission bits
    like anyone else on files it does not own (files handed to `nobody` below)."""
    if os.geteuid() != 0:
        return cmd
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is needed to drop CAP_DAC_OVERRIDE")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]


def give_to_nobody(*paths: Path) -> None:
    """Owned by nobody: writable only through its permission bits for the `without_dac` process."""
    if os.geteuid() == 0:
        for p in paths:
            os.chown(p, 65534, 65534, follow_symlinks=False)


def run(cmd: list[str], *, preexec: Callable[[], None] | None = None, timeout: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec,
                          cwd=REPO, env={**os.environ, **(env or {})})


def states(ledger: Path) -> dict[str, int]:
    con = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT state, count(*) FROM files GROUP BY state").fetchall())
    finally:
        con.close()


def leased(ledger: Path) -> int:
    con = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        return con.execute("SELECT count(*) FROM files WHERE lease_until IS NOT NULL").fetchone()[0]
    finally:
        con.close()


def one_line_error(stderr: str) -> str:
    """The command's error: exactly one `syncd:` line and no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [ln for ln in stderr.splitlines() if ln.startswith("syncd:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def file_env(base: Path, n: int, **syncd_opts) -> tuple[Path, Path, Path]:
    """A watch of `n` small files, a file:// remote; returns (config, ledger, watch root)."""
    root = base / "up"
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"d{i % 10}").mkdir(exist_ok=True)
        (root / f"d{i % 10}" / f"f{i}.txt").write_text(f"file {i}\n")
    ledger = base / "state" / "ledger.db"
    opts = {"ledger": str(ledger), "settle_seconds": 0, "workers": 4, "health_listen": "", **syncd_opts}
    cfg = write_config(base / "syncd.toml", remote={"url": f"file://{base / 'remote'}"},
                       watches=[{"path": str(root), "prefix": "up"}], syncd=opts)
    return cfg, ledger, root


# --- finding 1: the ledger's disk fills during resync --------------------------------------------

def test_ledger_disk_full_during_resync_workers_stops_with_one_line_exit_2_no_row_uploading(tmp_path):
    cfg, ledger, _ = file_env(tmp_path, 600)
    # queue the uploads first (no limit), so that the limit is met by the workers' writes
    r = run(syncd_cmd(cfg, "resync", "--no-upload"))
    assert r.returncode == 0, r.stderr
    assert states(ledger) == {"pending": 600}
    size = ledger.stat().st_size
    # the WAL can grow to about the ledger's size: a few dozen commits, far fewer than 600 files
    # (256 KB: with 64 KB the start's own writes filled it before any worker's result, at times)
    r = run(syncd_cmd(cfg, "resync"), preexec=limit_file_size(size + 256_001))
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr[-3000:])
    line = one_line_error(r.stderr)
    assert f"ledger {ledger} cannot be written" in line and "corrupt" not in line
    assert "uploaded" not in r.stdout  # never a success summary
    got = states(ledger)
    left = got.get("pending", 0) + got.get("uploading", 0)
    assert got.get("synced", 0) > 0 and left > 0, got  # it failed in the workers
    # the claimed rows are given back when the ledger takes that write; when even that does not
    # fit (how full the WAL was when the limit hit depends on the timing of the workers), the
    # next start's recovery releases them, below
    if "uploading" in got or leased(ledger):
        assert "cannot be written" in r.stderr, got
    # with the space back, the next run finishes the work
    r = run(syncd_cmd(cfg, "resync"))
    assert r.returncode == 0, r.stderr
    assert states(ledger) == {"synced": 600}


def test_rows_left_uploading_by_a_stopped_resync_are_pending_in_status_and_given_back(tmp_path, syncd):
    """Issue 25: after the ledger's disk filled mid-resync, `status` said "uploading 104" with no
    daemon running. Rows only a process holding the lock can be uploading: without one they
    are pending, and the next command that takes the lock gives them back."""
    from syncd.lock import LedgerLock

    cfg, ledger, _ = file_env(tmp_path, 10)
    assert run(syncd_cmd(cfg, "resync", "--no-upload")).returncode == 0
    con = sqlite3.connect(ledger)
    with con:  # what the failed resync left: claimed rows it could not give back
        con.execute("UPDATE files SET state='uploading', lease_until=9e9 WHERE id IN "
                    "(SELECT id FROM files ORDER BY id LIMIT 4)")
    con.close()
    counts = json.loads(syncd("--config", str(cfg), "status", "--json").out)["watches"][0]["counts"]
    assert (counts["uploading"], counts["pending"]) == (0, 10), counts
    assert "pending 10, uploading 0" in syncd("--config", str(cfg), "status").out
    lock = LedgerLock(ledger)
    lock.acquire("resync")  # a process that holds the lock may well be uploading them
    try:
        counts = json.loads(syncd("--config", str(cfg), "status", "--json").out)["watches"][0]["counts"]
        assert (counts["uploading"], counts["pending"]) == (4, 6), counts
    finally:
        lock.release()
    assert syncd("--config", str(cfg), "restore").code == 0  # takes the lock: gives them back
    assert states(ledger) == {"pending": 10} and leased(ledger) == 0


# --- finding 2: only SQLite's "malformed" is corruption --------------------------------------------

def test_full_disk_at_start_is_reported_as_unwritable_not_corrupt(tmp_path):
    cfg, ledger, _ = file_env(tmp_path, 3)
    r = run(syncd_cmd(cfg, "resync"), preexec=limit_file_size(3000))
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    line = one_line_error(r.stderr)
    assert f"ledger {ledger} cannot be" in line
    assert "corrupt" not in line and "mv " not in line


def test_read_only_ledger_directory_is_reported_as_unwritable_not_corrupt(tmp_path):
    cfg, ledger, _ = file_env(tmp_path, 3)
    assert run(syncd_cmd(cfg, "resync")).returncode == 0
    # the lock file is writable, the ledger's directory is not: SQLite cannot make its -wal/-shm
    state = ledger.parent
    give_to_nobody(state, ledger)
    state.chmod(0o755)
    ledger.chmod(0o644)
    ledger.with_name("ledger.db.lock").chmod(0o666)
    r = run(without_dac(syncd_cmd(cfg, "resync")))
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    line = one_line_error(r.stderr)
    assert f"ledger {ledger} cannot be" in line and "not writable" in line
    assert "corrupt" not in line and "mv " not in line


def test_a_watch_that_cannot_be_created_is_one_line_exit_2_not_an_internal_error(tmp_path):
    """Issue 23: under the hardened unit (ProtectSystem=strict) a missing watch cannot be
    created; `run` said "internal error: OSError" and exit 1, restarted every 5 s. It is a
    setup error: one line naming the watch and what to do, exit 2 (not restarted)."""
    cfg, ledger, _ = file_env(tmp_path, 1)
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    give_to_nobody(ro)
    ro.chmod(0o555)
    watch = ro / "app" / "uploads"
    cfg.write_text(cfg.read_text().replace(f'"{tmp_path / "up"}"', f'"{watch}"'))
    r = run(without_dac(syncd_cmd(cfg, "run")))
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    line = one_line_error(r.stderr)
    assert "internal error" not in line, line
    assert f"{watch}" in line and "cannot be created" in line and "Permission denied" in line, line


# --- finding 3: the lock file -----------------------------------------------------------------------

def test_lock_file_that_cannot_be_created_is_one_line_exit_2(tmp_path):
    cfg, ledger, _ = file_env(tmp_path, 1)
    ledger.parent.mkdir(mode=0o755)
    give_to_nobody(ledger.parent)  # not ours to write in: the lock file cannot be created
    r = run(without_dac(syncd_cmd(cfg, "resync")))
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    line = one_line_error(r.stderr)
    assert "internal error" not in line
    assert f"{ledger}.lock" in line and "Permission denied" in line


def test_a_read_only_lock_file_in_a_writable_directory_is_named_not_the_directory(tmp_path):
    """Issue 25: a lock file left 0444 (or another user's) got "make the directory writable"
    although the directory was: the line names the lock file."""
    cfg, ledger, _ = file_env(tmp_path, 1)
    assert run(syncd_cmd(cfg, "resync")).returncode == 0
    lock = ledger.with_name("ledger.db.lock")
    give_to_nobody(lock)
    lock.chmod(0o444)
    r = run(without_dac(syncd_cmd(cfg, "resync")))
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    line = one_line_error(r.stderr)
    assert f"{lock} is not writable" in line, line
    assert f"make {ledger.parent} writable" not in line, line


def test_a_user_who_may_only_read_the_ledger_can_run_status(tmp_path):
    cfg, ledger, _ = file_env(tmp_path, 4)
    assert run(syncd_cmd(cfg, "resync")).returncode == 0
    files = [ledger.parent, *ledger.parent.iterdir()]
    give_to_nobody(*files)
    for p in files:
        p.chmod(0o755 if p.is_dir() else 0o644)  # readable by all, writable by its owner only
    r = run(without_dac(syncd_cmd(cfg, "status", "--json")))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["watches"][0]["counts"]["synced"] == 4
    assert not data["daemon"]["running"]
    # while another process holds the lock (a daemon), that is seen through a read-only open
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from syncd.lock import LedgerLock; LedgerLock(Path(sys.argv[1])).acquire('run'); "
                               "print('held', flush=True); time.sleep(60)", str(ledger)],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        r = run(without_dac(syncd_cmd(cfg, "status", "--json")))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["daemon"]["running"] is True
        assert json.loads(r.stdout)["daemon"]["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


# --- finding 6: a clean stop for one-shot commands ------------------------------------------------

def s3_env(base: Path, endpoint: str, n: int) -> tuple[Path, Path, Path, object, str]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    bucket = _new_bucket(client)
    root = base / "up"
    for i in range(n):
        p = root / f"d{i % 20}" / f"f{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(2048))
    ledger = base / "ledger.db"
    cfg = write_config(base / "syncd.toml", remote={"url": f"s3://{bucket}/b", "endpoint_url": endpoint},
                       watches=[{"path": str(root), "prefix": "up"}],
                       syncd={"ledger": str(ledger), "settle_seconds": 0, "workers": 4, "health_listen": ""})
    return cfg, ledger, root, client, bucket


def synced(ledger: Path) -> int:
    try:
        return states(ledger).get("synced", 0)
    except sqlite3.Error:
        return 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_s3_resync_uploads_exits_130_and_leaves_no_row_uploading(tmp_path, moto_server, sig):
    cfg, ledger, _, _, _ = s3_env(tmp_path, moto_server, 500)
    proc = subprocess.Popen(syncd_cmd(cfg, "resync"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    wait_for(lambda: synced(ledger) >= 20 or proc.poll() is not None, 60, 0.01, "uploads under way")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (proc.returncode, out, err[-3000:])
    assert "Traceback" not in err and "interrupted" in err
    got = states(ledger)
    assert "uploading" not in got and leased(ledger) == 0, got
    assert got.get("pending", 0) > 0, got  # it was stopped, not finished
    r = run(syncd_cmd(cfg, "resync"))
    assert r.returncode == 0, r.stderr
    assert states(ledger) == {"synced": 500}


def test_sigterm_during_s3_restore_exits_130_and_leaves_no_restore_temp(tmp_path, moto_server):
    cfg, ledger, root, _, _ = s3_env(tmp_path, moto_server, 500)
    assert run(syncd_cmd(cfg, "resync")).returncode == 0
    shutil.rmtree(root)
    proc = subprocess.Popen(syncd_cmd(cfg, "resync"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    wait_for(lambda: proc.poll() is not None or (root.exists() and sum(1 for _ in root.rglob("f*.bin")) >= 20),
             60, 0.01, "restores under way")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (proc.returncode, out, err[-3000:])
    assert list(root.rglob(".syncd-restore-*")) == []
    assert leased(ledger) == 0
    assert sum(1 for _ in root.rglob("f*.bin")) < 500  # stopped, not finished
    assert run(syncd_cmd(cfg, "resync")).returncode == 0
    assert sum(1 for _ in root.rglob("f*.bin")) == 500


def test_a_restore_the_disk_cannot_hold_fails_as_a_local_write_naming_the_file(tmp_path, moto_server):
    """A file the disk cannot hold (RLIMIT_FSIZE stands in for a full disk) fails as a local
    write naming the file, not as a failure of the remote's GET, whatever its size; the other
    files are restored and no temp file stays."""
    cfg, _, root, _, _ = s3_env(tmp_path, moto_server, 3)
    (root / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    assert run(syncd_cmd(cfg, "resync")).returncode == 0
    shutil.rmtree(root)
    r = run(syncd_cmd(cfg, "resync"), preexec=limit_file_size(1024 * 1024))
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr[-3000:])
    assert f"cannot write {root / 'big.bin'}: File too large" in r.stderr, r.stderr[-3000:]
    assert "GetObject" not in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == ["f0.bin", "f1.bin", "f2.bin"]


# --- finding 10: a failing startup listing is visible ---------------------------------------------

class _ListingFails(BaseHTTPRequestHandler):
    """An S3-compatible store whose one-key probe works and whose full listing answers 500."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if "max-keys=1" in self.path.lower():
            code, body = 200, ('<?xml version="1.0" encoding="UTF-8"?><ListBucketResult '
                               'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>bk</Name><KeyCount>0'
                               '</KeyCount><MaxKeys>1</MaxKeys><IsTruncated>false</IsTruncated></ListBucketResult>')
        else:
            code, body = 500, ("<Error><Code>InternalError</Code><Message>We encountered an internal error. "
                               "Please try again.</Message></Error>")
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def daemon_env(base: Path, endpoint: str, bucket: str = "bk") -> tuple[Path, Path, str]:
    port = free_port()
    ledger = base / "l.db"
    (base / "up").mkdir(exist_ok=True)
    cfg = write_config(base / "s.toml", remote={"url": f"s3://{bucket}/b", "endpoint_url": endpoint},
                       watches=[{"path": str(base / "up"), "prefix": "up"}],
                       syncd={"ledger": str(ledger), "settle_seconds": 0.2, "workers": 2,
                              "health_listen": f"127.0.0.1:{port}", "rescan_interval": 0})
    return cfg, ledger, f"http://127.0.0.1:{port}"


def test_run_retrying_a_failing_startup_listing_says_why_in_log_healthz_and_status(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ListingFails)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cfg, ledger, url = daemon_env(tmp_path, f"http://127.0.0.1:{server.server_address[1]}")
    d = DaemonProc(cfg, ledger, tmp_path / "d.log").start()
    try:
        code, reason = wait_for(lambda: (r := http_get(url + "/healthz"))[0] == 503 and "listing" in r[1] and r,
                                60, 0.1, "/healthz says why")
        assert reason.startswith("starting: remote listing failing:") and "InternalError" in reason, reason
        wait_for(lambda: re.search(r"remote listing failing.*InternalError", d.log()), 30, 0.1, "a log line")
        r = run(syncd_cmd(cfg, "status", "--json"))
        assert r.returncode == 0, r.stderr
        daemon = json.loads(r.stdout)["daemon"]
        assert daemon["running"] and "InternalError" in daemon["remote_error"]["error"], daemon
        text = run(syncd_cmd(cfg, "status")).stdout
        assert "remote failing since" in text and "InternalError" in text, text
        assert d.alive()
    finally:
        assert d.stop() == 0, d.log()
        server.shutdown()
        server.server_close()


# --- finding 12: SIGTERM while the startup check hangs on a stalled endpoint -------------------------

@pytest.fixture
def stalled_endpoint() -> Iterator[tuple[str, list[socket.socket]]]:
    """An endpoint that accepts connections and never answers: (URL, connections so far)."""
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(stalled.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{stalled.getsockname()[1]}", held
    stalled.close()
    for c in held:
        c.close()


def test_sigterm_while_the_remote_check_hangs_on_a_stalled_endpoint_stops_within_10s(tmp_path, stalled_endpoint):
    endpoint, held = stalled_endpoint
    cfg, ledger, _ = daemon_env(tmp_path, endpoint)
    d = DaemonProc(cfg, ledger, tmp_path / "d.log").start()
    try:
        wait_for(lambda: held, 30, 0.05, "the remote check to connect")
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        try:
            code = d.proc.wait(timeout=10)  # SPEC §4.10
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM not honoured within 10 s: " + d.log()[-2000:])
        assert code == 0, d.log()
    finally:
        if d.alive():
            d.kill9()
        else:
            d.stop()


def test_sigterm_to_resync_hanging_on_a_stalled_endpoint_exits_130_within_10s(tmp_path, stalled_endpoint):
    endpoint, held = stalled_endpoint
    cfg, _, _ = daemon_env(tmp_path, endpoint)
    proc = subprocess.Popen(syncd_cmd(cfg, "resync"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    try:
        wait_for(lambda: held, 30, 0.05, "the remote check to connect")
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=10)  # SPEC §4.10
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM not honoured within 10 s")
        assert proc.returncode == 130, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- finding 20 (and 17's STATUS count): failed startup restores are counted ----------------------

def test_failed_startup_restores_are_counted_in_notify_status_healthz_and_syncd_status(tmp_path, syncd):
    from syncd.config import load_config
    from syncd.daemon import Daemon
    from syncd.service.systemd import Notifier

    cfg_path, ledger, root = file_env(tmp_path, 5)
    assert syncd("--config", str(cfg_path), "resync").code == 0
    remote = tmp_path / "remote" / "up"
    for name in ("d1/f1.txt", "d3/f3.txt"):  # damaged in the store, same size and mtime
        obj = remote / name
        st = obj.stat()
        obj.write_bytes(b"X" * st.st_size)
        os.utime(obj, ns=(st.st_atime_ns, st.st_mtime_ns))
    shutil.rmtree(root)
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(30)
    daemon = Daemon(load_config(str(cfg_path)), notifier=Notifier(env={"NOTIFY_SOCKET": sock_path}))
    t = threading.Thread(target=daemon.run, name="test-daemon")
    t.start()
    messages: list[str] = []
    try:
        while not any("READY=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        assert any(re.search(r"STATUS=restoring \d/5\b", m) for m in messages), messages
        ready = next(m for m in messages if "READY=1" in m)
        assert "2 of 5 startup restores failed" in ready, ready
        ok, reason = daemon.health()
        assert ok and reason == "ok (2 of 5 startup restores failed; see `syncd status`)"
        data = json.loads(syncd("--config", str(cfg_path), "status", "--json").out)
        assert data["daemon"]["startup_restore"] == {"total": 5, "restored": 3, "failed": 2}
        assert "startup restore: 3 of 5 restored, 2 failed" in syncd("--config", str(cfg_path), "status").out
    finally:
        daemon.stop.set()
        t.join(30)
        sock.close()


# --- finding 1 for `run`: 503 while the ledger cannot be written, then it catches up ---------------

@contextlib.contextmanager
def limited_run(cfg: Path, log_path: Path, max_file_size: int) -> Iterator[subprocess.Popen]:
    """`syncd run` whose files stop growing at `max_file_size` (raise it with prlimit); stopped
    with SIGTERM at the end, which it must survive cleanly: exit 0, no traceback in its log."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(syncd_cmd(cfg, "run"), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                preexec_fn=limit_file_size(max_file_size))
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    assert "Traceback" not in text, text[-5000:]


def test_run_with_a_full_ledger_disk_is_503_with_the_reason_and_catches_up_when_space_returns(tmp_path):
    cfg, ledger, root = file_env(tmp_path, 0, health_listen=f"127.0.0.1:{free_port()}", rescan_interval=0)
    url = "http://" + re.search(r'health_listen = "([^"]+)"', cfg.read_text()).group(1)
    with limited_run(cfg, tmp_path / "d.log", resource.RLIM_INFINITY) as proc:
        wait_for(lambda: http_get(url + "/healthz")[0] == 200, 60, 0.1, "ready")
        wal = ledger.with_name("ledger.db-wal")
        full = max(ledger.stat().st_size, wal.stat().st_size if wal.exists() else 0) + 1001
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (full, resource.RLIM_INFINITY))
        for i in range(200):
            (root / f"new{i}.txt").write_text(f"new {i}\n" * 50)
        code, reason = wait_for(lambda: (r := http_get(url + "/healthz"))[0] == 503 and r, 60, 0.1, "503")
        assert reason.startswith(f"ledger {ledger} cannot be written"), reason
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        wait_for(lambda: len(list((tmp_path / "remote" / "up").glob("new*.txt"))) == 200, 120, 0.2,
                 "every file uploaded once the ledger can be written")
        wait_for(lambda: http_get(url + "/healthz")[0] == 200, 60, 0.1, "healthy again")
        assert proc.poll() is None


def test_run_whose_ledger_cannot_be_created_at_start_is_503_with_the_reason_and_starts_when_space_returns(
        tmp_path):
    """SPEC §4.11: `run` retries a ledger it cannot write, at start too (it used to exit 2)."""
    cfg, ledger, _ = file_env(tmp_path, 3, health_listen=f"127.0.0.1:{free_port()}", rescan_interval=0)
    url = "http://" + re.search(r'health_listen = "([^"]+)"', cfg.read_text()).group(1)
    # the ledger's first pages do not fit
    with limited_run(cfg, tmp_path / "d.log", 3000) as proc:
        code, reason = wait_for(lambda: proc.poll() is None and (r := http_get(url + "/healthz"))[0] == 503
                                and "cannot be" in r[1] and r, 60, 0.1, "503 naming the ledger")
        assert reason.startswith(f"ledger {ledger} cannot be"), reason
        assert proc.poll() is None
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        wait_for(lambda: http_get(url + "/healthz")[0] == 200, 90, 0.1, "ready once the ledger can be written")
        wait_for(lambda: len(list((tmp_path / "remote" / "up").rglob("f*.txt"))) == 3, 60, 0.1, "files uploaded")
    text = (tmp_path / "d.log").read_text()
    assert text.count("cannot be") == 1, text[-3000:]  # one error line, not one per try


def test_a_signal_arriving_inside_the_stop_events_wait_never_deadlocks_the_stop() -> None:
    """`run` stopped dead (no "stopped", killed after 15 s) when SIGINT arrived right after READY:
    the handler ran in the main thread while it held the stop event's lock inside `wait()`, and
    `stop.set()` waited for that lock forever. The handlers set it from another thread."""
    import threading

    from syncd.interrupt import set_from_handler

    stop = threading.Event()
    with stop._cond:  # what the main thread holds inside stop.wait() (CPython's Event)
        set_from_handler(stop)  # returns at once; `stop.set()` here would never return
    assert stop.wait(10)
