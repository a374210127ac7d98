"""`check`'s bucket hygiene: settings that keep a backup bucket safe, one line each (SPEC §3).

Each line is `ok`, `advice: ...` or `unknown (<S3 error code>)`. These reads need actions that
syncd's least-privilege policy does not grant (s3:GetBucketVersioning,
s3:GetEncryptionConfiguration, s3:GetBucketPublicAccessBlock, s3:GetLifecycleConfiguration):
a denied read is `unknown (AccessDenied)`, never a failure, and advice never changes the exit code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from syncd.config import Config
from syncd.remote.base import CREDENTIALS, NO_BUCKET, UNREACHABLE, RemoteError
from syncd.retry import call as retry_call

PUBLIC_ACCESS_SETTINGS = ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets")
ATTEMPTS = 3  # a transient error is retried a little; then the line says unknown


@dataclass(frozen=True)
class Line:
    name: str
    outcome: str  # ok | advice: ... | unknown (<code>)


def _read(remote: Any, setting: str) -> tuple[dict[str, Any] | None, str]:
    """(the setting, "") or (None, S3's error code)."""
    try:
        return retry_call(lambda: remote.bucket_setting(setting), attempts=ATTEMPTS), ""
    except RemoteError as e:
        return None, e.code or e.kind


def versioning(remote: Any) -> list[Line]:
    got, code = _read(remote, "versioning")
    if got is None:
        return [Line("versioning", f"unknown ({code})")]
    status = got.get("Status") or ""
    if status == "Enabled":
        return [Line("versioning", "ok")]
    why = "suspended" if status == "Suspended" else "off"
    return [Line("versioning", f"advice: {why}; enable versioning so that an overwrite or deletion can be undone "
                               f"(`syncd restore --at`)")]


def encryption(remote: Any, cfg: Config) -> list[Line]:
    name = "default encryption"
    got, code = _read(remote, "encryption")
    if got is None and code == "ServerSideEncryptionConfigurationNotFoundError":
        ours = f" (syncd's own uploads use sse = {cfg.remote.sse})" if cfg.remote.sse else ""
        return [Line(name, f"advice: none{ours}; make SSE-S3 or SSE-KMS the bucket's default")]
    if got is None:
        return [Line(name, f"unknown ({code})")]
    rules = (got.get("ServerSideEncryptionConfiguration") or {}).get("Rules") or []
    if any((r.get("ApplyServerSideEncryptionByDefault") or {}).get("SSEAlgorithm") for r in rules):
        return [Line(name, "ok")]
    return [Line(name, "advice: the encryption configuration sets no algorithm; make SSE-S3 or SSE-KMS the default")]


def public_access(remote: Any) -> list[Line]:
    got, code = _read(remote, "public_access_block")
    if got is None and code == "NoSuchPublicAccessBlockConfiguration":
        return [Line(s, "advice: the bucket has no public access block; turn this on") for s in PUBLIC_ACCESS_SETTINGS]
    if got is None:
        return [Line(s, f"unknown ({code})") for s in PUBLIC_ACCESS_SETTINGS]
    conf = got.get("PublicAccessBlockConfiguration") or {}
    return [Line(s, "ok" if conf.get(s) else "advice: off; turn it on") for s in PUBLIC_ACCESS_SETTINGS]


def _rule_prefix(rule: dict[str, Any]) -> str | None:
    """The key prefix a lifecycle rule applies to; None when it also filters on tags (multipart
    uploads have none, so such a rule never aborts them)."""
    if "Filter" not in rule:
        return str(rule.get("Prefix") or "")  # the legacy form
    f = rule["Filter"] or {}
    if "Tag" in f:
        return None
    if "And" in f:
        if f["And"].get("Tags"):
            return None
        return str(f["And"].get("Prefix") or "")
    return str(f.get("Prefix") or "")


def lifecycle(remote: Any, cfg: Config) -> list[Line]:
    name = "abort incomplete uploads"
    got, code = _read(remote, "lifecycle")
    where = f"under {cfg.remote.prefix}/" if cfg.remote.prefix else "in the bucket"
    advice = (f"advice: no lifecycle rule aborts incomplete multipart uploads {where}; add one (e.g. after "
              f"7 days): parts of interrupted uploads are billed and never listed")
    if got is None and code == "NoSuchLifecycleConfiguration":
        return [Line(name, advice)]
    if got is None:
        return [Line(name, f"unknown ({code})")]
    ours = cfg.remote.prefix + "/" if cfg.remote.prefix else ""
    for rule in got.get("Rules") or []:
        prefix = _rule_prefix(rule)
        if (rule.get("Status") == "Enabled" and prefix is not None and ours.startswith(prefix)
                and (rule.get("AbortIncompleteMultipartUpload") or {}).get("DaysAfterInitiation") is not None):
            return [Line(name, "ok")]
    return [Line(name, advice)]


def hygiene(cfg: Config, remote: Any) -> list[Line]:
    """The hygiene lines for an S3 remote (`remote` has `bucket_setting`)."""
    return versioning(remote) + encryption(remote, cfg) + public_access(remote) + lifecycle(remote, cfg)


def section(cfg: Config, remote: Any, probes: list[Any]) -> list[str]:
    """What `check` prints after its probes: the hygiene lines, or one line saying why not."""
    if cfg.remote.scheme != "s3" or not hasattr(remote, "bucket_setting"):
        return [f"hygiene skipped: {cfg.remote.url} is a directory, not a bucket"]
    err = next((getattr(p, "error", None) for p in probes if p.name == "list"), None)
    if err is not None and err.kind in (UNREACHABLE, CREDENTIALS, NO_BUCKET):
        return ["hygiene skipped: the bucket cannot be used (see the list line)"]
    return ["hygiene (advice only; the exit code does not depend on it):"] + \
        [f"{line.name:<24} {line.outcome}" for line in hygiene(cfg, remote)]
