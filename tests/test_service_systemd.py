"""systemd: the shipped units pass `systemd-analyze verify`, and `syncd run` speaks sd_notify.

The notify test binds a real AF_UNIX datagram socket, as systemd does, and checks every
datagram at the moment it arrives (READY=1 only once every file is back on disk).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from syncd.service.systemd import Notifier
from tests.conftest import wait_for, write_config
from tests.daemon_util import DaemonProc, write_file

UNITS_DIR = Path(__file__).resolve().parent.parent / "packaging" / "systemd"
UNITS = ["syncd.service", "syncd@.service", "syncd-resync.service", "syncd-resync.timer"]
SHIPPED_BIN = "/opt/syncd/bin/syncd"


# --- the unit files -----------------------------------------------------------------------------


def unit_settings(name: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment; systemd allows repeated keys, so no dict."""
    out, section = [], ""
    for raw in (UNITS_DIR / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def setting(name: str, key: str) -> list[str]:
    return [v for _s, k, v in unit_settings(name) if k == key]


@pytest.fixture(scope="module")
def verified_copies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units with ExecStart pointed at a real file: verify rejects a missing binary
    (exit 1), and /opt/syncd does not exist on a test machine. Everything else is verbatim."""
    out = tmp_path_factory.mktemp("units")
    real_bin = shutil.which("syncd") or sys.executable
    for name in UNITS:
        text = (UNITS_DIR / name).read_text()
        (out / name).write_text(text.replace(SHIPPED_BIN, real_bin))
    return out


@pytest.mark.parametrize("unit", UNITS)
def test_unit_passes_systemd_analyze_verify(unit: str, verified_copies: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd; .ci/run does it)")
    # verify loads the other units from the same directory (the timer needs its service)
    p = subprocess.run([tool, "verify", "--man=no", str(verified_copies / unit)],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""})
    # unknown keys and bad values only warn and still exit 0 (PITFALLS §4): any line that
    # names one of our units is a failure; lines about the host's own units are not ours
    ours = [line for line in (p.stderr + p.stdout).splitlines() if "syncd" in line]
    assert p.returncode == 0 and not ours, f"rc={p.returncode}\n{p.stderr}{p.stdout}"


def test_units_say_what_the_readme_says() -> None:
    assert setting("syncd.service", "ExecStart") == [f"{SHIPPED_BIN} --config /etc/syncd/syncd.toml run"]
    assert setting("syncd@.service", "ExecStart") == [f"{SHIPPED_BIN} --config /etc/syncd/%i.toml run"]
    assert setting("syncd-resync.service", "ExecStart") == [
        f"{SHIPPED_BIN} --config /etc/syncd/syncd.toml resync"]
    for unit in ("syncd.service", "syncd@.service"):
        assert setting(unit, "Type") == ["notify"]
        assert setting(unit, "NotifyAccess") == ["main"]
        assert setting(unit, "Restart") == ["on-failure"]
        assert setting(unit, "WatchdogSec")
        assert len(setting(unit, "ExecReload")) == 1  # SIGHUP = rescan in `run` (tested below)
        # a read lease on the app's files (syncd.leases): that capability and no other
        assert setting(unit, "CapabilityBoundingSet") == setting(unit, "AmbientCapabilities") == ["CAP_LEASE"]
    assert setting("syncd-resync.service", "Type") == ["oneshot"]
    assert setting("syncd-resync.timer", "OnCalendar")
    for unit in ("syncd.service", "syncd@.service", "syncd-resync.service"):
        assert setting(unit, "User") == ["syncd"]
        assert setting(unit, "ProtectSystem") == ["strict"]
        assert setting(unit, "StateDirectory") == ["syncd"]
        assert setting(unit, "ReadWritePaths")
        assert setting(unit, "NoNewPrivileges") == ["yes"]
        assert setting(unit, "PrivateTmp") == ["yes"]


def test_the_reload_sends_sighup_with_the_shell_alone() -> None:
    """Issue 23: `systemctl reload syncd` ran /bin/kill, which a minimal Debian (debootstrap
    minbase, container images) lacks: 203/EXEC, "Reload failed". /bin/sh is always there and
    its built-in kill needs nothing on PATH. systemd puts the main PID in ${MAINPID}."""
    for unit in ("syncd.service", "syncd@.service"):
        [reload] = setting(unit, "ExecReload")
        argv = shlex.split(reload)
        assert argv[0] == "/bin/sh", reload
        victim = subprocess.Popen(["sleep", "60"])
        try:
            argv = [a.replace("${MAINPID}", str(victim.pid)) for a in argv]
            subprocess.run(argv, env={}, check=True, timeout=10)  # no PATH: the built-in kill only
            assert victim.wait(10) == -signal.SIGHUP
        finally:
            victim.kill()
            victim.wait()


def test_the_service_config_has_absolute_paths_the_units_can_write() -> None:
    """Issue 23: the README installed syncd.example.toml, whose `file://./demo/remote` became
    /etc/syncd/demo/remote, which the hardened unit cannot write ("activating" for ever). The
    installed config is the service's own: the ledger in StateDirectory=, every watch in the
    shipped ReadWritePaths= (the "-" lets syncd say that one is missing), nothing relative."""
    from syncd.config import load_config

    cfg = load_config(UNITS_DIR / "syncd.toml")
    assert cfg.ledger == Path("/var/lib") / setting("syncd.service", "StateDirectory")[0] / "ledger.db"
    assert cfg.remote.url.startswith("s3://")  # a placeholder the README says to set
    for unit in ("syncd.service", "syncd-resync.service"):
        writable = {p.lstrip("-") for v in setting(unit, "ReadWritePaths") for p in v.split()}
        assert {str(w.path) for w in cfg.watches} <= writable, unit
        assert all(v.startswith("-") for v in setting(unit, "ReadWritePaths")), unit
    raw = tomllib.loads((UNITS_DIR / "syncd.toml").read_text())  # as written, before resolving
    assert all(p.startswith("/") for p in [raw["syncd"]["ledger"], *(w["path"] for w in raw["watch"])])
    readme = (UNITS_DIR / "README.md").read_text()
    assert "install -m 0640 -g syncd packaging/systemd/syncd.toml /etc/syncd/syncd.toml" in readme
    assert "syncd.example.toml /etc/syncd" not in readme
    # the resync unit writes the same paths: the README links one drop-in into both
    assert "ln -sf ../syncd.service.d/watches.conf /etc/systemd/system/syncd-resync.service.d/" in readme
    # `check` as the service runs it: its user and its credentials
    assert ("systemd-run --pipe --wait --quiet --uid=syncd -p EnvironmentFile=-/etc/syncd/syncd.env \\\n"
            "    /opt/syncd/bin/syncd --config /etc/syncd/syncd.toml check") in readme
    assert setting("syncd.service", "EnvironmentFile") == ["-/etc/syncd/syncd.env"]


def test_the_readme_quotes_what_run_logs_for_a_remote_it_cannot_write(tmp_path: Path) -> None:
    """Issue 23: the README quoted `remote file:///... cannot be used: ... not writable`, a line
    syncd never printed. The quote must be found in what `run` logs."""
    readme = (UNITS_DIR / "README.md").read_text()
    quote = "remote not usable: AccessDenied: remote directory /srv/syncd-remote is not writable"
    assert f"`{quote}`" in readme.replace("\n", " ")
    remote = tmp_path / "remote"
    remote.mkdir(mode=0o755)
    cmd = [sys.executable, "-m", "syncd", "--config", "CONFIG", "run"]
    if os.geteuid() == 0:  # root writes anywhere: drop the capability, give the directory away
        if not shutil.which("setpriv"):
            pytest.skip("setpriv (util-linux) is needed to drop CAP_DAC_OVERRIDE")
        os.chown(remote, 65534, 65534)
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]
    remote.chmod(0o555)
    config = write_config(tmp_path / "syncd.toml", remote={"url": f"file://{remote}"},
                          watches=[{"path": str(tmp_path / "uploads"), "prefix": "uploads"}],
                          syncd={"ledger": str(tmp_path / "l.db"), "health_listen": ""})
    cmd[cmd.index("CONFIG")] = str(config)
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "remote not usable" in log.read_text() or p.poll() is not None, 60,
                     what="the remote's line")
        finally:
            p.terminate()
            p.wait(15)
    assert quote.replace("/srv/syncd-remote", str(remote)) in log.read_text(), log.read_text()


def test_the_start_timeout_is_finite_and_what_each_extension_gives() -> None:
    """Issue 25: with TimeoutStartSec=infinity a restore stopped by SIGSTOP held the app down for
    ever. The limit is finite; a startup that moves extends it by as much (EXTEND_TIMEOUT_USEC)."""
    from syncd.service.systemd import EXTEND_BY, EXTEND_EVERY

    for unit in ("syncd.service", "syncd@.service"):
        assert setting(unit, "TimeoutStartSec") == [f"{EXTEND_BY:.0f}s"], unit
    assert EXTEND_EVERY * 6 <= EXTEND_BY  # several looks fit in one extension


# --- sd_notify: a real socket --------------------------------------------------------------------


def short_dir(tmp_path: Path) -> Path:
    """An AF_UNIX path must fit in 108 bytes; pytest's tmp_path can be longer."""
    if len(str(tmp_path / "notify.sock")) < 100:
        return tmp_path
    return Path(tempfile.mkdtemp(prefix="sd", dir="/tmp"))


@dataclass
class Datagram:
    fields: list[str]
    at: float
    restored_then: bool  # were all the files back on disk when it arrived?


@dataclass
class NotifyListener:
    """systemd's side: receives sd_notify datagrams and evaluates `check` on each arrival."""

    sock: socket.socket
    check: object = None
    got: list[Datagram] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="test-notify-listener", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            ok = bool(self.check()) if callable(self.check) else False
            self.got.append(Datagram(data.decode().split("\n"), time.monotonic(), ok))

    def with_field(self, f: str) -> list[Datagram]:
        return [d for d in list(self.got) if f in d.fields]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[NotifyListener, str]]:
    path = short_dir(tmp_path) / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    lst = NotifyListener(s)
    yield lst, str(path)
    lst.close()


