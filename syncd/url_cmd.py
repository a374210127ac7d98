"""`syncd url PATH`: a presigned GET URL for a synced file's object (SPEC §3).

The ledger says whether the file is synced and under which key; the URL is signed locally by
botocore with syncd's credentials (no request is sent), so it works for whoever holds it until
it expires, at most 7 days (S3's limit for Signature Version 4).
"""

from __future__ import annotations

import os
from pathlib import Path

from syncd.config import Config, WatchConfig
from syncd.errors import ConfigError, SyncdError
from syncd.keys import rel_path

DEFAULT_EXPIRES = 3600
MAX_EXPIRES = 7 * 24 * 3600  # SigV4 presigned URLs cannot live longer


class NotSynced(SyncdError):
    """The file has no synced object to sign: exit 1."""

    exit_code = 1


def locate(cfg: Config, raw: str) -> tuple[WatchConfig, str]:
    """The watch and ledger path of a local path (absolute or relative to the current directory)."""
    candidates = [Path(os.path.abspath(raw)), Path(os.path.realpath(raw))]
    for p in candidates:
        for w in cfg.watches:
            for root in (w.path, Path(os.path.realpath(w.path))):
                rel = rel_path(root, p)
                if rel is None:
                    continue
                if not rel:
                    raise ConfigError(f"{raw} is the watched directory itself; give a file inside it")
                return w, rel
    raise ConfigError(f"{raw} is not inside any watched directory ({', '.join(str(w.path) for w in cfg.watches)})")


def presigned_url(cfg: Config, raw: str, expires: int = DEFAULT_EXPIRES) -> str:
    if not 1 <= expires <= MAX_EXPIRES:
        raise ConfigError(f"--expires {expires}: must be 1 to {MAX_EXPIRES} seconds (7 days, the longest "
                          f"a presigned S3 URL can be valid)")
    if cfg.remote.scheme != "s3":
        raise ConfigError(f"`syncd url` needs an S3 remote: {cfg.remote.url} is a directory, which has no URLs "
                          f"to sign (serve_files can serve the files over HTTP instead)")
    w, rel = locate(cfg, raw)
    row = None
    if cfg.ledger.exists():
        from syncd.ledger import Ledger

        ledger = Ledger(cfg.ledger, check=False, config=cfg.path)
        try:
            row = ledger.get(w.prefix, rel)
        finally:
            ledger.close()
    if row is None or row["state"] != "synced" or not row["key"]:
        state = "no record in the ledger" if row is None else f"state {row['state']}"
        raise NotSynced(f"{raw} is not synced ({state}); see `syncd status`")
    from syncd.remote.s3 import S3Remote

    remote = S3Remote(cfg.remote, workers=1)
    try:
        return remote.presign_get(row["key"], expires)
    finally:
        remote.close()
