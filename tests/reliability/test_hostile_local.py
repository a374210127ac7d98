"""Hostile and odd local conditions for one-shot commands: unreadable files, a disk that fills
up during a restore, a corrupted ledger, symlink loops, names that stretch what a key can be.

Each test fails if syncd loses a file, writes outside a root, leaves a partial file, or crashes
(a traceback instead of one clear line).

Unreadable files: the tests run as root, where chmod 000 denies nothing. Rather than mock
`open`, `syncd resync` runs in a subprocess whose bounding set lacks CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH (prctl PR_CAPBSET_DROP before exec): it stays uid 0, so it can still use
the virtual environment under /root, but the kernel really refuses to read a mode-000 file.
As a non-root user plain chmod is enough and the subprocess runs unchanged.

A full disk: `syncd resync` in a subprocess with RLIMIT_FSIZE (writes past the limit fail with
EFBIG; SIGXFSZ is ignored so the process is not killed), and, where the test may mount (root),
a real ENOSPC on a small tmpfs.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import pytest

from tests.conftest import FAKE_KEY_ID, FAKE_SECRET
from tests.reliability.util import local_tree, restore_temps

MIB = 1024 * 1024
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def run_syncd(config: Path, *args: str, preexec=None, env: dict[str, str] | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "syncd", "--config", str(config), *args], capture_output=True,
                       text=True, timeout=timeout, preexec_fn=preexec, env={**os.environ, **(env or {})})
    out = p.stdout + p.stderr
    assert FAKE_KEY_ID not in out and FAKE_SECRET not in out
    assert "Traceback" not in out, out
    return p


def _drop_dac() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _unprivileged():
    return _drop_dac if os.geteuid() == 0 else None


def _fsize_limit(limit: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def file_env(make_env, tmp_path: Path, **kw):
    from tests.conftest import Store

    root = tmp_path / "remote"
    return make_env(Store(kind="file", url=f"file://{root}", root=root), **kw)


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


# --- a file without read permission -----------------------------------------------------------

def test_unreadable_file_is_failed_with_the_reason_and_others_go_on(tmp_path, make_env, figures):
    env = file_env(make_env, tmp_path)
    files = {f"ok/f{i}.txt": f"fine {i}".encode() for i in range(5)}
    write_tree(env.root, files)
    secret = env.root / "ok/secret.txt"
    secret.write_bytes(b"no read permission")
    secret.chmod(0)
    try:
        p = run_syncd(env.config, "resync", preexec=_unprivileged())
        assert p.returncode == 1, p.stdout + p.stderr
        assert "failed: uploads/ok/secret.txt" in p.stderr and "Permission denied" in p.stderr, p.stderr
        assert "uploaded 5" in p.stdout
        assert env.store.object_keys() == sorted(f"uploads/{rel}" for rel in files)
        st = json.loads(run_syncd(env.config, "status", "--json").stdout)["watches"][0]
        assert st["counts"]["failed"] == 1
        assert st["failures"][0]["path"] == "ok/secret.txt"
        assert "Permission denied" in st["failures"][0]["error"]
    finally:
        secret.chmod(0o644)
    # fixed by the operator: `syncd retry PATH` re-queues it, the next resync uploads it
    assert run_syncd(env.config, "retry", str(secret)).returncode == 0
    p = run_syncd(env.config, "resync")
    assert p.returncode == 0, p.stderr
    assert (env.store.root / "uploads/ok/secret.txt").read_bytes() == b"no read permission"
    figures.add("hostile: unreadable file", hostile_cases=1, files_verified=6)


# --- a disk that fills up during a restore --------------------------------------------------------

def _restore_setup(make_env, tmp_path, ledger_dir: Path | None = None):
    # one worker: with several, small restores running beside the big one may also find the
    # disk full, and which ones do is a matter of timing
    env = file_env(make_env, tmp_path, syncd={"ledger": str((ledger_dir or tmp_path / "state") / "ledger.db"),
                                              "workers": 1})
    rng = random.Random(7)
    files = {f"small/f{i}.bin": rng.randbytes(20_000) for i in range(8)}
    files["big/large.bin"] = rng.randbytes(3 * MIB)
    return env, files


def _check_full_disk_outcome(env, files, p) -> None:
    assert p.returncode == 1, p.stdout + p.stderr
    assert "failed: uploads/big/large.bin" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) < 10  # a clear report, not a traceback
    assert "restored 8" in p.stdout, p.stdout
    assert not (env.root / "big/large.bin").exists()  # no partial file
    assert not restore_temps(env.root)
    assert local_tree(env.root) == {k: v for k, v in files.items() if k != "big/large.bin"}


def test_disk_full_during_restore_rlimit_fsize(tmp_path, make_env, figures):
    env, files = _restore_setup(make_env, tmp_path)
    write_tree(env.root, files)
    assert run_syncd(env.config, "resync").returncode == 0
    shutil.rmtree(env.root)
    p = run_syncd(env.config, "resync", preexec=_fsize_limit(1 * MIB))
    _check_full_disk_outcome(env, files, p)
    assert "File too large" in p.stderr, p.stderr
    # with room again, the next run restores it
    p = run_syncd(env.config, "resync")
    assert p.returncode == 0, p.stderr
    assert local_tree(env.root) == files
    figures.add("hostile: file size limit during restore", hostile_cases=1, files_verified=len(files))


@pytest.fixture
def small_tmpfs(tmp_path):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root; the RLIMIT_FSIZE test covers the error path")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_restore_enospc(tmp_path, make_env, small_tmpfs, figures):
    env, files = _restore_setup(make_env, tmp_path)
    staging = tmp_path / "staging"
    write_tree(staging, files)
    # upload from a roomy directory, then point the watch at the 2 MiB tmpfs
    cfg = env.config.read_text()
    env.config.write_text(cfg.replace(str(env.root), str(staging)))
    assert run_syncd(env.config, "resync").returncode == 0
    env.config.write_text(cfg.replace(str(env.root), str(small_tmpfs)))
    (tmp_path / "state/ledger.db").unlink()  # a fresh ledger: everything is missing there
    env.root = small_tmpfs
    p = run_syncd(env.config, "resync")
    _check_full_disk_outcome(env, files, p)
    assert "No space left" in p.stderr, p.stderr
    figures.add("hostile: disk full (ENOSPC) during restore", hostile_cases=1, files_verified=len(files) - 1)


# --- a corrupted ledger ------------------------------------------------------------------------------

def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(3)
    if how == "header":
        data[0:100] = rng.randbytes(100)
    elif how == "pages":
        page = 4096
        for off in range(2 * page, len(data), 3 * page):
            data[off + 8:off + page] = rng.randbytes(page - 8)
    elif how == "truncated":
        data = data[: len(data) // 2 + 100]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["header", "pages", "truncated"])
def test_corrupted_ledger_clear_error_and_documented_recovery(tmp_path, make_env, figures, how):
    env = file_env(make_env, tmp_path)
    files = {f"d{i % 7}/f{i:03d}-{'x' * 60}.txt": f"content {i}".encode() for i in range(400)}
    write_tree(env.root, files)
    assert run_syncd(env.config, "resync").returncode == 0
    for rel in list(files)[:20]:  # lost locally: the recovery must bring them back
        (env.root / rel).unlink()
    _corrupt(env.ledger, how)
    for args in (["resync"], ["status"], ["run"]):
        p = run_syncd(env.config, *args, timeout=60)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        lines = p.stderr.strip().splitlines()
        msg = lines[-1]
        assert "corrupt" in msg and f"mv '{env.ledger}' '{env.ledger}.corrupt' && syncd --config '{env.config}' resync" in msg, p.stderr
    before = {k: (env.store.root / k).stat().st_mtime_ns for k in env.store.object_keys()}
    # the documented recovery, literally
    os.rename(env.ledger, f"{env.ledger}.corrupt")
    p = run_syncd(env.config, "resync")
    assert p.returncode == 0, p.stderr
    assert local_tree(env.root) == files
    assert "uploaded 0" in p.stdout and "restored 20" in p.stdout, p.stdout
    after = {k: (env.store.root / k).stat().st_mtime_ns for k in env.store.object_keys()}
    assert after == before  # compared, nothing sent again
    con = sqlite3.connect(env.ledger)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT count(*) FROM files WHERE state='synced'").fetchone()[0] == len(files)
    finally:
        con.close()
    figures.add(f"hostile: corrupted ledger ({how})", hostile_cases=1, files_verified=len(files))


# --- symlink loops in a one-shot scan ---------------------------------------------------------------

@pytest.mark.parametrize("follow", [False, True])
def test_symlink_loops_in_resync(tmp_path, make_env, syncd, figures, follow):
    env = file_env(make_env, tmp_path, watch={"follow_symlinks": follow})
    write_tree(env.root, {"a/real.txt": b"real", "b/deep/x.txt": b"x"})
    os.symlink("..", env.root / "a/up")
    os.symlink("../..", env.root / "b/deep/top")
    os.symlink(env.root / "l2", env.root / "l1")
    os.symlink(env.root / "l1", env.root / "l2")
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert env.store.object_keys() == ["uploads/a/real.txt", "uploads/b/deep/x.txt"]
    figures.add(f"hostile: symlink loops in resync (follow_symlinks={follow})", hostile_cases=1,
                files_verified=2)


# --- names -----------------------------------------------------------------------------------------------

LONG = "é" * 127 + "x"  # 255 bytes
NAMES = {
    "new\nline.txt": b"newline",
    "cr\rand\ttab.txt": b"control characters",
    LONG: b"255 bytes",
    f"deep/{LONG}/{LONG}/f.txt": b"two long directories",
    unicodedata.normalize("NFC", "Ångström/café.txt"): b"NFC",
    unicodedata.normalize("NFD", "Ångström/café.txt"): b"NFD",
    "space at end ": b"space",
    "-dash-first": b"dash",
    "a+b=c&d?e#f%20g.txt": b"url characters",
}
# What each test server cannot store (not syncd's doing): moto's server answers a bare 404 to a
# key with a newline (URL routing); s3rver stores objects as files named key + a suffix, which
# crashes it on 255-byte names (ENAMETOOLONG), and ignores EncodingType=url in listings, so a
# carriage return comes back as a newline (XML line-end normalisation).
SERVER_LIMITS = {"moto_server": lambda rel: "\n" not in rel,
                 "s3rver": lambda rel: len(rel.rsplit("/", 1)[-1].encode()) < 200 and "\r" not in rel}


def test_odd_names_round_trip(store, make_env, syncd, figures):
    env = make_env(store)
    keep = SERVER_LIMITS.get(store.kind, lambda rel: True)
    names = {rel: data for rel, data in NAMES.items() if keep(rel)}
    write_tree(env.root, names)
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert store.object_keys() == sorted(f"{env.prefix}/{rel}" for rel in names)
    for rel, data in names.items():
        assert store.read(f"{env.prefix}/{rel}") == data
    shutil.rmtree(env.root)
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert local_tree(env.root) == names
    figures.add(f"hostile: odd names ({store.kind})", hostile_cases=len(names), files_verified=len(names))


# --- the max_deletes cap on a rescan ---------------------------------------------------------------

def test_rescan_with_more_deletions_than_max_deletes_pauses_them(tmp_path, make_env, syncd, figures):
    """Deletions the watcher missed (overflow, events lost) are found by a rescan: more than
    max_deletes of them pause remote deletion before any happens (the daemon's own rescan)."""
    from syncd.config import load_config
    from syncd.daemon import Daemon
    from syncd.engine import Engine
    from syncd.ledger import Ledger
    from syncd.remote import open_remote
    from syncd.watcher import Watcher

    env = file_env(make_env, tmp_path, watch={"on_delete": "mirror"}, syncd={"max_deletes": 5})
    files = {f"r/f{i:02d}.txt": b"x" * i for i in range(12)}
    write_tree(env.root, files)
    assert syncd("--config", str(env.config), "resync").code == 0
    for rel in list(files)[:8]:
        (env.root / rel).unlink()
    cfg = load_config(env.config)
    d = Daemon(cfg)
    d.ledger = Ledger(cfg.ledger)
    try:
        remote = open_remote(cfg)
        d.engine = Engine(cfg, d.ledger, remote, oneshot=False)
        d.engine.transfers.delete_gate = d.deletes_allowed
        d.watcher = Watcher(cfg, d.ledger, request_rescan=lambda _r: None)  # not started
        d.rescan("test")
        assert "deletions in one rescan" in d.ledger.get_meta("deletes_paused")
        row = d.ledger.claim(("delete",), now=time.time() + 1)[0]
        d.engine.transfers.handle(row)  # a worker that claimed one anyway: the gate holds it
        assert len(env.store.object_keys()) == 12
        d.ledger.set_meta("deletes_paused", None)  # what `syncd retry --deletes` does
        d.ledger.set_meta("deletes_released_at", str(time.time()))
        assert d.deletes_allowed()
        d.engine.drain(("delete",))
        assert sorted(env.store.object_keys()) == sorted(f"uploads/{rel}" for rel in list(files)[8:])
    finally:
        d.ledger.close()
    figures.add("hostile: rescan over max_deletes", hostile_cases=1, files_verified=4)
