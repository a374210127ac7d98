"""The Windows service class, on Linux: pywin32's modules are replaced by small fakes.

The fakes keep only what syncd.service.windows uses, with pywin32's behaviour where it matters:
`ServiceFramework.SvcRun` reports RUNNING, calls SvcDoRun, then reports STOP_PENDING (pywin32
312 source), and the SCM delivers a stop by calling SvcStop on another thread.
"""

from __future__ import annotations

import importlib
import sqlite3
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from syncd.errors import SyncdError
from syncd.lock import LedgerLock
from tests.conftest import wait_for, write_config
from tests.daemon_util import write_file

STOPPED, START_PENDING, STOP_PENDING, RUNNING = 1, 2, 3, 4
AUTO_START = 2


class FakeWinError(Exception):
    """pywintypes.error: (winerror, funcname, strerror)."""

    def __init__(self, winerror: int, funcname: str, strerror: str) -> None:
        super().__init__(winerror, funcname, strerror)
        self.winerror, self.funcname, self.strerror = winerror, funcname, strerror


class Win32:
    """The fake modules and what was done through them."""

    def __init__(self) -> None:
        self.registry: dict[tuple[str, str], Any] = {}
        self.calls: list[tuple[str, tuple, dict]] = []
        self.events: list[tuple[str, Any]] = []
        self.fail: dict[str, FakeWinError] = {}  # function name -> error to raise once

        svc = types.ModuleType("win32service")
        svc.error = FakeWinError  # type: ignore[attr-defined]
        svc.SERVICE_STOPPED, svc.SERVICE_START_PENDING = STOPPED, START_PENDING  # type: ignore[attr-defined]
        svc.SERVICE_STOP_PENDING, svc.SERVICE_RUNNING = STOP_PENDING, RUNNING  # type: ignore[attr-defined]
        svc.SERVICE_AUTO_START = AUTO_START  # type: ignore[attr-defined]
        self.win32service = svc

        sm = types.ModuleType("servicemanager")
        sm.EVENTLOG_INFORMATION_TYPE, sm.PYS_SERVICE_STARTED, sm.PYS_SERVICE_STOPPED = 4, 1, 2  # type: ignore[attr-defined]
        sm.LogMsg = lambda kind, msg_id, inserts: self.events.append(("msg", msg_id))  # type: ignore[attr-defined]
        sm.LogErrorMsg = lambda text: self.events.append(("error", text))  # type: ignore[attr-defined]
        sm.LogInfoMsg = lambda text: self.events.append(("info", text))  # type: ignore[attr-defined]
        self.servicemanager = sm

        util = types.ModuleType("win32serviceutil")

        class ServiceFramework:
            def __init__(self, args: list[str]) -> None:
                self.ssh = object()
                self.statuses: list[tuple[int, int]] = []

            def ReportServiceStatus(self, status: int, waitHint: int = 5000, win32ExitCode: int = 0,
                                    svcExitCode: int = 0) -> None:
                self.statuses.append((status, waitHint))

            def SvcRun(self) -> None:
                self.ReportServiceStatus(RUNNING)
                self.SvcDoRun()
                self.ReportServiceStatus(STOP_PENDING)

        util.ServiceFramework = ServiceFramework  # type: ignore[attr-defined]
        util.GetServiceCustomOption = (  # type: ignore[attr-defined]
            lambda name, option, default=None: self.registry.get((name, option), default))

        def set_option(name: str, option: str, value: Any) -> None:
            self.registry[(name, option)] = value

        util.SetServiceCustomOption = set_option  # type: ignore[attr-defined]
        for fn in ("InstallService", "ChangeServiceConfig", "RemoveService", "StartService", "StopService",
                   "WaitForServiceStatus"):
            setattr(util, fn, self._recorder(fn))
        self.win32serviceutil = util

    def _recorder(self, fn: str):
        def call(*args: Any, **kwargs: Any) -> None:
            self.calls.append((fn, args, kwargs))
            if fn in self.fail:
                raise self.fail.pop(fn)
        return call

    def called(self) -> list[str]:
        return [c[0] for c in self.calls]


