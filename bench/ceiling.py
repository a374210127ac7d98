"""Ceilings for syncd's requests, shown next to syncd as information (not targets).

    python bench/ceiling.py ENDPOINT BUCKET KEY_PREFIX SRC_DIR [THREADS]
    python bench/ceiling.py --list ENDPOINT BUCKET KEY_PREFIX

(a): a bare botocore `put_object` loop, no ledger, no scan. Sends every file under SRC_DIR as
KEY_PREFIX/<relative path> from THREADS threads (default 8, syncd's default workers), with the
headers syncd sends (SHA-256 checksum, `syncd-*` metadata, guessed Content-Type, no
`Expect: 100-continue`): how fast the same requests go with nothing else around them.

(c), `--list`: a process that imports botocore, makes a client and lists KEY_PREFIX/ (the
paginator, pages of 1,000), nothing else: the floor of a no-op `resync` (SPEC §3: it always
lists) for any tool built on botocore, before it reads a ledger or a directory.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import botocore.session
from botocore.config import Config


def make_client(endpoint: str, threads: int = 1) -> Any:
    return botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        config=Config(max_pool_connections=threads + 4, retries={"total_max_attempts": 1},
                      request_checksum_calculation="when_required", response_checksum_validation="when_required",
                      s3={"addressing_style": "path", "payload_signing_enabled": False}))


def list_all(endpoint: str, bucket: str, prefix: str) -> int:
    pages = make_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
    n = sum(len(page.get("Contents", ())) for page in pages)
    print(f"{n} objects", file=sys.stderr)
    return 0 if n else 1


def main(argv: list[str]) -> int:
    if argv[0] == "--list":
        return list_all(*argv[1:4])
    endpoint, bucket, prefix, src = argv[:4]
    threads = int(argv[4]) if len(argv) > 4 else 8
    from syncd.remote.s3 import no_expect_for_small_bodies  # here: --list times bare botocore alone

    s3 = make_client(endpoint, threads)
    s3.meta.events.register("before-sign.s3.PutObject", no_expect_for_small_bodies)  # as syncd does
    root = Path(src)
    files = sorted(p for p in root.rglob("*") if p.is_file())

    def put(path: Path) -> None:
        data = path.read_bytes()
        digest = hashlib.sha256(data)
        ctype = mimetypes.guess_type(path.name, strict=False)[0]
        extra = {"ContentType": ctype} if ctype else {}
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(root).as_posix()}", Body=data,
                      ChecksumAlgorithm="SHA256", ChecksumSHA256=base64.b64encode(digest.digest()).decode(),
                      Metadata={"syncd-sha256": digest.hexdigest(),
                                "syncd-mtime-ns": str(os.stat(path).st_mtime_ns)}, **extra)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, files))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
