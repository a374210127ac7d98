"""The command line: thin commands over the library; errors become one line and an exit code.

Exit codes (SPEC §3): 0 ok, 1 some files failed, 2 usage/config/ledger errors, 3 the remote
cannot be used at all, 130 interrupted. Tracebacks only with -v.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import click

from syncd import logs
from syncd.config import Config, load_config
from syncd.errors import ConfigError, Interrupted, SyncdError
from syncd.interrupt import stop_on_signals
from syncd.names import shown
from syncd.url_cmd import DEFAULT_EXPIRES, MAX_EXPIRES

log = logging.getLogger("syncd")
_state = {"verbose": 0}
MAX_LISTED = 20


class Ctx:
    def __init__(self, config_path: str | None, verbose: int, quiet: bool) -> None:
        self.config_path = config_path
        self.verbose = verbose
        self.quiet = quiet
        self._cfg: Config | None = None

    @property
    def cfg(self) -> Config:
        if self._cfg is None:
            try:
                self._cfg = load_config(self.config_path)
            except ConfigError as e:
                logs.use_format(e.log_format)
                raise
            level = self._cfg.log_level
            if self.verbose:
                level = "debug"
            elif self.quiet:
                level = "error"
            logs.setup(level, self._cfg.log_format)
        return self._cfg


pass_ctx = click.make_pass_decorator(Ctx)
CONFIG_HELP = "config file (else $SYNCD_CONFIG, ./syncd.toml, /etc/syncd/syncd.toml)"
VERBOSE_HELP = "debug logging (every transfer) and tracebacks"
QUIET_HELP = "only errors"
NO_PROGRESS_HELP = "no progress bar, even on a terminal (logs and the summary line only)"


def _late_option(ctx: click.Context, param: click.Parameter, value: object) -> None:
    """`--config`, `-v` and `-q` given after the command (SPEC §3): they update the group's
    settings, which are only read when the command first needs the config."""
    c = ctx.find_object(Ctx)
    if c is None or not value:
        return
    if param.name == "config_path":
        c.config_path = str(value)
    elif param.name == "verbose":
        c.verbose += int(value)  # type: ignore[call-overload]
        _state["verbose"] = c.verbose
    elif param.name == "quiet":
        c.quiet = True


def _late_options() -> list[click.Parameter]:
    return [
        click.Option(["--config", "config_path"], metavar="PATH", help=CONFIG_HELP, expose_value=False,
                     callback=_late_option),
        click.Option(["-v", "--verbose"], count=True, help=VERBOSE_HELP, expose_value=False,
                     callback=_late_option),
        click.Option(["-q", "--quiet"], is_flag=True, help=QUIET_HELP, expose_value=False,
                     callback=_late_option),
    ]


class _Group(click.Group):
    """Every command also accepts the global options after its name (`syncd resync -v`), as
    rclone and aws-cli users type them; commands added later get them too."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.extend(_late_options())
        super().add_command(cmd, name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="PATH", help=CONFIG_HELP)
@click.option("-v", "--verbose", count=True, help=VERBOSE_HELP)
@click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)
@click.version_option(package_name="syncd")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: int, quiet: bool) -> None:
    """syncd keeps upload directories safe in S3: it watches, records every change in a SQLite
    ledger, mirrors to S3 and restores missing files at start."""
    _state["verbose"] = verbose
    ctx.obj = Ctx(config_path, verbose, quiet)


# --- shared plumbing ---------------------------------------------------------------------------


@contextmanager
def locked_ledger(cfg: Config, role: str) -> Iterator:
    from syncd.ledger import Ledger
    from syncd.lock import LedgerLock

    lock = LedgerLock(cfg.ledger)
    lock.acquire(role)
    try:
        ledger = Ledger(cfg.ledger, config=cfg.path)
        try:
            ledger.recover()  # rows a stopped process left claimed (a full ledger disk) are given back
            yield ledger
        finally:
            ledger.close()
    finally:
        lock.release()


@contextmanager
def ledger_for(cfg: Config, role: str, *, dry_run: bool) -> Iterator:
    """The locked ledger; a dry run's changes nothing: no lock, no file made (syncd.dryrun)."""
    if dry_run:
        from syncd.dryrun import dry_run_ledger

        with dry_run_ledger(cfg) as ledger:
            yield ledger
    else:
        with locked_ledger(cfg, role) as ledger:
            yield ledger


@contextmanager
def _progress(c: Ctx, *, show: bool = True) -> Iterator:
    """A progress bar on a terminal (None otherwise: log lines only). While it shows, log lines
    are written above it (tqdm's logging redirect) instead of breaking it. Not with JSON logs:
    every stderr line is then a JSON object (SPEC §2), and a bar is not one."""
    if not show or c.quiet or logs.is_json() or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = tqdm(total=0, unit="file", file=sys.stderr, dynamic_ncols=True, leave=False)
    try:
        with logging_redirect_tqdm():
            yield bar
    finally:
        bar.close()