@pytest.fixture
def win32(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[Win32, Any]]:
    fake = Win32()
    for name in ("win32service", "win32serviceutil", "servicemanager"):
        monkeypatch.setitem(sys.modules, name, getattr(fake, name))
    monkeypatch.setenv("PROGRAMDATA", str(tmp_path / "ProgramData"))
    sys.modules.pop("syncd.service.windows", None)
    mod = importlib.import_module("syncd.service.windows")
    yield fake, mod
    # the module was bound to the fakes: never leave it for another test
    sys.modules.pop("syncd.service.windows", None)
    import syncd.service

    if hasattr(syncd.service, "windows"):
        delattr(syncd.service, "windows")


def make_config(tmp_path: Path, n_files: int = 0) -> tuple[Path, Path, Path, dict[str, bytes]]:
    """A file:// setup; with n_files, they are in the remote and missing locally (to restore)."""
    root, ledger, remote = tmp_path / "uploads", tmp_path / "state" / "ledger.db", tmp_path / "remote"
    files = {f"d{i % 3}/f{i}.bin": bytes([i % 256]) * (1000 + i) for i in range(n_files)}
    for rel, data in files.items():
        write_file(remote / "uploads" / rel, data)
    cfg = write_config(tmp_path / "syncd.toml", remote={"url": f"file://{remote}"},
                       watches=[{"path": str(root), "prefix": "uploads"}],
                       syncd={"ledger": str(ledger), "settle_seconds": 0, "workers": 2,
                              "health_listen": "", "rescan_interval": 0})
    return cfg, root, ledger, files


