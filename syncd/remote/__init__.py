"""Remotes: one interface (`base.Remote`), one implementation per kind of store."""

from __future__ import annotations

from syncd.config import Config
from syncd.remote.base import Remote, RemoteError


def open_remote(cfg: Config) -> Remote:
    """The remote for this config. S3 imports boto3 lazily (it is slow to import)."""
    if cfg.remote.scheme == "file":
        from syncd.remote.local import LocalRemote

        assert cfg.remote.root is not None
        return LocalRemote(cfg.remote.root)
    from syncd.remote.s3 import S3Remote

    return S3Remote(cfg.remote, workers=cfg.workers)


__all__ = ["Remote", "RemoteError", "open_remote"]
