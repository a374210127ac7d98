"""The least-privilege IAM policy for a config (`syncd iam-policy`, and `check` on a denial)."""

from __future__ import annotations

from typing import Any

from syncd.config import Config
from syncd.keys import join_key
from syncd.tombstones import tomb_base

CHECK_DIR = ".syncd-check"
# s3:GetObjectAttributes: the part sizes of other tools' multipart objects, to check their
# composite checksums in one request (without it, a HEAD per part: syncd.remote.composite)
OBJECT_ACTIONS = ["s3:GetObject", "s3:GetObjectAttributes", "s3:PutObject", "s3:AbortMultipartUpload",
                  "s3:ListMultipartUploadParts"]
KMS_ACTIONS = ["kms:GenerateDataKey", "kms:Decrypt"]


def check_base(cfg: Config) -> str:
    """Where `syncd check` writes its probe objects: `<remote prefix>/.syncd-check/`."""
    return join_key(cfg.remote.prefix, CHECK_DIR)


def needs_delete(cfg: Config) -> bool:
    return any(w.on_delete in ("mirror", "trash") for w in cfg.watches)


def policy(cfg: Config) -> dict[str, Any]:
    """A policy granting exactly what syncd does with this config, nothing more."""
    bucket = cfg.remote.bucket or "BUCKET"
    bases = [join_key(cfg.remote.prefix, w.prefix) for w in cfg.watches] + [check_base(cfg)]
    unrestricted = any(not b for b in bases)
    statements: list[dict[str, Any]] = []
    listing: dict[str, Any] = {"Sid": "SyncdList", "Effect": "Allow", "Action": ["s3:ListBucket"],
                               "Resource": f"arn:aws:s3:::{bucket}"}
    if not unrestricted:
        # listing is only ever done under these prefixes
        listing["Condition"] = {"StringLike": {"s3:prefix": [f"{b}/*" for b in bases]}}
    statements.append(listing)
    actions = list(OBJECT_ACTIONS)
    if needs_delete(cfg):
        actions.append("s3:DeleteObject")
    resources = [f"arn:aws:s3:::{bucket}/*"] if unrestricted else [f"arn:aws:s3:::{bucket}/{b}/*" for b in bases]
    statements.append({"Sid": "SyncdObjects", "Effect": "Allow", "Action": actions, "Resource": resources})
    keep = [tomb_base(join_key(cfg.remote.prefix, w.prefix)) for w in cfg.watches if w.on_delete == "keep"]
    if keep and not needs_delete(cfg):
        # under keep nothing is deleted but tombstones: an upload of a deleted path lifts its own
        # (SPEC §4.5); they live under the watch prefix, so put and list are granted above
        statements.append({"Sid": "SyncdTombstones", "Effect": "Allow", "Action": ["s3:DeleteObject"],
                           "Resource": [f"arn:aws:s3:::{bucket}/{t}/*" for t in keep]})
    if cfg.remote.sse == "aws:kms":
        key = cfg.remote.sse_kms_key_id
        statements.append({"Sid": "SyncdKms", "Effect": "Allow", "Action": list(KMS_ACTIONS),
                           "Resource": key if key.startswith("arn:") else "*"})
    if cfg.remote.events_queue:
        from syncd.events import queue_arn

        statements.append({"Sid": "SyncdEvents", "Effect": "Allow",
                           "Action": ["sqs:ReceiveMessage", "sqs:DeleteMessage"],
                           "Resource": queue_arn(cfg.remote.events_queue, cfg.remote.region)})
    return {"Version": "2012-10-17", "Statement": statements}