def test_run_notifies_ready_after_restore_then_watchdog_status_and_stopping(
        tmp_path: Path, listener: tuple[NotifyListener, str], syncd) -> None:
    lst, sock_path = listener
    root, ledger = tmp_path / "uploads", tmp_path / "state" / "ledger.db"
    config = write_config(tmp_path / "syncd.toml", remote={"url": f"file://{tmp_path / 'remote'}"},
                          watches=[{"path": str(root), "prefix": "uploads"}],
                          syncd={"ledger": str(ledger), "settle_seconds": 0, "workers": 4,
                                 "health_listen": "", "rescan_interval": 0})
    # enough files, some of them large, that a READY sent before the restore ended would be seen
    files = {f"d{i % 7}/sub/f{i:03d}.bin": os.urandom(1000 + i * 997) for i in range(120)}
    files.update({f"big/b{i}.bin": os.urandom(3_000_000) for i in range(4)})
    for rel, data in files.items():
        write_file(root / rel, data)
    r = syncd("--config", str(config), "resync")
    assert r.code == 0, r.err
    shutil.rmtree(root)
    root.mkdir()

    def all_back() -> bool:
        for rel, data in files.items():
            p = root / rel
            try:
                if p.stat().st_size != len(data) or p.read_bytes() != data:
                    return False
            except FileNotFoundError:
                return False
        return True

    lst.check = all_back
    d = DaemonProc(config, ledger, tmp_path / "daemon.log",
                   env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": ""})
    d.start()
    try:
        ready = wait_for(lambda: lst.with_field("READY=1") or not d.alive(), 60, what="READY=1")
        assert d.alive(), d.log()
        assert len(ready) == 1 and ready[0].restored_then, "READY=1 arrived before every file was back"
        # WATCHDOG=1 every WATCHDOG_USEC/2 from the pinger thread: several after READY
        wait_for(lambda: len([g for g in lst.with_field("WATCHDOG=1") if g.at > ready[0].at]) >= 3,
                 30, what="periodic WATCHDOG=1")
        statuses = [f for g in lst.got for f in g.fields if f.startswith("STATUS=")]
        assert "STATUS=restoring missing files" in statuses
        assert any(s.startswith("STATUS=watching") for s in statuses)
        assert not lst.with_field("STOPPING=1")
    finally:
        code = d.stop()
    assert code == 0, d.log()
    stopping = wait_for(lambda: lst.with_field("STOPPING=1"), 10, what="STOPPING=1")
    assert stopping[0].at > ready[0].at


# --- Notifier units --------------------------------------------------------------------------------


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    name = f"syncd-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(10)
    yield s, "@" + name
    s.close()


def test_notifier_sends_to_an_abstract_socket(abstract_socket) -> None:
    s, name = abstract_socket
    n = Notifier(env={"NOTIFY_SOCKET": name})
    try:
        assert n.enabled
        n.ready("watching; backlog 0")
        assert s.recv(4096) == b"READY=1\nSTATUS=watching; backlog 0"
        n.stopping()
        assert s.recv(4096) == b"STOPPING=1"
    finally:
        n.close()


def test_notifier_without_notify_socket_is_a_no_op() -> None:
    n = Notifier(env={})
    assert not n.enabled and n.send("READY=1") is False
    n.start_watchdog(lambda: True)  # nothing to ping: no thread
    assert n._pinger is None
    n.close()


def test_watchdog_honours_watchdog_pid(abstract_socket) -> None:
    _s, name = abstract_socket
    other = Notifier(env={"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    assert other.watchdog_usec == 0  # the watchdog is meant for another process
    mine = Notifier(env={"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_usec == 200000
    other.close()
    mine.close()


def test_watchdog_pings_only_while_healthy(abstract_socket) -> None:
    s, name = abstract_socket
    n = Notifier(env={"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "100000"})
    healthy = threading.Event()
    checks = []

    def check() -> bool:
        checks.append(healthy.is_set())
        return healthy.is_set()

    n.start_watchdog(check)
    try:
        wait_for(lambda: len(checks) >= 3, 10, what="watchdog checks while stuck")
        s.setblocking(False)
        with pytest.raises(BlockingIOError):
            s.recv(4096)  # stuck: three checks, no ping
        s.setblocking(True)
        healthy.set()
        assert s.recv(4096) == b"WATCHDOG=1"
    finally:
        n.close()
    assert n._pinger is not None and not n._pinger.is_alive()


def test_the_start_timeout_is_extended_only_while_the_startup_moves(abstract_socket) -> None:
    """Issue 25: a restore stopped by SIGSTOP kept the unit `activating` for ever. Extensions
    come while progress() changes (or is None: alive is enough), none while it stands still,
    and none after READY."""
    s, name = abstract_socket
    n = Notifier(env={"NOTIFY_SOCKET": name})
    n.extend_every = 0.02
    token: list[object] = [None]
    looks: list[object] = []

    def progress() -> object:
        looks.append(token[0])
        return token[0]

    n.keep_starting(progress)
    try:
        assert s.recv(4096) == b"EXTEND_TIMEOUT_USEC=90000000"  # None: alive is progress enough
        token[0] = 1  # a restore that moves once, then stands still
        wait_for(lambda: looks[-3:] == [1, 1, 1], 10, what="three looks at a standing restore")
        s.setblocking(False)
        while True:  # what was sent before it stood still
            try:
                s.recv(4096)
            except BlockingIOError:
                break
        seen = len(looks)
        wait_for(lambda: len(looks) >= seen + 3, 10, what="more looks")
        with pytest.raises(BlockingIOError):
            s.recv(4096)  # standing still: no extension
        s.setblocking(True)
        token[0] = 2
        assert s.recv(4096) == b"EXTEND_TIMEOUT_USEC=90000000"
        n.ready()
        assert s.recv(4096) == b"READY=1"
        assert n._keeper is not None
        n._keeper.join(5)
        assert not n._keeper.is_alive()
    finally:
        n.close()


def test_a_startup_restore_in_progress_extends_the_start_timeout(tmp_path: Path, monkeypatch) -> None:
    """Each restore that completes pushes the start's limit back (TimeoutStartSec is finite)."""
    from syncd.config import load_config
    from syncd.daemon import Daemon
    from syncd.remote.local import LocalRemote

    root, remote = tmp_path / "uploads", tmp_path / "remote"
    for i in range(3):
        write_file(remote / "uploads" / f"f{i}.txt", b"x" * 10)
    config = write_config(tmp_path / "syncd.toml", remote={"url": f"file://{remote}"},
                          watches=[{"path": str(root), "prefix": "uploads"}],
                          syncd={"ledger": str(tmp_path / "l.db"), "health_listen": "", "workers": 1,
                                 "rescan_interval": 0})
    gate = threading.Semaphore(0)  # one restore per release: the test decides when one completes
    real_get = LocalRemote.get

    def gated_get(self, key, dest, **kw):
        assert gate.acquire(timeout=60), "the test never released this restore"
        return real_get(self, key, dest, **kw)

    monkeypatch.setattr(LocalRemote, "get", gated_get)
    path = short_dir(tmp_path) / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    lst = NotifyListener(sock)
    notifier = Notifier(env={"NOTIFY_SOCKET": str(path)})
    notifier.extend_every = 0.02
    looks: list[int] = []  # the notifier's looks at the startup's progress
    real_progress = Daemon._startup_progress
    monkeypatch.setattr(Daemon, "_startup_progress", lambda self: looks.append(1) or real_progress(self))
    daemon = Daemon(load_config(str(config)), notifier=notifier)
    t = threading.Thread(target=daemon.run, name="test-daemon")
    t.start()

    def extensions() -> int:
        return len(lst.with_field("EXTEND_TIMEOUT_USEC=90000000"))

    def after_looks(n: int) -> None:
        seen = len(looks)
        wait_for(lambda: len(looks) >= seen + n, 30, what=f"{n} more looks at the progress")

    try:
        wait_for(lambda: daemon._restoring, 30, what="the startup restore to start")
        after_looks(10)  # the first restore hangs at the gate: nothing moves (10: what was sent is in)
        standing = extensions()
        after_looks(5)
        assert extensions() == standing, "extended while the restore stood still"
        for i in range(2):
            gate.release()  # restore i completes: the start's limit is pushed back
            wait_for(lambda b=standing: extensions() > b, 30, what=f"an extension after restore {i + 1}")
            assert not lst.with_field("READY=1"), "READY before the restore ended"
            after_looks(10)
            standing = extensions()
        gate.release()
        wait_for(lambda: lst.with_field("READY=1"), 30, what="READY=1")
        assert (root / "f2.txt").exists()
    finally:
        for _ in range(3):
            gate.release()
        daemon.stop.set()
        t.join(30)
        lst.close()


def test_sigterm_before_ready_still_exits_cleanly(tmp_path: Path, listener) -> None:
    """A stop during startup (remote unreachable) ends with STOPPING=1 and exit 0, no READY."""
    lst, sock_path = listener
    config = write_config(tmp_path / "syncd.toml",
                          remote={"url": "s3://no-such-bucket/x", "endpoint_url": "http://127.0.0.1:9"},
                          watches=[{"path": str(tmp_path / "w")}],
                          syncd={"ledger": str(tmp_path / "l.db"), "health_listen": ""})
    d = DaemonProc(config, tmp_path / "l.db", tmp_path / "daemon.log",
                   env={"NOTIFY_SOCKET": sock_path})
    d.start()
    try:
        wait_for(lambda: any("STATUS=waiting for the remote" in g.fields for g in lst.got) or not d.alive(),
                 60, what="waiting status")
        assert d.alive(), d.log()
    finally:
        code = d.stop()  # SIGTERM
    assert code == 0, d.log()
    wait_for(lambda: lst.with_field("STOPPING=1"), 10, what="STOPPING=1")
    assert not lst.with_field("READY=1")


def test_restored_files_follow_the_umask_so_the_app_group_can_read_them(tmp_path: Path) -> None:
    """The units run syncd as its own user with UMask=0007: a restored file must come out
    0660 (group-readable for the app), not mkstemp's private 0600."""
    root, remote = tmp_path / "uploads", tmp_path / "remote"
    write_file(remote / "uploads" / "a" / "photo.jpg", b"jpeg")
    config = write_config(tmp_path / "syncd.toml", remote={"url": f"file://{remote}"},
                          watches=[{"path": str(root), "prefix": "uploads"}],
                          syncd={"ledger": str(tmp_path / "l.db"), "health_listen": ""})
    p = subprocess.run([sys.executable, "-m", "syncd", "-q", "--config", str(config), "resync"],
                       capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.umask(0o007))
    assert p.returncode == 0, p.stderr
    assert (root / "a" / "photo.jpg").stat().st_mode & 0o777 == 0o660
    assert (root / "a").stat().st_mode & 0o777 == 0o770


def test_a_reload_rescan_is_logged_at_info_not_warning(tmp_path: Path) -> None:
    """`systemctl reload syncd` (SIGHUP) is an operator's request, not a problem: at WARNING it
    showed in every `journalctl -p warning` (issue 23)."""
    config = write_config(tmp_path / "syncd.toml", remote={"url": f"file://{tmp_path / 'remote'}"},
                          watches=[{"path": str(tmp_path / "uploads"), "prefix": "uploads"}],
                          syncd={"ledger": str(tmp_path / "l.db"), "health_listen": ""})
    d = DaemonProc(config, tmp_path / "l.db", tmp_path / "daemon.log").start()
    try:
        d.wait_ready()
        d.signal(signal.SIGHUP)
        wait_for(lambda: "rescan requested: SIGHUP" in d.log() or not d.alive(), 60, what="the rescan's line")
    finally:
        d.stop()
    line = next(x for x in d.log().splitlines() if "rescan requested: SIGHUP" in x)
    assert " INFO " in line and " WARNING " not in line, line