def _print_plan(kind: str, path: str) -> None:
    """A dry run's line per file (SPEC §3): `upload PATH`, `restore PATH`, `delete PATH`; on
    stdout, in text even with JSON logs: it is the command's product, like the summary line."""
    click.echo(f"{kind} {shown(path)}")


def _print_failures(failures: list[tuple[str, str]], total: int) -> None:
    for what, why in failures[:MAX_LISTED]:
        click.echo(logs.stderr_line(f"failed: {what}: {why}"), err=True)
    if total > MAX_LISTED:
        click.echo(logs.stderr_line(f"... and {total - MAX_LISTED} more (see `syncd status`)"), err=True)


def _ts(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- commands -----------------------------------------------------------------------------------


@cli.command()
@pass_ctx
def run(c: Ctx) -> None:
    """The daemon: check remote, restore missing, upload what changed while down, then watch.

    Stops cleanly on SIGTERM or SIGINT (exit 0). Remote problems never stop it: they are
    reported (log, /healthz, status) and retried.
    """
    import signal

    from syncd.daemon import Daemon
    from syncd.interrupt import set_from_handler

    cfg = c.cfg
    daemon = Daemon(cfg)

    def on_signal(signum: int, _frame: object) -> None:
        if not daemon.stop.is_set():
            log.info("received %s; stopping", signal.Signals(signum).name)
        set_from_handler(daemon.stop)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: daemon.request_rescan("SIGHUP", asked=True))
    sys.exit(daemon.run())


@cli.command()
@click.option("--dry-run", is_flag=True, help="show what would happen; change nothing")
@click.option("--no-restore", is_flag=True, help="do not download files missing locally")
@click.option("--no-upload", is_flag=True, help="do not upload new or changed files")
@click.option("--verify", is_flag=True, help="also HEAD every synced object and re-upload bad ones")
@click.option("--no-progress", is_flag=True, help=NO_PROGRESS_HELP)
@pass_ctx
def resync(c: Ctx, dry_run: bool, no_restore: bool, no_upload: bool, verify: bool, no_progress: bool) -> None:
    """Check the remote, restore missing files, upload what changed; then exit."""
    from syncd.engine import Engine
    from syncd.remote import open_remote

    cfg = c.cfg
    with stop_on_signals(threading.Event()) as stop, ledger_for(cfg, "resync", dry_run=dry_run) as ledger:
        remote = open_remote(cfg)
        try:
            with _progress(c, show=not (dry_run or no_progress)) as bar:
                def total(n: int) -> None:
                    if bar is not None:
                        bar.total = n
                        bar.refresh()

                # `is not None`: a bar whose total is still 0 is falsy (PITFALLS §9)
                engine = Engine(cfg, ledger, remote, oneshot=True, stop=stop,
                                on_progress=bar.update if bar is not None else None,
                                on_plan=_print_plan if dry_run else None)
                summary = engine.reconcile(restore=not no_restore, upload=not no_upload, verify=verify,
                                           dry_run=dry_run, on_total=total)
        finally:
            remote.close()
    _print_failures(summary.failures, summary.failed)
    click.echo(summary.line())
    if cfg.healthcheck_url and not dry_run:
        from syncd.healthcheck import ping

        ping(cfg.healthcheck_url, summary.failed == 0)
    if summary.failed:
        sys.exit(1)


@cli.command()
@click.option("--to", "to_dir", metavar="DIR", help="write DIR/<watch prefix>/<path>; the ledger is untouched")
@click.option("--overwrite", is_flag=True, help="replace files that exist locally")
@click.option("--dry-run", is_flag=True, help="list what would be restored")
@click.option("--at", "at", metavar="TIME", help="as the files were at TIME (ISO 8601, or an age: 30m, 2h, 3d); "
              "versioned S3 buckets")
