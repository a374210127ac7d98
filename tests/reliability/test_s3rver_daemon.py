"""The daemon against s3rver, a second and independent S3 implementation (Node), so no behaviour
depends on moto's quirks: create, kill -9 mid-upload, restart, restore, mirror deletions, faults.

s3rver accepts only the access key S3RVER/S3RVER: it is given to the daemon's environment only.
"""

from __future__ import annotations

import os
import random

import boto3

from tests.conftest import S3RVER_CREDENTIALS, wait_for
from tests.daemon_util import write_file
from tests.reliability.faultproxy import KINDS, FaultProxy, Rates
from tests.reliability.util import (
    Rig,
    local_tree,
    port_of,
    restore_temps,
    start_until_ready,
    stop_clean,
    wait_ready,
)

ENV = {**S3RVER_CREDENTIALS, "AWS_SESSION_TOKEN": ""}


def s3rver_rig(tmp_path, s3rver, endpoint=None, **kw) -> Rig:
    client = boto3.client("s3", endpoint_url=s3rver, region_name="us-east-1", aws_access_key_id="S3RVER",
                          aws_secret_access_key="S3RVER")
    return Rig(tmp_path, endpoint or s3rver, client=client, env=ENV, **kw)


def test_daemon_on_s3rver_create_kill_restart_restore_delete(tmp_path, s3rver, seed, figures):
    rng = random.Random(seed("s3rver"))
    rig = s3rver_rig(tmp_path, s3rver, watch={"on_delete": "mirror"},
                     remote={"multipart_threshold_mb": 5, "multipart_chunk_mb": 5})
    expected = {f"s/d{i % 5}/f{i:03d}.bin": rng.randbytes(rng.randrange(0, 200_000)) for i in range(120)}
    expected["s/big.bin"] = rng.randbytes(12 * 1024 * 1024)  # multipart
    d = rig.daemon()
    wait_ready(d)
    for rel, data in expected.items():
        write_file(rig.root / rel, data)
    wait_for(lambda: len(rig.rels()) >= 10, timeout=60, interval=0.05, what="some uploads")
    d.kill9()
    # while it is down: more files, and a file lost locally (restored at start, never deleted)
    for i in range(20):
        expected[f"s/late/f{i}.bin"] = rng.randbytes(1000)
        write_file(rig.root / f"s/late/f{i}.bin", expected[f"s/late/f{i}.bin"])
    d = rig.daemon()
    try:
        wait_ready(d)
        wait_for(lambda: rig.matches(expected) and rig.settled(), timeout=120, interval=0.5,
                 what="everything on s3rver after the kill")
        (rig.root / "s/d0/f000.bin").unlink()  # mirror: deleted remotely
        os.rename(rig.root / "s/d1/f001.bin", rig.root / "s/renamed.bin")
        expected["s/renamed.bin"] = expected.pop("s/d1/f001.bin")
        del expected["s/d0/f000.bin"]
        wait_for(lambda: rig.rels() == set(expected), timeout=60, what="mirrored deletion and rename")
        assert rig.healthz()[0] == 200
    finally:
        stop_clean(d)
    lost = ["s/d2/f002.bin", "s/big.bin"]
    for rel in lost:
        (rig.root / rel).unlink()
    start_until_ready(rig)
    assert local_tree(rig.root) == expected
    assert not restore_temps(rig.root)
    problems = rig.check(expected)
    figures.add("s3rver: daemon create/kill/restart/restore/mirror", kills=1, files_written=len(expected) + 1,
                writes=len(expected) + 3, files_verified=len(expected) - len(problems), files_lost=len(problems))
    assert not problems, problems


def test_daemon_on_s3rver_through_faults(tmp_path, s3rver, seed, figures):
    s = seed("s3rver_faults")
    rng = random.Random(s)
    rates = Rates(reset=0.06, stall=0.03, slowdown=0.06, internal=0.05)
    # resets cut answers, not upload bodies: s3rver stores an aborted PUT's body (PITFALLS §8),
    # and an abort it finishes after the retry's PUT left the short body over the retry's whole
    # one, with the retry's checksum and metadata (seed 426841222 under load: a corrupt object
    # S3 cannot produce, whose PUTs are atomic). Cut bodies are tested on moto
    with FaultProxy(port_of(s3rver), seed=s, rates=rates, stall_seconds=1.5, cut_bodies=False) as proxy:
        rig = s3rver_rig(tmp_path, s3rver, endpoint=proxy.url)
        expected = {f"f/{i:03d}.bin": rng.randbytes(rng.randrange(1, 100_000)) for i in range(40)}
        d = rig.daemon()
        try:
            wait_ready(d)
            for rel, data in expected.items():
                write_file(rig.root / rel, data)
            wait_for(lambda: rig.matches(expected), timeout=180, interval=1, what=f"uploads via faults (seed {s})")
        finally:
            stop_clean(d)
        counts = proxy.counts()
    problems = rig.check(expected)
    figures.add("s3rver: daemon through the fault proxy", faults=counts, files_written=len(expected),
                writes=len(expected), files_verified=len(expected) - len(problems), files_lost=len(problems))
    assert not problems, problems
    assert sum(counts[k] for k in KINDS) > 0