class SCM:
    """Runs the service as pythonservice.exe would: SvcRun on its own thread."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="test-service-main", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            self.service.SvcRun()
        except BaseException as e:  # noqa: BLE001 - pywin32's C framework catches it the same way
            self.error = e


def test_stop_request_ends_the_daemon_cleanly_within_the_stop_timeout(tmp_path: Path, win32) -> None:
    fake, mod = win32
    cfg, root, ledger, files = make_config(tmp_path, n_files=30)
    fake.registry[("syncd", "ConfigPath")] = str(cfg)
    svc = mod.SyncdService(["syncd"])
    scm = SCM(svc)
    wait_for(lambda: (svc.daemon is not None and svc.daemon.phase == "running") or not scm.thread.is_alive(),
             60, what="the daemon to be ready")
    assert scm.thread.is_alive(), scm.error
    for rel, data in files.items():  # the restore ran before readiness
        assert (root / rel).read_bytes() == data

    svc.SvcStop()  # what the SCM's control handler does on "net stop syncd"
    scm.thread.join(mod.STOP_WAIT)
    assert not scm.thread.is_alive(), "the service did not stop within its stop timeout"
    assert scm.error is None, repr(scm.error)

    states = [s for s, _hint in svc.statuses]
    assert states[0] == RUNNING
    assert states[1] == STOP_PENDING and svc.statuses[1][1] == int(mod.STOP_WAIT * 1000)
    assert set(states[1:]) == {STOP_PENDING}  # then the C framework reports STOPPED
    assert fake.events[0] == ("msg", 1) and fake.events[-1] == ("msg", 2)  # started, stopped
    assert not [e for e in fake.events if e[0] == "error"]
    # a clean stop: nothing left uploading, the ledger lock released, logs in the rotating file
    con = sqlite3.connect(ledger)
    try:
        assert con.execute("SELECT count(*) FROM files WHERE state='uploading'").fetchone()[0] == 0
    finally:
        con.close()
    lock = LedgerLock(ledger)
    lock.acquire("test")
    lock.release()
    log_text = (tmp_path / "ProgramData" / "syncd" / "logs" / "syncd.log").read_text()
    assert "service starting with config" in log_text and "service stopped" in log_text


def test_a_bad_config_fails_the_service_with_one_line_in_the_event_log(tmp_path: Path, win32) -> None:
    fake, mod = win32
    bad = tmp_path / "bad.toml"
    bad.write_text("[remote]\nurl = 'file:///x'\naws_secret_access_key = 'hunter2'\n")
    fake.registry[("syncd", "ConfigPath")] = str(bad)
    svc = mod.SyncdService(["syncd"])
    with pytest.raises(RuntimeError, match="aws_secret_access_key"):
        svc.SvcRun()
    errors = [text for kind, text in fake.events if kind == "error"]
    assert len(errors) == 1 and "hunter2" not in errors[0] and "\n" not in errors[0]


def test_a_daemon_that_ends_on_its_own_is_a_service_failure(tmp_path: Path, win32) -> None:
    """A second syncd on the ledger is refused: the service must not report a clean stop."""
    fake, mod = win32
    cfg, _root, ledger, _files = make_config(tmp_path)
    fake.registry[("syncd", "ConfigPath")] = str(cfg)
    other = LedgerLock(ledger)
    other.acquire("run")
    try:
        svc = mod.SyncdService(["syncd"])
        with pytest.raises(RuntimeError, match="another syncd"):
            svc.SvcRun()
    finally:
        other.release()


def test_install_records_the_config_and_updates_an_existing_service(tmp_path: Path, win32) -> None:
    fake, mod = win32
    cfg_path, *_ = make_config(tmp_path)
    from syncd.config import load_config

    cfg = load_config(cfg_path)
    line = mod.handle_service_command("install", cfg)
    assert "installed" in line and str(cfg.path) in line
    fn, args, kwargs = fake.calls[0]
    assert fn == "InstallService" and args[0] == "syncd.service.windows.SyncdService" and args[1] == "syncd"
    assert kwargs["startType"] == AUTO_START
    assert fake.registry[("syncd", "ConfigPath")] == str(cfg.path)

    fake.fail["InstallService"] = FakeWinError(1073, "CreateService", "The specified service already exists.")
    assert "updated" in mod.handle_service_command("install", cfg)
    assert fake.called()[-1] == "ChangeServiceConfig"


def test_start_stop_remove_and_their_errors(tmp_path: Path, win32) -> None:
    fake, mod = win32
    cfg_path, *_ = make_config(tmp_path)
    from syncd.config import load_config

    cfg = load_config(cfg_path)
    assert "started" in mod.handle_service_command("start", cfg)
    assert fake.called() == ["StartService", "WaitForServiceStatus"]
    assert "stopped" in mod.handle_service_command("stop", cfg)
    fake.fail["StopService"] = FakeWinError(1062, "ControlService", "The service has not been started.")
    assert "not running" in mod.handle_service_command("stop", cfg)
    fake.fail["StopService"] = FakeWinError(1062, "ControlService", "The service has not been started.")
    assert "removed" in mod.handle_service_command("remove", cfg)
    assert fake.called()[-1] == "RemoveService"
    fake.fail["InstallService"] = FakeWinError(5, "OpenSCManager", "Access is denied.")
    with pytest.raises(SyncdError, match=r"Access is denied\. \(5\); run it from an elevated"):
        mod.handle_service_command("install", cfg)


def test_cli_service_install_on_windows_prints_one_line(tmp_path: Path, win32, monkeypatch, syncd) -> None:
    fake, _mod = win32
    cfg_path, *_ = make_config(tmp_path)
    monkeypatch.setattr(sys, "platform", "win32")  # only cli's "Windows-only" check reads it here
    r = syncd("--config", str(cfg_path), "service", "install")
    assert r.code == 0, r.err
    assert len(r.out.strip().splitlines()) == 1 and "installed" in r.out
    assert fake.registry[("syncd", "ConfigPath")] == str(cfg_path)
