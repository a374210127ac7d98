"""The Windows service: `syncd run` under the Service Control Manager (pywin32).

Imported only on Windows (by `syncd service ...` and by pythonservice.exe, which hosts
`SyncdService`), so the win32 modules are imported at the top of this module and nowhere else.

- The config path is stored in the service's registry parameters
  (HKLM\\SYSTEM\\CurrentControlSet\\Services\\syncd\\Parameters, value `ConfigPath`) by
  `syncd --config PATH service install`; without it the service uses the default location,
  %PROGRAMDATA%\\syncd\\syncd.toml.
- A service has no console: logs go to a rotating file under %PROGRAMDATA%\\syncd\\logs, and
  start/stop/failure also to the Windows event log.
- The service reports RUNNING at once (pywin32's default), not after the startup restore:
  a START_PENDING service accepts no stop request, and a restore can take hours. Readiness
  is in `syncd status` and /healthz (503 "starting" until the restore is done).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import threading
import time
from pathlib import Path

import servicemanager
import win32service
import win32serviceutil

from syncd import logs
from syncd.config import Config, load_config
from syncd.daemon import STOP_TIMEOUT, Daemon
from syncd.errors import SyncdError

log = logging.getLogger(__name__)

SERVICE_NAME = "syncd"
CLASS_STRING = f"{__name__}.SyncdService"
CONFIG_OPTION = "ConfigPath"
# The daemon ends within STOP_TIMEOUT of the stop request; a little more for the ledger and logs.
STOP_WAIT = STOP_TIMEOUT + 5.0
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5
ERROR_SERVICE_EXISTS = 1073
ERROR_SERVICE_NOT_ACTIVE = 1062
ERROR_SERVICE_ALREADY_RUNNING = 1056
ERROR_ACCESS_DENIED = 5


def log_dir() -> Path:
    return Path(os.environ.get("PROGRAMDATA", r"C:\ProgramData")) / "syncd" / "logs"


def setup_file_logging(cfg: Config, directory: Path | None = None) -> logging.Handler:
    """The service's logging: the config's level and format, into a rotating file."""
    directory = directory or log_dir()
    directory.mkdir(parents=True, exist_ok=True)
    logs.setup(cfg.log_level, cfg.log_format)  # levels, quiet third-party loggers, formatter choice
    root = logging.getLogger()
    stream = [h for h in root.handlers if getattr(h, "_syncd", False)]
    handler = logging.handlers.RotatingFileHandler(directory / "syncd.log", maxBytes=LOG_MAX_BYTES,
                                                   backupCount=LOG_BACKUPS, encoding="utf-8")
    handler.setFormatter(stream[0].formatter if stream else logging.Formatter())
    for h in stream:  # pythonservice.exe has no usable stderr: the file replaces the stream
        root.removeHandler(h)
    handler._syncd = True  # type: ignore[attr-defined]  # replaced, not doubled, by a later setup
    root.addHandler(handler)
    return handler


class SyncdService(win32serviceutil.ServiceFramework):
    _svc_name_ = SERVICE_NAME
    _svc_display_name_ = "syncd"
    _svc_description_ = "Keeps upload directories safe in S3: watches, uploads, restores missing files."

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        self.stop_event = threading.Event()
        self.stop_requested = False
        self.daemon: Daemon | None = None

    # --- called on the SCM's control-handler thread ---------------------------------------
    def SvcStop(self) -> None:
        # STOP_PENDING first, with the time the daemon may take, so the SCM does not give up
        self.stop_requested = True
        self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=int(STOP_WAIT * 1000))
        self.stop_event.set()

    def SvcShutdown(self) -> None:
        # system shutdown: the same clean stop (only delivered because this method exists)
        self.SvcStop()

    # --- called on the service's main thread, after pywin32's SvcRun reported RUNNING ----
    def SvcDoRun(self) -> None:
        servicemanager.LogMsg(servicemanager.EVENTLOG_INFORMATION_TYPE, servicemanager.PYS_SERVICE_STARTED,
                              (self._svc_name_, ""))
        handler: logging.Handler | None = None
        try:
            config = win32serviceutil.GetServiceCustomOption(self._svc_name_, CONFIG_OPTION, None)
            cfg = load_config(config or None)
            handler = setup_file_logging(cfg)
            log.info("service starting with config %s", cfg.path)
            error = self._run_daemon(cfg)
        except SyncdError as e:  # a bad config or a locked ledger: one line, as on the command line
            error = str(e)
        finally:
            if handler is not None:
                logging.getLogger().removeHandler(handler)
                handler.close()
        if error:
            servicemanager.LogErrorMsg(f"syncd: {error}")
            # raising makes pywin32 report SERVICE_STOPPED with an error code, which is what the
            # service's recovery actions ("restart on failure") react to
            raise RuntimeError(f"syncd stopped: {error}")
        servicemanager.LogMsg(servicemanager.EVENTLOG_INFORMATION_TYPE, servicemanager.PYS_SERVICE_STOPPED,
                              (self._svc_name_, ""))

    def _run_daemon(self, cfg: Config) -> str | None:
        """Run the daemon in a thread until it ends; None after a requested, clean stop.

        The thread lets this one keep the SCM informed (STOP_PENDING checkpoints) and return
        after STOP_WAIT even if a transfer hangs, instead of the SCM declaring us hung.
        """
        self.daemon = Daemon(cfg, stop=self.stop_event)
        outcome: dict[str, object] = {}

        def target() -> None:
            try:
                outcome["code"] = self.daemon.run()  # type: ignore[union-attr]
            except SyncdError as e:
                outcome["error"] = str(e)
            except Exception as e:  # noqa: BLE001 - the thread's end: record it for SvcDoRun
                log.exception("daemon failed")
                outcome["error"] = f"internal error: {type(e).__name__}: {e}"

        # daemon=True: if the stop times out, the process may still exit (transfers are
        # aborted; the ledger makes the next start finish them)
        t = threading.Thread(target=target, name="syncd-service-daemon", daemon=True)
        t.start()
        while t.is_alive() and not self.stop_requested:
            t.join(1.0)
        deadline = time.monotonic() + STOP_WAIT
        while t.is_alive() and time.monotonic() < deadline:
            t.join(1.0)
            if t.is_alive():  # still stopping: a new checkpoint tells the SCM we are not hung
                self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=int(STOP_WAIT * 1000))
        if t.is_alive():
            log.error("the daemon did not stop within %.0fs; exiting anyway", STOP_WAIT)
            return None
        if "error" in outcome:
            return str(outcome["error"])
        if not self.stop_requested:
            return f"the daemon ended without a stop request (exit {outcome.get('code')})"
        log.info("service stopped")
        return None


# --- `syncd service install|remove|start|stop` ----------------------------------------------


def _describe(e: Exception) -> str:
    code = getattr(e, "winerror", None)
    text = getattr(e, "strerror", None) or str(e)
    hint = "; run it from an elevated (Administrator) prompt" if code == ERROR_ACCESS_DENIED else ""
    return f"{text} ({code}){hint}" if code is not None else f"{text}{hint}"


def handle_service_command(action: str, cfg: Config | None) -> str:
    """Install, remove, start or stop the service; returns the line to print.

    `install` records `cfg.path` as the service's config and sets it to start automatically;
    on an installed service it updates the config path (and the Python class).
    """
    name = SERVICE_NAME
    try:
        if action == "install":
            assert cfg is not None, "install needs the config"
            try:
                win32serviceutil.InstallService(
                    CLASS_STRING, name, SyncdService._svc_display_name_,
                    startType=win32service.SERVICE_AUTO_START,
                    description=SyncdService._svc_description_)
                done = "installed"
            except win32service.error as e:
                if getattr(e, "winerror", None) != ERROR_SERVICE_EXISTS:
                    raise
                win32serviceutil.ChangeServiceConfig(
                    CLASS_STRING, name, startType=win32service.SERVICE_AUTO_START,
                    description=SyncdService._svc_description_)
                done = "updated"
            win32serviceutil.SetServiceCustomOption(name, CONFIG_OPTION, str(cfg.path))
            return (f"service {name} {done}: config {cfg.path}, logs in {log_dir()}; "
                    f"start it with `syncd service start`")
        if action == "remove":
            try:
                win32serviceutil.StopService(name)
                win32serviceutil.WaitForServiceStatus(name, win32service.SERVICE_STOPPED, int(STOP_WAIT) + 5)
            except win32service.error as e:
                if getattr(e, "winerror", None) != ERROR_SERVICE_NOT_ACTIVE:
                    raise
            win32serviceutil.RemoveService(name)
            return f"service {name} removed"
        if action == "start":
            try:
                win32serviceutil.StartService(name)
            except win32service.error as e:
                if getattr(e, "winerror", None) != ERROR_SERVICE_ALREADY_RUNNING:
                    raise
                return f"service {name} is already running"
            win32serviceutil.WaitForServiceStatus(name, win32service.SERVICE_RUNNING, 30)
            return f"service {name} started (logs in {log_dir()})"
        if action == "stop":
            try:
                win32serviceutil.StopService(name)
            except win32service.error as e:
                if getattr(e, "winerror", None) != ERROR_SERVICE_NOT_ACTIVE:
                    raise
                return f"service {name} is not running"
            win32serviceutil.WaitForServiceStatus(name, win32service.SERVICE_STOPPED, int(STOP_WAIT) + 5)
            return f"service {name} stopped"
    except win32service.error as e:
        raise SyncdError(f"service {action} failed: {_describe(e)}") from e
    raise SyncdError(f"unknown service action {action!r}")