@click.option("--no-progress", is_flag=True, help=NO_PROGRESS_HELP)
@click.argument("globs", nargs=-1)
@pass_ctx
def restore(c: Ctx, to_dir: str | None, overwrite: bool, dry_run: bool, at: str | None, no_progress: bool,
            globs: tuple[str, ...]) -> None:
    """Download from the remote; by default only files missing locally.

    Unlike the automatic restore at start, this also brings back files whose deletion the
    ledger recorded: it is how an operator undoes an app's deletion.
    """
    from syncd.remote import open_remote
    from syncd.restore_cmd import restore_in_place, restore_to

    cfg = c.cfg
    bar_shown = not (dry_run or no_progress)
    when = None
    if at is not None:
        from syncd.restore_at import parse_time

        when = parse_time(at)
    remote = open_remote(cfg)
    try:
        if when is not None:
            from syncd.restore_at import restore_at

            plan = _print_plan if dry_run else None
            with _progress(c, show=bar_shown) as bar:
                if to_dir:
                    summary = restore_at(cfg, remote, when, to_dir=Path(to_dir), globs=globs, overwrite=overwrite,
                                         dry_run=dry_run, progress=bar, on_plan=plan)
                else:
                    with ledger_for(cfg, "restore", dry_run=dry_run) as ledger:
                        summary = restore_at(cfg, remote, when, ledger=ledger, globs=globs, overwrite=overwrite,
                                             dry_run=dry_run, progress=bar, on_plan=plan)
        elif to_dir:
            summary = restore_to(cfg, remote, Path(to_dir), globs=globs, overwrite=overwrite, dry_run=dry_run,
                                 on_plan=_print_plan)
        else:
            with stop_on_signals(threading.Event()) as stop, ledger_for(cfg, "restore", dry_run=dry_run) as ledger, \
                    _progress(c, show=bar_shown) as bar:
                summary = restore_in_place(cfg, ledger, remote, globs=globs, overwrite=overwrite,
                                           dry_run=dry_run, progress=bar, on_plan=_print_plan, stop=stop)
    finally:
        remote.close()
    _print_failures(summary.failures, summary.failed)
    click.echo(summary.line())
    if summary.failed:
        sys.exit(1)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="one JSON object (the same as GET /status)")
@pass_ctx
def status(c: Ctx, as_json: bool) -> None:
    """Per watch: counts by state, backlog, failures, last success; and whether a daemon runs."""
    from syncd.status import collect, render_text

    data = collect(c.cfg)
    if as_json:
        click.echo(json.dumps(data, indent=None))
    else:
        click.echo(render_text(data, time.time()))


@cli.command()
@pass_ctx
def check(c: Ctx) -> None:
    """Validate the config and probe the remote: list, put, head, get, delete (exit 3 on any failure)."""
    from syncd.check import probe_key, run_check
    from syncd.iam import policy
    from syncd.remote import open_remote

    cfg = c.cfg
    click.echo(f"config ok: {shown(cfg.path)}")
    remote = open_remote(cfg)
    try:
        click.echo(f"remote: {remote.name} (probe object {probe_key(cfg)})")
        probes = run_check(cfg, remote)
        for p in probes:
            click.echo(f"{p.name:<7} {p.outcome}")
        _hygiene(cfg, remote, probes)
    finally:
        remote.close()
    if all(p.ok for p in probes):
        click.echo("all checks passed")
        return
    denied = sorted({p.action for p in probes if p.denied})
    if denied and cfg.remote.scheme == "s3":
        click.echo(f"missing permission: {', '.join(denied)}; syncd needs this least-privilege policy:")
        click.echo(json.dumps(policy(cfg), indent=2))
    sys.exit(3)


def _hygiene(cfg: Config, remote, probes) -> None:
    """`check`'s bucket hygiene lines (advice only: they never change the exit code)."""
    from syncd.hygiene import section

    for line in section(cfg, remote, probes):
        click.echo(line)


@cli.command()
@click.option("--expires", type=click.IntRange(1, MAX_EXPIRES), default=DEFAULT_EXPIRES, show_default=True,
              metavar="SECONDS", help=f"how long the URL works (at most {MAX_EXPIRES}, 7 days)")
@click.argument("path")
@pass_ctx
def url(c: Ctx, expires: int, path: str) -> None:
    """Print a presigned GET URL for a synced file (S3 remotes; exit 1 when it is not synced)."""
    from syncd.url_cmd import presigned_url

    click.echo(presigned_url(c.cfg, path, expires))


@cli.command("iam-policy")
@pass_ctx
def iam_policy(c: Ctx) -> None:
    """Print the least-privilege IAM policy JSON for this config."""
    from syncd.iam import policy

    cfg = c.cfg
    if cfg.remote.scheme != "s3":
        log.warning("the remote is %s, not S3: the policy below applies once you switch to S3", cfg.remote.url)
    click.echo(json.dumps(policy(cfg), indent=2))


