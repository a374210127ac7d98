"""Config loading and validation (SPEC §2).

Every error names the key and the file, and never echoes a secret's value.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from syncd.access import normalize_host
from syncd.bwlimit import parse_rate
from syncd.errors import ConfigError
from syncd.keys import check_prefix

DEFAULT_EXCLUDE = ("*.tmp", "*.part", "*.swp", "*~", ".#*")
SECRET_KEYS = frozenset(
    {
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "access_key",
        "access_key_id",
        "secret_key",
        "secret_access_key",
        "session_token",
        "password",
        "secret",
    }
)
LOG_LEVELS = ("debug", "info", "warning", "error")
HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?")  # DNS labels; no port, scheme or "*"


@dataclass(frozen=True)
class WatchConfig:
    path: Path
    prefix: str
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    on_delete: str = "keep"
    restore: bool = True
    follow_symlinks: bool = False
    observer: str = "native"
    mode: str = "backup"  # backup | shared (several hosts write this prefix, SPEC §4.12)
    upload_on_close: bool = True  # a file its writer closed is due at once (SPEC §4.1)


@dataclass(frozen=True)
class RemoteConfig:
    url: str
    scheme: str  # "s3" | "file"
    bucket: str = ""  # s3 only
    prefix: str = ""  # s3 only: key prefix, no leading or trailing "/"
    root: Path | None = None  # file only
    endpoint_url: str = ""
    region: str = ""
    profile: str = ""
    storage_class: str = ""
    sse: str = ""
    sse_kms_key_id: str = ""
    multipart_threshold_mb: int = 64
    multipart_chunk_mb: int = 16
    checksum: str = "sha256"
    events_queue: str = ""  # SQS queue URL receiving the bucket's S3 event notifications
    transfers: str = "auto"  # PUTs and GETs through "botocore", "crt" (awscrt) or "auto" (syncd.remote.s3_crt)


@dataclass(frozen=True)
class Config:
    path: Path
    ledger: Path
    remote: RemoteConfig
    watches: tuple[WatchConfig, ...]
    log_level: str = "info"
    log_format: str = "text"
    settle_seconds: float = 2.0
    workers: int = 8
    rescan_interval: float = 3600.0
    health_listen: str = "127.0.0.1:9750"
    max_backlog_age: float = 900.0
    max_deletes: int = 1000
    healthcheck_url: str = ""
    remote_rescan_interval: float = 3600.0  # seconds between listings while running; 0 = start only
    serve_files: bool = False  # GET /files/<watch prefix>/<path> (SPEC §6)
    lazy_restore: bool = False  # READY after the local scan; the restore runs behind it
    http_hosts: tuple[str, ...] = ()  # Host names the private routes accept (SPEC §6), normalized
    bwlimit: int = 0  # bytes/s shared by uploads and restores (syncd.bwlimit); 0 = no limit
    extra: dict[str, Any] = field(default_factory=dict)

    def watch(self, prefix: str) -> WatchConfig:
        for w in self.watches:
            if w.prefix == prefix:
                return w
        raise KeyError(prefix)


# --- locating the file -------------------------------------------------------------------


def default_locations() -> list[Path]:
    locs = [Path("syncd.toml")]
    if sys.platform == "win32":
        base = os.environ.get("PROGRAMDATA", r"C:\ProgramData")
        locs.append(Path(base) / "syncd" / "syncd.toml")
    else:
        locs.append(Path("/etc/syncd/syncd.toml"))
    return locs


def find_config(explicit: str | os.PathLike[str] | None) -> Path:
    """--config, else $SYNCD_CONFIG, else ./syncd.toml, else the system location."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("SYNCD_CONFIG")
    if env:
        return Path(env)
    locs = default_locations()
    for p in locs:
        if p.is_file():
            return p
    raise ConfigError(
        "no config file found (looked for --config, $SYNCD_CONFIG, "
        + ", ".join(str(p) for p in locs)
        + "); try: syncd --config syncd.example.toml resync"
    )


