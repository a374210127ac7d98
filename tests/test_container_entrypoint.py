"""packaging/container/entrypoint.sh with the real syncd and a stand-in app (no Docker needed).

The container's story: an empty disk, files restored before the app starts, syncd beside the
app, and on SIGTERM the app stops first and whatever it wrote last still reaches the remote.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from syncd.lock import LedgerLock
from tests.conftest import wait_for, write_config
from tests.daemon_util import write_file

ENTRYPOINT = Path(__file__).resolve().parent.parent / "packaging" / "container" / "entrypoint.sh"

APP = r'''
import json, os, signal, sys, time
root, report = sys.argv[1], sys.argv[2]
names = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
open(os.path.join(root, "new.txt"), "w").write("written while running")
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
json.dump({"saw": names}, open(report, "w"))
while not stop:
    time.sleep(0.05)
# a file written during the app's own shutdown: syncd must still upload it
open(os.path.join(root, "last-words.txt"), "w").write("bye")
sys.exit(0)
'''


def bash_ok() -> bool:
    bash = shutil.which("bash")
    if bash is None:
        return False
    v = subprocess.run([bash, "-c", "echo ${BASH_VERSINFO[0]} ${BASH_VERSINFO[1]}"], capture_output=True, text=True)
    major, minor = (int(x) for x in v.stdout.split())
    return (major, minor) >= (5, 1)


needs_bash = pytest.mark.skipif(not bash_ok(), reason="the entrypoint needs bash >= 5.1 (wait -n -p)")


def setup(tmp_path: Path, remote: dict) -> tuple[dict, Path, Path]:
    root = tmp_path / "data" / "uploads"
    ledger = tmp_path / "state" / "ledger.db"
    config = write_config(tmp_path / "syncd.toml", remote=remote,
                          watches=[{"path": str(root), "prefix": "uploads"}],
                          syncd={"ledger": str(ledger), "settle_seconds": 0, "health_listen": "",
                                 "rescan_interval": 0})
    wrapper = tmp_path / "syncd-bin"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m syncd "$@"\n')
    wrapper.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "SYNCD_BIN": str(wrapper), "SYNCD_CONFIG": str(config),
           "HOME": str(tmp_path), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null",
           "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    app = tmp_path / "app.py"
    app.write_text(APP)
    return env, root, ledger


@needs_bash
def test_restore_first_then_app_beside_syncd_then_a_clean_stop(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    files = {"photos/cat.jpg": b"meow" * 1000, "docs/a b.txt": b"hello", "deep/x/y/z.bin": bytes(range(256))}
    for rel, data in files.items():
        write_file(remote / "uploads" / rel, data)  # as another tool (or an earlier container) wrote them
    env, root, ledger = setup(tmp_path, {"url": f"file://{remote}"})
    report = tmp_path / "app-report.json"
    log = open(tmp_path / "entrypoint.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["bash", str(ENTRYPOINT), sys.executable, str(tmp_path / "app.py"), str(root),
                             str(report)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: report.exists() or proc.poll() is not None, 60, what="the app to start")
        assert proc.poll() is None, (tmp_path / "entrypoint.log").read_text()
        wait_for(lambda: report.read_text().endswith("}"), 10, what="the app's report")
        assert sorted(json.loads(report.read_text())["saw"]) == sorted(files)  # everything, before it started
        # syncd runs beside the app: what the app writes reaches the remote
        wait_for(lambda: (remote / "uploads" / "new.txt").exists(), 30, what="new.txt uploaded by `run`")
        proc.send_signal(signal.SIGTERM)  # as `docker stop` does to PID 1
        assert proc.wait(60) == 0, (tmp_path / "entrypoint.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    out = (tmp_path / "entrypoint.log").read_text()
    assert (remote / "uploads" / "last-words.txt").read_bytes() == b"bye", out
    lock = LedgerLock(ledger)  # syncd has exited: nothing holds the ledger
    lock.acquire("test")
    lock.release()


@needs_bash
def test_no_app_without_its_files_when_the_remote_is_down(tmp_path: Path) -> None:
    env, root, _ledger = setup(tmp_path, {"url": "s3://no-such-bucket/x", "endpoint_url": "http://127.0.0.1:9"})
    report = tmp_path / "app-report.json"
    p = subprocess.run(["bash", str(ENTRYPOINT), sys.executable, str(tmp_path / "app.py"), str(root), str(report)],
                       env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 3, p.stderr
    assert "not starting the app without its files" in p.stderr
    assert not report.exists()


@needs_bash
def test_sigterm_during_the_restore_stops_it(tmp_path: Path) -> None:
    """Docker sends SIGTERM to PID 1; a shell ignores it without a handler. The entrypoint
    forwards it to the restore in progress instead of waiting to be killed."""
    env, root, _ledger = setup(tmp_path, {"url": "s3://no-such-bucket/x", "endpoint_url": "http://127.0.0.1:9"})
    slow = tmp_path / "slow-syncd"  # a restore that would take forever
    slow.write_text('#!/bin/sh\ntouch "$0.started"\nexec sleep 300\n')
    slow.chmod(0o755)
    env["SYNCD_BIN"] = str(slow)
    proc = subprocess.Popen(["bash", str(ENTRYPOINT), "true"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: Path(f"{slow}.started").exists(), 30, what="the restore to start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 143
        assert "stopped during the restore" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_the_container_config_and_dockerfile_refer_to_real_things() -> None:
    """The image cannot be built here: at least its config is valid and its COPY sources exist."""
    from syncd.config import load_config

    here = ENTRYPOINT.parent
    cfg = load_config(here / "syncd.toml")
    assert cfg.ledger == Path("/var/lib/syncd/ledger.db")
    assert [str(w.path) for w in cfg.watches] == ["/data/uploads"]
    repo = here.parent.parent
    for line in (here / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (repo / src).exists(), src


@needs_bash
def test_a_killed_syncd_run_still_gets_the_final_upload(tmp_path: Path) -> None:
    """`syncd run` killed (kill -9, the OOM killer): the entrypoint stops the app and still runs
    the last `resync --no-restore`, so what was queued, and what the app wrote while stopping,
    reaches the remote before the container (and its disk) is gone."""
    import os

    from syncd.lock import holder

    remote = tmp_path / "remote"
    env, root, ledger = setup(tmp_path, {"url": f"file://{remote}"})
    report = tmp_path / "app-report.json"
    log = open(tmp_path / "entrypoint.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["bash", str(ENTRYPOINT), sys.executable, str(tmp_path / "app.py"), str(root),
                             str(report)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: report.exists() or proc.poll() is not None, 60, what="the app to start")
        run_pid = wait_for(lambda: holder(ledger).get("role") == "run" and holder(ledger)["pid"], 60,
                           what="`syncd run` to hold the ledger")
        os.kill(int(run_pid), signal.SIGKILL)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    out = (tmp_path / "entrypoint.log").read_text()
    assert rc != 0, out  # the container ends so that the orchestrator restarts it
    assert "syncd exited" in out, out
    # written by the app when the entrypoint stopped it, after `run` was dead
    assert (remote / "uploads" / "last-words.txt").read_bytes() == b"bye", out
    assert (remote / "uploads" / "new.txt").read_bytes() == b"written while running", out


GATED_SYNCD = r'''#!/bin/sh
exec "{python}" -c '
import os, sys, time
from syncd.remote.local import LocalRemote
real_get = LocalRemote.get
def get(self, key, dest):  # a slow remote: restores wait for the gate file
    while not os.path.exists("{gate}"):
        time.sleep(0.05)
    return real_get(self, key, dest)
LocalRemote.get = get
from syncd.cli import main
main(sys.argv[1:])
' "$@"
'''


@needs_bash
def test_lazy_mode_starts_the_app_at_ready_and_restores_behind_it(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    files = {f"photos/{i:02d}.jpg": bytes([i]) * 500 for i in range(20)}
    for rel, data in files.items():
        write_file(remote / "uploads" / rel, data)
    env, root, _ledger = setup(tmp_path, {"url": f"file://{remote}"})
    config = Path(env["SYNCD_CONFIG"])
    config.write_text(config.read_text().replace("[syncd]\n", "[syncd]\nlazy_restore = true\n", 1))
    gate = tmp_path / "gate"
    gated = tmp_path / "gated-syncd"
    gated.write_text(GATED_SYNCD.format(python=sys.executable, gate=gate))
    gated.chmod(0o755)
    env.update(SYNCD_BIN=str(gated), SYNCD_LAZY="1", PYTHONPATH=str(ENTRYPOINT.parent.parent.parent))
    report = tmp_path / "app-report.json"
    log = open(tmp_path / "entrypoint.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["bash", str(ENTRYPOINT), sys.executable, str(tmp_path / "app.py"), str(root),
                             str(report)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # the app starts while every restore is still held back
        wait_for(lambda: report.exists() or proc.poll() is not None, 60, what="the app to start before the restore")
        assert proc.poll() is None, (tmp_path / "entrypoint.log").read_text()
        wait_for(lambda: report.read_text().endswith("}"), 10, what="the app's report")
        assert not set(json.loads(report.read_text())["saw"]) & set(files)  # (temp files of restores held back)
        gate.touch()
        wait_for(lambda: all((root / rel).exists() for rel in files), 60, what="the restore behind READY")
        assert all((root / rel).read_bytes() == data for rel, data in files.items())
        wait_for(lambda: (remote / "uploads" / "new.txt").exists(), 30, what="new.txt uploaded by `run`")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "entrypoint.log").read_text()
    finally:
        gate.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert (remote / "uploads" / "last-words.txt").read_bytes() == b"bye"


PROBING_APP = r'''
import json, os, signal, sys, time, urllib.error, urllib.request
port, report = sys.argv[1], sys.argv[2]
try:  # what nginx's `try_files $uri @syncd` does with its first request
    seen = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).status
except urllib.error.HTTPError as e:
    seen = e.code
except OSError as e:
    seen = f"no answer: {e}"
json.dump({"healthz": seen}, open(report, "w"))
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
while not stop:
    time.sleep(0.05)
'''

SLOW_RUN = r'''#!/bin/sh
# `run` held back at its start (a big image's imports on a busy node) until the test opens the gate
if [ "$1" = run ]; then
    touch "{started}"
    while [ ! -e "{gate}" ]; do sleep 0.05; done
fi
exec "{python}" -m syncd "$@"
'''


@needs_bash
def test_the_default_mode_starts_the_app_once_syncd_answers_on_its_port(tmp_path: Path) -> None:
    """nginx in front of the app falls back to syncd's port (`serve_files`): an app started
    beside a `syncd run` that does not listen yet got 502s. The default mode starts the app once
    syncd is READY, which it is only after its HTTP endpoint serves."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    remote = tmp_path / "remote"
    write_file(remote / "uploads" / "a.txt", b"a")
    env, root, _ledger = setup(tmp_path, {"url": f"file://{remote}"})
    config = Path(env["SYNCD_CONFIG"])
    config.write_text(config.read_text().replace('health_listen = ""', f'health_listen = "127.0.0.1:{port}"'))
    assert f"127.0.0.1:{port}" in config.read_text()
    started, gate = tmp_path / "run.started", tmp_path / "gate"
    slow = tmp_path / "slow-syncd"
    slow.write_text(SLOW_RUN.format(python=sys.executable, started=started, gate=gate))
    slow.chmod(0o755)
    env.update(SYNCD_BIN=str(slow), PYTHONPATH=str(ENTRYPOINT.parent.parent.parent))
    app = tmp_path / "probe.py"
    app.write_text(PROBING_APP)
    report = tmp_path / "app-report.json"
    log = open(tmp_path / "entrypoint.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["bash", str(ENTRYPOINT), sys.executable, str(app), str(port), str(report)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: started.exists() or proc.poll() is not None, 60, what="`syncd run` to start")
        gate.touch()
        wait_for(lambda: report.exists() and report.read_text().endswith("}") or proc.poll() is not None, 60,
                 what="the app's report")
        assert proc.poll() is None, (tmp_path / "entrypoint.log").read_text()
        assert json.loads(report.read_text())["healthz"] == 200, (tmp_path / "entrypoint.log").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "entrypoint.log").read_text()
    finally:
        gate.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@needs_bash
def test_with_the_remote_down_and_require_restore_0_the_app_starts_without_waiting_for_ready(tmp_path: Path) -> None:
    """READY waits for the remote; SYNCD_REQUIRE_RESTORE=0 asks for the app without it."""
    env, root, _ledger = setup(tmp_path, {"url": "s3://no-such-bucket/x", "endpoint_url": "http://127.0.0.1:9"})
    env["SYNCD_REQUIRE_RESTORE"] = "0"
    root.mkdir(parents=True)
    report = tmp_path / "app-report.json"
    proc = subprocess.Popen(["bash", str(ENTRYPOINT), sys.executable, str(tmp_path / "app.py"), str(root),
                             str(report)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: report.exists() or proc.poll() is not None, 180, what="the app to start")
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        assert "starting the app anyway" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
