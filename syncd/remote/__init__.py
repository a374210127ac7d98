"""Remotes: one interface (`base.Remote`), one implementation per kind of store."""

from __future__ import annotations

import logging
from pathlib import Path

from syncd.bwlimit import Limiter, describe
from syncd.config import Config, RemoteConfig
from syncd.remote.base import Remote, RemoteError

log = logging.getLogger(__name__)


def open_remote(cfg: Config) -> Remote:
    """The remote for this config, with the one limiter of `bwlimit` that its uploads and
    restores share (none without a limit). S3 imports boto3 lazily (it is slow to import)."""
    limiter = Limiter(cfg.bwlimit) if cfg.bwlimit else None
    if limiter is not None:
        log.info("transfers limited to %s (bwlimit), uploads and restores together", describe(cfg.bwlimit))
    if cfg.remote.scheme == "file":
        from syncd.remote.local import LocalRemote

        assert cfg.remote.root is not None
        return LocalRemote(cfg.remote.root, limiter=limiter)
    from syncd.remote.s3 import S3Remote

    return S3Remote(cfg.remote, workers=cfg.workers, limiter=limiter)


def remote_identity(cfg: RemoteConfig) -> str:
    """Which remote a ledger's rows describe: the store (its endpoint) and the place in it. Two
    configs that name another bucket, prefix, directory or endpoint name another remote."""
    if cfg.scheme == "file":
        assert cfg.root is not None
        return f"file://{Path(cfg.root).resolve().as_posix()}"
    where = f"s3://{cfg.bucket}/{cfg.prefix}".rstrip("/")
    endpoint = cfg.endpoint_url.rstrip("/")
    return f"{where} at {endpoint}" if endpoint else where


__all__ = ["Remote", "RemoteError", "open_remote", "remote_identity"]