# --- validation helpers ------------------------------------------------------------------


class _Ctx:
    def __init__(self, file: Path) -> None:
        self.file = file

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"config error in {self.file}: {key}: {msg}")

    def take(self, table: dict[str, Any], name: str, key: str, kind: type | tuple, default: Any) -> Any:
        if key not in table:
            return default
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a config `workers = true` is still a mistake.
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            want = " or ".join(_type_name(k) for k in kinds)
            raise self.fail(f"{name}.{key}", f"must be {want}, not {_type_name(type(value))}")
        return value

    def choice(self, table: dict[str, Any], name: str, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.take(table, name, key, str, default)
        if value not in choices:
            raise self.fail(f"{name}.{key}", f"must be one of {', '.join(repr(c) for c in choices)}, not {value!r}")
        return value

    def unknown(self, table: dict[str, Any], name: str, known: set[str]) -> None:
        for key in table:
            if key not in known:
                raise self.fail(f"{name}.{key}" if name else key, "unknown key")


def _type_name(t: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
            dict: "a table"}.get(t, t.__name__)


def _find_secrets(ctx: _Ctx, node: Any, path: str) -> None:
    """Reject credentials written in the file; name the key, never the value."""
    if isinstance(node, dict):
        for k, v in node.items():
            here = f"{path}.{k}" if path else k
            if k.lower() in SECRET_KEYS:
                raise ctx.fail(here, "secrets must not be written in the config file; use the AWS "
                                     "credential chain (environment, profile, instance role)")
            _find_secrets(ctx, v, here)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _find_secrets(ctx, v, f"{path}[{i}]")
    elif isinstance(node, str) and "://" in node:
        try:
            has_password = urlsplit(node).password is not None
        except ValueError:
            has_password = False
        if has_password:
            raise ctx.fail(path, "a password inside a URL is a secret and must not be written in "
                                 "the config file; use the AWS credential chain")


def _resolve(base: Path, value: str) -> Path:
    p = Path(os.path.expanduser(value))
    if not p.is_absolute():
        p = base / p
    return Path(os.path.abspath(p))


def _contains(outer: Path, inner: Path) -> bool:
    try:
        inner.relative_to(outer)
        return True
    except ValueError:
        return False


def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


# --- sections ----------------------------------------------------------------------------

_SYNCD_KEYS = {
    "ledger", "log_level", "log_format", "settle_seconds", "workers", "rescan_interval",
    "health_listen", "max_backlog_age", "max_deletes", "healthcheck_url", "remote_rescan_interval",
    "serve_files", "lazy_restore", "http_hosts", "bwlimit",
}
_REMOTE_KEYS = {
    "url", "endpoint_url", "region", "profile", "storage_class", "sse", "sse_kms_key_id",
    "multipart_threshold_mb", "multipart_chunk_mb", "checksum", "events_queue", "transfers",
}
_WATCH_KEYS = {"path", "prefix", "include", "exclude", "on_delete", "restore", "follow_symlinks", "observer",
               "mode", "upload_on_close"}


def _parse_remote(ctx: _Ctx, t: dict[str, Any], base: Path) -> RemoteConfig:
    ctx.unknown(t, "remote", _REMOTE_KEYS)
    if "url" not in t:
        raise ctx.fail("remote.url", "is required (s3://BUCKET[/PREFIX] or file:///ABS/PATH)")
    url = ctx.take(t, "remote", "url", str, "")
    opts: dict[str, Any] = {
        "endpoint_url": ctx.take(t, "remote", "endpoint_url", str, ""),
        "region": ctx.take(t, "remote", "region", str, ""),
        "profile": ctx.take(t, "remote", "profile", str, ""),
        "storage_class": ctx.take(t, "remote", "storage_class", str, ""),
        "sse": ctx.choice(t, "remote", "sse", ("", "AES256", "aws:kms"), ""),
        "sse_kms_key_id": ctx.take(t, "remote", "sse_kms_key_id", str, ""),
        "multipart_threshold_mb": ctx.take(t, "remote", "multipart_threshold_mb", (int, float), 64),
        "multipart_chunk_mb": ctx.take(t, "remote", "multipart_chunk_mb", (int, float), 16),
        "checksum": ctx.choice(t, "remote", "checksum", ("sha256", "md5", "none"), "sha256"),
        "events_queue": ctx.take(t, "remote", "events_queue", str, ""),
        "transfers": ctx.choice(t, "remote", "transfers", ("botocore", "crt", "auto"), "auto"),
    }
    if opts["multipart_chunk_mb"] < 5:
        raise ctx.fail("remote.multipart_chunk_mb", "must be at least 5 (the S3 minimum part size)")
    if opts["multipart_threshold_mb"] <= 0:
        raise ctx.fail("remote.multipart_threshold_mb", "must be greater than 0")
    if opts["transfers"] == "crt" and opts["checksum"] == "none":
        raise ctx.fail("remote.transfers", '"crt" sends a checksum the server verifies: it needs checksum = '
                                           '"sha256" or "md5" (or transfers = "auto")')
    if opts["sse_kms_key_id"] and opts["sse"] != "aws:kms":
        raise ctx.fail("remote.sse_kms_key_id", 'needs sse = "aws:kms"')
    if opts["events_queue"] and urlsplit(opts["events_queue"]).scheme not in ("http", "https"):
        raise ctx.fail("remote.events_queue", "must be the queue's URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME)")
    if opts["endpoint_url"]:
        ep = urlsplit(opts["endpoint_url"])
        if ep.scheme not in ("http", "https") or not ep.netloc:
            raise ctx.fail("remote.endpoint_url", "must be an http:// or https:// URL")

    if url.startswith("s3://"):
        rest = url[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        prefix = prefix.strip("/")
        if not bucket:
            raise ctx.fail("remote.url", "s3:// URL needs a bucket: s3://BUCKET[/PREFIX]")
        err = check_prefix(prefix)
        if err:
            raise ctx.fail("remote.url", f"bad prefix: {err}")
        return RemoteConfig(url=url, scheme="s3", bucket=bucket, prefix=prefix, **opts)
    if url.startswith("file:"):
        raw = url[len("file:"):]
        if raw.startswith("//"):
            raw = raw[2:]
            # file:///abs -> "/abs"; file://./rel -> "./rel"; file://host/x is not supported
            if not (raw.startswith("/") or raw.startswith(".")) and not _is_windows_abs(raw):
                raise ctx.fail("remote.url", "file:// URLs take a path: file:///ABS/PATH")
        raw = unquote(raw)
        if _is_windows_abs(raw.lstrip("/")):
            raw = raw.lstrip("/")
        if not raw:
            raise ctx.fail("remote.url", "file: URL needs a path")
        return RemoteConfig(url=url, scheme="file", root=_resolve(base, raw), **opts)
    raise ctx.fail("remote.url", "must start with s3:// or file://")


def _is_windows_abs(p: str) -> bool:
    return len(p) >= 3 and p[1] == ":" and p[0].isalpha() and p[2] in "/\\"


def _patterns(ctx: _Ctx, t: dict[str, Any], name: str, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = ctx.take(t, name, key, list, list(default))
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v:
            raise ctx.fail(f"{name}.{key}[{i}]", "must be a non-empty string (a glob)")
    return tuple(value)


def _parse_watch(ctx: _Ctx, t: Any, i: int, base: Path) -> WatchConfig:
    name = f"watch[{i}]"
    if not isinstance(t, dict):
        raise ctx.fail(name, "must be a table ([[watch]])")
    ctx.unknown(t, name, _WATCH_KEYS)
    if "path" not in t:
        raise ctx.fail(f"{name}.path", "is required")
    raw = ctx.take(t, name, "path", str, "")
    if not raw:
        raise ctx.fail(f"{name}.path", "must not be empty")
    path = _resolve(base, raw)
    if path.exists() and not path.is_dir():
        raise ctx.fail(f"{name}.path", f"{path} exists but is not a directory")
    prefix = ctx.take(t, name, "prefix", str, path.name)
    prefix = prefix.strip("/")
    err = check_prefix(prefix)
    if err:
        raise ctx.fail(f"{name}.prefix", err)
    return WatchConfig(
        path=path,
        prefix=prefix,
        include=_patterns(ctx, t, name, "include", ()),
        exclude=_patterns(ctx, t, name, "exclude", DEFAULT_EXCLUDE),
        on_delete=ctx.choice(t, name, "on_delete", ("keep", "mirror", "trash"), "keep"),
        restore=ctx.take(t, name, "restore", bool, True),
        follow_symlinks=ctx.take(t, name, "follow_symlinks", bool, False),
        observer=ctx.choice(t, name, "observer", ("native", "polling"), "native"),
        mode=ctx.choice(t, name, "mode", ("backup", "shared"), "backup"),
        upload_on_close=ctx.take(t, name, "upload_on_close", bool, True),
    )


def _check_overlaps(ctx: _Ctx, watches: list[WatchConfig]) -> None:
    for i, a in enumerate(watches):
        for j, b in enumerate(watches):
            if j <= i:
                continue
            ra, rb = _real(a.path), _real(b.path)
            if _contains(ra, rb) or _contains(rb, ra):
                raise ctx.fail(f"watch[{j}].path", f"{b.path} overlaps watch[{i}].path {a.path}")
            pa, pb = a.prefix, b.prefix
            if pa == pb or not pa or not pb or pb.startswith(pa + "/") or pa.startswith(pb + "/"):
                raise ctx.fail(f"watch[{j}].prefix", f"{pb!r} overlaps watch[{i}].prefix {pa!r}")


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Find, parse and validate the config; raise ConfigError naming key and file."""
    file = Path(os.path.abspath(find_config(path)))
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {file}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {file}: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config error in {file}: not valid TOML: {e}") from None
    try:
        return parse_config(data, file)
    except ConfigError as e:
        s = data.get("syncd")
        e.log_format = s.get("log_format") if isinstance(s, dict) else None  # its error in its format
        raise


def parse_config(data: dict[str, Any], file: Path) -> Config:
    ctx = _Ctx(file)
    base = file.parent
    _find_secrets(ctx, data, "")
    ctx.unknown(data, "", {"syncd", "remote", "watch"})
    s = data.get("syncd", {})
    if not isinstance(s, dict):
        raise ctx.fail("syncd", "must be a table")
    ctx.unknown(s, "syncd", _SYNCD_KEYS)
    r = data.get("remote")
    if not isinstance(r, dict):
        raise ctx.fail("remote", "a [remote] table with url is required")
    remote = _parse_remote(ctx, r, base)
    ws = data.get("watch")
    if ws is None or (isinstance(ws, list) and not ws):
        raise ctx.fail("watch", "at least one [[watch]] table is required")
    if not isinstance(ws, list):
        raise ctx.fail("watch", "must be an array of tables ([[watch]])")
    watches = [_parse_watch(ctx, w, i, base) for i, w in enumerate(ws)]
    _check_overlaps(ctx, watches)

    workers = ctx.take(s, "syncd", "workers", int, 8)
    if not 1 <= workers <= 256:
        raise ctx.fail("syncd.workers", "must be between 1 and 256")
    settle = float(ctx.take(s, "syncd", "settle_seconds", (int, float), 2.0))
    if settle < 0:
        raise ctx.fail("syncd.settle_seconds", "must not be negative")
    rescan = float(ctx.take(s, "syncd", "rescan_interval", (int, float), 3600))
    if rescan < 0:
        raise ctx.fail("syncd.rescan_interval", "must not be negative (0 = never)")
    backlog = float(ctx.take(s, "syncd", "max_backlog_age", (int, float), 900))
    if backlog <= 0:
        raise ctx.fail("syncd.max_backlog_age", "must be greater than 0")
    max_deletes = ctx.take(s, "syncd", "max_deletes", int, 1000)
    if max_deletes < 0:
        raise ctx.fail("syncd.max_deletes", "must not be negative")
    listen = ctx.take(s, "syncd", "health_listen", str, "127.0.0.1:9750")
    if listen:
        try:
            split_listen(listen)
        except ValueError as e:
            raise ctx.fail("syncd.health_listen", str(e)) from None
    http_hosts = ctx.take(s, "syncd", "http_hosts", list, [])
    for i, h in enumerate(http_hosts):
        if not isinstance(h, str) or not HOST_NAME.fullmatch(h):
            raise ctx.fail(f"syncd.http_hosts[{i}]", f"must be a host name (letters, digits, '-', '.'; "
                                                     f"no port, scheme or '*'), not {h!r}")
    hc = ctx.take(s, "syncd", "healthcheck_url", str, "")
    if hc and urlsplit(hc).scheme not in ("http", "https"):
        raise ctx.fail("syncd.healthcheck_url", "must be an http:// or https:// URL")
    remote_rescan = float(ctx.take(s, "syncd", "remote_rescan_interval", (int, float), 3600))
    if remote_rescan < 0:
        raise ctx.fail("syncd.remote_rescan_interval", "must not be negative (0 = only at start)")
    try:
        bwlimit = parse_rate(ctx.take(s, "syncd", "bwlimit", (str, int, float), "0"))
    except ValueError as e:
        raise ctx.fail("syncd.bwlimit", str(e)) from None
    if bwlimit and remote.transfers == "crt":
        raise ctx.fail("remote.transfers", '"crt" cannot hold transfers to syncd.bwlimit (awscrt sends and '
                                           'reads bodies itself): use "auto" (botocore while a limit is set) or '
                                           '"botocore"')
    ledger = _resolve(base, ctx.take(s, "syncd", "ledger", str, "syncd-ledger.db"))
    for i, w in enumerate(watches):
        if _contains(_real(w.path), _real(ledger.parent)):
            raise ctx.fail("syncd.ledger", f"{ledger} is inside watch[{i}].path; keep the ledger "
                                           "outside the directories it protects")
    if remote.root is not None:
        for i, w in enumerate(watches):
            rr, rw = _real(remote.root), _real(w.path)
            if _contains(rr, rw) or _contains(rw, rr):
                raise ctx.fail("remote.url", f"{remote.root} overlaps watch[{i}].path {w.path}")

    return Config(
        path=file,
        ledger=ledger,
        remote=remote,
        watches=tuple(watches),
        log_level=ctx.choice(s, "syncd", "log_level", LOG_LEVELS, "info"),
        log_format=ctx.choice(s, "syncd", "log_format", ("text", "json"), "text"),
        settle_seconds=settle,
        workers=workers,
        rescan_interval=rescan,
        health_listen=listen,
        max_backlog_age=backlog,
        max_deletes=max_deletes,
        healthcheck_url=hc,
        remote_rescan_interval=remote_rescan,
        serve_files=ctx.take(s, "syncd", "serve_files", bool, False),
        lazy_restore=ctx.take(s, "syncd", "lazy_restore", bool, False),
        http_hosts=tuple(dict.fromkeys(normalize_host(h) for h in http_hosts)),
        bwlimit=bwlimit,
    )


def split_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPv6]:PORT` -> (host, port); the host without brackets ("" for an empty
    host: the caller's default). ValueError says what is wrong."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT, [IPv6]:PORT or empty, not {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address (e.g. [::1]:9750)") from None
        return host[1:-1], int(port)
    if ":" in host or "[" in host or "]" in host:
        raise ValueError(f"an IPv6 address goes in brackets ([::1]:{port}), not {listen!r}")
    return host, int(port)
