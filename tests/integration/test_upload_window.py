"""The upload window against S3 (moto behind the fault proxy): what the app has just closed is
uploaded at once, whatever else is in flight (SPEC §4.1).

The daemon runs in-process (a thread, a real watchdog observer) with `settle_seconds` far beyond
every deadline here: only the close path can make a file durable in time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.conftest import wait_for, write_config
from tests.integration.test_no_window import ready, running
from tests.reliability.faultproxy import FaultProxy, Rates

SETTLE = 30.0
MIB = 1024 * 1024


@dataclass
class S3Rig:
    config: Path
    root: Path
    proxy: FaultProxy
    client: Any
    bucket: str

    def read(self, rel: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=f"ex/up/{rel}")["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def keys(self) -> set[str]:
        out = set()
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix="ex/up/"):
            out |= {o["Key"].removeprefix("ex/up/") for o in page.get("Contents", ())}
        return out


@contextmanager
def s3_rig(tmp_path: Path, moto: str, proxy_opts: dict[str, Any] | None = None, **syncd: Any) -> Iterator[S3Rig]:
    client = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
    bucket = f"window-{os.urandom(4).hex()}"
    client.create_bucket(Bucket=bucket)
    with FaultProxy(int(moto.rsplit(":", 1)[1]), seed=1, rates=Rates(), **(proxy_opts or {})) as proxy:
        root = tmp_path / "up"
        opts = {"ledger": str(tmp_path / "state" / "ledger.db"), "settle_seconds": SETTLE, "workers": 2,
                "health_listen": "", "rescan_interval": 0, **syncd}
        cfg = write_config(tmp_path / "syncd.toml", remote={"url": f"s3://{bucket}/ex", "endpoint_url": proxy.url},
                           watches=[{"path": str(root), "prefix": "up"}], syncd=opts)
        yield S3Rig(cfg, root, proxy, client, bucket)


@pytest.mark.parametrize(("first", "second"), [(2 * MIB, 3 * MIB // 2), (3 * MIB // 2, 2 * MIB), (100_000, 50_000)],
                         ids=["shrunk", "grown", "small"])
def test_a_file_saved_by_rename_then_rewritten_in_place_during_its_upload_ends_with_the_rewrite(
        tmp_path: Path, moto_server: str, first: int, second: int) -> None:
    """Saved through a temp file and a rename, then rewritten in place a moment later (0.25 s in
    the report), while the upload of the renamed content is under way: the rewrite's close
    uploads it, well before settle_seconds. A body streamed from the file (above 1 MiB) used to
    send fewer bytes than its Content-Length once the file was truncated, and the store waited
    for the rest until the read timeout (60 s, per attempt)."""
    with s3_rig(tmp_path, moto_server) as rig, running(rig.config) as d:
        wait_for(lambda: ready(d), 30, what="ready")
        # the store answers this upload 1.5 s late (its `100 Continue` too): its body is read
        # from the file after botocore's 1 s wait for that answer
        rig.proxy.delay_seconds = 1.5
        rig.proxy.arm("delay", "PUT", b"doc.bin")
        target, tmp = rig.root / "doc.bin", rig.root / ".doc.bin.tmp"
        tmp.write_bytes(b"s" * first)
        os.replace(tmp, target)
        wait_for(lambda: rig.proxy.fired["delay"] == 1, 10, what="the upload of the renamed content under way")
        target.write_bytes(b"r" * second)
        wait_for(lambda: rig.read("doc.bin") == b"r" * second, 15, 0.1, "the rewritten content in the bucket")
        wait_for(lambda: d.ledger.get("up", "doc.bin")["state"] == "synced", 15, what="synced")


def test_a_fresh_small_file_overtakes_the_backlog_and_a_large_upload_in_flight(tmp_path: Path,
                                                                              moto_server: str) -> None:
    """300 files queued by the startup scan, a store that answers each of them late, and a large
    file the app has just written, sent slowly: a small file the app closes then is uploaded
    before most of the backlog (SPEC §4.1: what was just closed goes first). Asserted on order."""
    backlog = [f"backlog/f{i:03d}.txt" for i in range(300)]
    with s3_rig(tmp_path, moto_server, proxy_opts={"slow": b"big.bin", "slow_rate": 150_000}) as rig:
        for rel in backlog:  # written long before this start: due at once, in the scan's order
            p = rig.root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(rel.encode() * 20)
            os.utime(p, (1_600_000_000, 1_600_000_000))
        rig.proxy.delay_seconds = 0.2
        rig.proxy.arm("delay", "PUT", b"/backlog/", count=len(backlog))
        with running(rig.config) as d:
            wait_for(lambda: ready(d), 60, what="ready")
            (rig.root / "big.bin").write_bytes(os.urandom(3 * MIB))  # 20 s to send at 150 KB/s
            wait_for(lambda: d.ledger.get("up", "big.bin") is not None
                     and d.ledger.get("up", "big.bin")["state"] == "uploading", 60, what="the large upload in flight")
            wait_for(lambda: len(rig.keys()) >= 5, 60, what="the backlog under way")
            (rig.root / "fresh.txt").write_bytes(b"just closed")
            wait_for(lambda: rig.read("fresh.txt") == b"just closed", 60, 0.05, "the fresh file in the bucket")
            uploaded = rig.keys()
            assert "big.bin" not in uploaded  # still in flight: it did not hold the small file back
            behind = [rel for rel in backlog if rel not in uploaded]
            assert len(behind) >= 150, f"only {len(behind)} of 300 backlog files were still queued"
            # and everything else after it (nothing left in flight at the stop); proven: the rest
            # may go at full speed
            rig.proxy.disarm()
            rig.proxy.slow_rate = 0
            wait_for(lambda: len(rig.keys()) == len(backlog) + 2, 120, 0.2, "the backlog and the large file")


@pytest.mark.parametrize("on_delete", ["keep", "mirror"])
def test_a_fresh_deletion_reaches_the_remote_before_the_backlog(tmp_path: Path, moto_server: str,
                                                               on_delete: str) -> None:
    """A deletion is durable in the ledger at once, but a host lost with its disk (ledger too)
    before its remote effect brings the file back. 300 files queued by the startup scan, each
    answered late: the tombstone (`keep`) or the DELETE (`mirror`) of a file the app has just
    deleted reaches the store before most of them. Asserted on order."""
    backlog = [f"backlog/f{i:03d}.txt" for i in range(300)]
    doomed = [f"doomed{i}.txt" for i in range(3)]
    with s3_rig(tmp_path, moto_server) as rig:
        for rel in doomed:
            (rig.root / rel).parent.mkdir(parents=True, exist_ok=True)
            (rig.root / rel).write_bytes(b"to be deleted")
            os.utime(rig.root / rel, (1_600_000_000, 1_600_000_000))  # settled long ago: uploaded at the start
        rig.config.write_text(rig.config.read_text().replace(
            'prefix = "up"', f'prefix = "up"\non_delete = "{on_delete}"', 1))
        with running(rig.config) as d:  # a first run: the doomed files are on the remote
            wait_for(lambda: ready(d), 60, what="ready")
            wait_for(lambda: all(rig.read(rel) for rel in doomed), 60, what="the doomed files uploaded")
        for rel in backlog:  # written while syncd was stopped: queued by the next start's scan
            p = rig.root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(rel.encode() * 20)
            os.utime(p, (1_600_000_000, 1_600_000_000))
        rig.proxy.delay_seconds = 0.2
        rig.proxy.arm("delay", "PUT", b"/backlog/", count=len(backlog))

        def gone() -> bool:
            if on_delete == "keep":
                return {f".syncd/tombstones/{rel}" for rel in doomed} <= rig.keys()
            return not set(doomed) & rig.keys()

        with running(rig.config) as d:
            wait_for(lambda: ready(d), 60, what="ready")
            wait_for(lambda: len(rig.keys()) >= 5 + len(doomed), 60, what="the backlog under way")
            for rel in doomed:
                (rig.root / rel).unlink()
            wait_for(gone, 60, 0.05, "the deletions on the remote")
            uploaded = rig.keys()
            behind = [rel for rel in backlog if rel not in uploaded]
            assert len(behind) >= 150, f"only {len(behind)} of 300 backlog files were still queued"
            rig.proxy.disarm()  # proven: the rest of the backlog may go at full speed
            wait_for(lambda: not {r["path"] for r in d.ledger.query(
                "SELECT path FROM files WHERE state IN ('pending','uploading','deleting')")}, 120, 0.2,
                "the backlog")