@cli.command()
@click.option("--all", "all_", is_flag=True, help="every failed file (the default)")
@click.option("--deletes", is_flag=True, help="release deletions paused by max_deletes or by mass remote deletions")
@click.argument("paths", nargs=-1)
@pass_ctx
def retry(c: Ctx, all_: bool, deletes: bool, paths: tuple[str, ...]) -> None:
    """Re-queue failed files now; a running daemon picks them up within seconds."""
    from syncd.keys import ledger_name
    from syncd.ledger import Ledger

    cfg = c.cfg
    if not cfg.ledger.exists():
        click.echo("nothing to retry (no ledger yet)")
        return
    ledger = Ledger(cfg.ledger, config=cfg.path)
    try:
        if deletes:
            from syncd.guard import release

            was, local = release(ledger)
            click.echo(f"remote deletions released (were paused: {was})" if was else
                       "remote deletions were not paused")
            if local:
                click.echo(f"released {local} local deletions that remote deletion events had paused")
            if not paths and not all_:
                return
        n = 0
        if paths:
            targets = []  # all checked before any is re-queued: a typo is a usage error, not "0"
            for raw in paths:
                p = Path(raw).absolute()
                for w in cfg.watches:
                    try:
                        rel_parts = p.relative_to(w.path).parts
                    except ValueError:
                        continue
                    targets.append((w.prefix, "/".join(ledger_name(x) for x in rel_parts)))
                    break
                else:
                    raise ConfigError(f"{raw} is not inside any watched directory")
                if not _known(ledger, *targets[-1]):
                    raise ConfigError(f"{p}: the ledger knows no file there (check the path); nothing re-queued")
            n = sum(ledger.requeue_failed(prefix, rel) for prefix, rel in targets)
        else:
            n = ledger.requeue_failed()
    finally:
        ledger.close()
    click.echo(f"re-queued {n} failed files")


def _known(ledger, prefix: str, rel: str) -> bool:
    """Whether the ledger has a row for `rel` or under it (a watch's root always counts)."""
    return not rel or bool(ledger.query(
        "SELECT 1 FROM files WHERE watch=? AND (path=? OR (path>=? AND path<?)) LIMIT 1",
        [prefix, rel, rel + "/", rel + "0"]))  # "0" sorts right after "/"


@cli.command()
@click.argument("action", type=click.Choice(["install", "remove", "start", "stop"]))
@pass_ctx
def service(c: Ctx, action: str) -> None:
    """Windows only: install, remove, start or stop the syncd Windows service."""
    if sys.platform != "win32":
        raise ConfigError("`syncd service` is Windows-only; on Linux use the systemd units in packaging/systemd")
    from syncd.service.windows import handle_service_command  # pragma: no cover

    # only install needs the config: a broken config must not block removing the service
    cfg = c.cfg if action == "install" else None  # pragma: no cover
    click.echo(handle_service_command(action, cfg))  # pragma: no cover


def main(argv: list[str] | None = None) -> None:
    logs.use_format("text")  # until a config says otherwise (in-process callers run several commands)
    try:
        cli.main(args=argv, prog_name="syncd", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo(logs.stderr_line("syncd: interrupted", logging.WARNING), err=True)
        sys.exit(130)
    except click.ClickException as e:
        if logs.is_json():
            click.echo(logs.stderr_line(f"syncd: error: {e.format_message()}"), err=True)
        else:
            e.show()
        sys.exit(2 if e.exit_code not in (0, 1) else e.exit_code)
    except KeyboardInterrupt:
        click.echo(logs.stderr_line("syncd: interrupted", logging.WARNING), err=True)
        sys.exit(130)
    except Interrupted as e:
        click.echo(logs.stderr_line(f"syncd: {e}", logging.WARNING), err=True)
        sys.exit(e.exit_code)
    except SyncdError as e:
        _error_line(f"syncd: error: {e}")
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        _error_line(f"syncd: internal error: {type(e).__name__}: {e} (run with -v for details)")
        sys.exit(1)


def _error_line(text: str) -> None:
    """The one error line (escaped: an error may quote a name); with -v, the traceback before it
    in text, or in the line's own JSON object (`exc`) with JSON logs."""
    verbose = bool(_state["verbose"])
    if verbose and not logs.is_json():
        click.echo(logs.shown_lines(traceback.format_exc().rstrip("\n")), err=True)
    click.echo(logs.stderr_line(text, exc=verbose), err=True)


def entry() -> None:
    """The `syncd` command: `main`, then a quick exit.

    Once `main` returns everything is written and closed (each ledger commit is durable when it
    returns), so the interpreter's teardown of botocore's and click's modules, 60 ms of a 1.5 s
    resync, is skipped. Not while other non-daemon threads run (they would be cut off)."""
    try:
        main()
        code = 0
    except SystemExit as e:
        if e.code is not None and not isinstance(e.code, int):
            raise
        code = e.code or 0
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a closed pipe (`syncd status | head`): nothing more can be said
        pass
    os._exit(code)


if __name__ == "__main__":
    entry()
