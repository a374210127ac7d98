"""What root creates belongs to the service (SPEC §4.13, issue 25): an operator's `resync` run as
root leaves the ledger, its lock and WAL files, restored files and directories and the
`file://` remote's files to the owner of the directory each is made in, so that the service
(its own user) can go on with them.

The service's side runs as `nobody` through setpriv: the interpreter lives under /root (0700),
so the process keeps CAP_DAC_READ_SEARCH (read and traverse anything) but not CAP_DAC_OVERRIDE:
what it may write is decided by owners and permission bits, as for the real service user. Its
files live outside pytest's 0700 tmp_path: access(2) ignores capabilities for a non-root user.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.ledger import Ledger
from tests.conftest import write_config
from tests.daemon_util import write_file

pytestmark = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                                reason="needs root: what root creates, and chown")
NOBODY = 65534
REPO = Path(__file__).resolve().parent.parent


def as_nobody(*args: str) -> subprocess.CompletedProcess:
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is needed to run syncd as another user")
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
           "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--",
           sys.executable, "-m", "syncd", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is root's 0700)."""
    d = Path(tempfile.mkdtemp(prefix="syncd-root-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def nobodys_dir(path: Path, mode: int = 0o770) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, NOBODY, NOBODY)
    path.chmod(mode)
    return path


def not_nobodys(root: Path) -> list[str]:
    return [f"{p} {p.lstat().st_uid}:{p.lstat().st_gid}" for p in [root, *root.rglob("*")]
            if (p.lstat().st_uid, p.lstat().st_gid) != (NOBODY, NOBODY)]


def test_a_resync_run_as_root_leaves_files_the_service_user_can_go_on_with(base: Path, syncd) -> None:
    tmp_path = base
    state, watch, remote = (nobodys_dir(tmp_path / d) for d in ("state", "uploads", "remote"))
    ledger = state / "ledger.db"
    # on the remote: files of the watch in directories not on disk (restored by root's resync)
    for rel in ("d1/d2/a.txt", "d1/d3/b.txt", "c.txt"):
        write_file(remote / "uploads" / rel, f"remote {rel}\n".encode())
    for p in remote.rglob("*"):
        os.chown(p, NOBODY, NOBODY)
    write_file(watch / "new" / "local.txt", b"to upload\n")  # uploaded: root makes remote dirs
    for p in (watch / "new", watch / "new" / "local.txt"):
        os.chown(p, NOBODY, NOBODY)
    config = write_config(tmp_path / "syncd.toml", remote={"url": f"file://{remote}"},
                          watches=[{"path": str(watch), "prefix": "uploads"}],
                          syncd={"ledger": str(ledger), "settle_seconds": 0, "health_listen": ""})
    r = syncd("--config", str(config), "resync")
    assert r.code == 0, r.out + r.err
    assert (watch / "d1" / "d2" / "a.txt").read_text() == "remote d1/d2/a.txt\n"
    assert (remote / "uploads" / "new" / "local.txt").exists()
    assert not_nobodys(state) == []  # the ledger and its lock
    assert {p.name for p in state.iterdir()} >= {"ledger.db", "ledger.db.lock"}
    assert not_nobodys(watch) == []  # restored files and each directory the restore made
    assert not_nobodys(remote) == []  # the file:// remote's objects, directories and metadata
    # as open as the directory they are in, whatever root's umask: the app's group can use them
    assert (watch / "d1").stat().st_mode & 0o7777 == 0o770
    assert (watch / "d1" / "d2" / "a.txt").stat().st_mode & 0o777 == 0o660

    # the service (nobody) goes on: restores into what root restored, writes ledger and remote
    (watch / "d1" / "d2" / "a.txt").unlink()
    write_file(remote / "uploads" / "d1" / "d3" / "later.txt", b"written on another host\n")
    write_file(watch / "new" / "second.txt", b"the service uploads this\n")
    for p in (remote / "uploads" / "d1" / "d3" / "later.txt", watch / "new" / "second.txt"):
        os.chown(p, NOBODY, NOBODY)
    p = as_nobody("--config", str(config), "resync")
    assert p.returncode == 0, p.stdout + p.stderr
    assert (watch / "d1" / "d2" / "a.txt").read_text() == "remote d1/d2/a.txt\n"
    assert (watch / "d1" / "d3" / "later.txt").exists()
    assert (remote / "uploads" / "new" / "second.txt").read_bytes() == b"the service uploads this\n"


def test_a_ledger_opened_by_root_gives_its_wal_and_shm_to_the_directory_owner(tmp_path: Path) -> None:
    state = nobodys_dir(tmp_path / "state", 0o750)
    ledger = Ledger(state / "ledger.db")
    try:
        ledger.set_meta("x", "1")  # a write: the WAL and SHM exist while it is open
        names = {p.name for p in state.iterdir()}
        assert {"ledger.db", "ledger.db-wal", "ledger.db-shm"} <= names, names
        assert not_nobodys(state) == []
        assert (state / "ledger.db").stat().st_mode & 0o777 == 0o640
    finally:
        ledger.close()


def test_a_root_owned_ledger_left_by_an_older_syncd_is_given_back(tmp_path: Path) -> None:
    state = nobodys_dir(tmp_path / "state", 0o750)
    sqlite3.connect(state / "ledger.db").close()  # root's, root's umask: what issue 25 found
    Ledger(state / "ledger.db").close()
    assert not_nobodys(state) == []


def test_a_state_directory_syncd_makes_as_root_belongs_to_its_parent_owner(tmp_path: Path, syncd) -> None:
    base, watch = nobodys_dir(tmp_path / "var-lib", 0o755), nobodys_dir(tmp_path / "uploads")
    config = write_config(tmp_path / "syncd.toml", remote={"url": f"file://{nobodys_dir(tmp_path / 'remote')}"},
                          watches=[{"path": str(watch / "sub"), "prefix": "uploads"}],
                          syncd={"ledger": str(base / "syncd" / "ledger.db"), "health_listen": ""})
    r = syncd("--config", str(config), "resync")
    assert r.code == 0, r.out + r.err
    assert not_nobodys(base) == []
    assert not_nobodys(watch) == []  # the watch directory syncd made (a fresh container's)


def test_what_root_makes_in_its_own_directories_stays_roots(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "state" / "ledger.db")
    try:
        ledger.set_meta("x", "1")
    finally:
        ledger.close()
    assert {p.stat().st_uid for p in (tmp_path / "state").iterdir()} == {0}


def test_a_directory_made_inside_one_another_worker_just_made_gets_the_owner_it_will_have(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two restores side by side: one makes `d1` (root's until its chown), the other finds `d1`
    in that moment and makes `d1/d3` in it. `d1/d3` must not copy root from a `d1` whose chown
    has not happened yet (seen under load: `d1/d3` and `d1/d3/b.txt` left root's)."""
    import threading

    import syncd.restore as restore_mod
    from syncd.restore import safe_target

    watch = nobodys_dir(tmp_path / "uploads")
    made, go_on = threading.Event(), threading.Event()
    real_mkdir = os.mkdir

    def mkdir(path, *a, **kw):  # the first worker stops between its mkdir of d1 and the chown
        real_mkdir(path, *a, **kw)
        if Path(path).name == "d1" and threading.current_thread().name == "first":
            made.set()
            go_on.wait(10)

    monkeypatch.setattr(restore_mod.os, "mkdir", mkdir)
    first = threading.Thread(target=safe_target, args=(watch, "d1/a.txt"), name="first")
    second = threading.Thread(target=safe_target, args=(watch, "d1/d3/b.txt"), name="second")
    first.start()
    assert made.wait(10)
    second.start()
    second.join(2)  # done at once before the fix; waits for the first's chown after it
    go_on.set()
    first.join(10)
    second.join(10)
    assert not_nobodys(watch) == []
