"""The daemon rides through network faults: resets mid-transfer, stalls, 503 SlowDown, 500s.

A fault proxy (faultproxy.py) sits between syncd and moto's server; the test looks at the
bucket directly. Every file must end byte-identical in the bucket with its `syncd-sha256`.

Stalls: syncd's client waits 60 s for an answer (read_timeout) and 10 s to connect, and no
config key changes that (none is needed in production). So the daemon scenario stalls for a
couple of seconds and then resets the connection: the same path through botocore and the retry
policy (no answer, then a broken connection) in a fraction of the time. A second, in-process
scenario shortens the client's timeouts with monkeypatch and stalls past them without a
reset, so a real `ReadTimeoutError` is exercised too.
"""

from __future__ import annotations

import os
import random
import signal

import pytest

from syncd.retry import ONESHOT_ATTEMPTS
from tests.conftest import wait_for
from tests.daemon_util import write_file
from tests.reliability.faultproxy import KINDS, FaultProxy, Rates
from tests.reliability.util import Rig, local_tree, port_of, restore_temps

MIB = 1024 * 1024


def _content(rng: random.Random, big: bool = False) -> bytes:
    if big:
        return rng.randbytes(rng.randrange(6 * MIB, 11 * MIB))
    return rng.randbytes(rng.choice([0, 1, 100, rng.randrange(1, 300_000)]))


TRANSFERS = pytest.mark.parametrize("transfers", ["botocore", "crt"])  # [remote] transfers: both paths
# the two long daemon scenarios run the default path only in the default suite (its time budget);
# SYNCD_SOAK=1 runs them through awscrt too
LONG_TRANSFERS = pytest.mark.parametrize(
    "transfers", ["botocore", "crt"] if os.environ.get("SYNCD_SOAK") == "1" else ["botocore"])


@LONG_TRANSFERS
def test_daemon_rides_through_resets_stalls_and_5xx(tmp_path, moto_server, soak, seed, figures, transfers):
    s = seed("faults")
    rng = random.Random(s)
    n_files = 400 if soak else 100
    n_big = 4 if soak else 1
    rates = Rates(reset=0.07, stall=0.05, slowdown=0.07, internal=0.05)
    with FaultProxy(port_of(moto_server), seed=s, rates=rates, stall_seconds=2.0) as proxy:
        rig = Rig(tmp_path, proxy.url, direct=moto_server, watch={"on_delete": "mirror"},
                  remote={"multipart_threshold_mb": 5, "multipart_chunk_mb": 5, "transfers": transfers})
        expected: dict[str, bytes] = {}
        written = set()
        # some files before the first start: the startup catch-up goes through the proxy too
        for i in range(n_files // 5):
            rel = f"before/f{i:03d}.bin"
            expected[rel] = _content(rng)
            write_file(rig.root / rel, expected[rel])
        d = rig.daemon()
        try:
            d.wait_ready(timeout=120)
            for i in range(n_files):
                rel = f"live/d{i % 7}/f{i:03d}.bin"
                expected[rel] = _content(rng, big=i < n_big)
                write_file(rig.root / rel, expected[rel])
            for rel in rng.sample(sorted(expected), len(expected) // 5):  # rewrites
                expected[rel] = _content(rng)
                write_file(rig.root / rel, expected[rel])
            written |= set(expected)
            wait_for(lambda: rig.matches(expected), timeout=240, interval=1,
                     what=f"every file in the bucket through faults (seed {s})")
            # deletions (mirror) and renames ride through the faults too
            gone = rng.sample(sorted(expected), len(expected) // 10)
            for rel in gone[: len(gone) // 2]:
                (rig.root / rel).unlink()
                del expected[rel]
            for rel in gone[len(gone) // 2:]:
                new = rel.replace("/f", "/renamed-f")
                os.rename(rig.root / rel, rig.root / new)
                expected[new] = expected.pop(rel)
                written.add(new)
            wait_for(lambda: rig.rels() == set(expected) and rig.matches(expected), timeout=240, interval=1,
                     what=f"deletions and renames mirrored through faults (seed {s})")
            rig.wait_settled(timeout=60)
            d.signal(signal.SIGTERM)
            assert d.stop(timeout=30) == 0, d.log()
            # files lost locally while stopped come back through the faults at the next start
            lost_locally = rng.sample(sorted(expected), len(expected) // 3)
            for rel in lost_locally:
                (rig.root / rel).unlink()
            d = rig.daemon()
            d.wait_ready(timeout=240)
            for rel in lost_locally:
                assert (rig.root / rel).read_bytes() == expected[rel], rel
            assert not restore_temps(rig.root)
            rig.wait_settled(timeout=120, what="ledger settled after the restart")
        finally:
            code = d.stop(timeout=30)
        assert code == 0, d.log()
        counts = proxy.counts()
    problems = rig.check(expected)
    assert rig.rels() == set(expected)
    assert rig.states().get("failed", 0) == 0
    assert "Traceback" not in d.log()
    print(f"faults injected: {counts} of {proxy.log.requests} requests")
    figures.add(f"faults: daemon through the proxy ({transfers})", faults=counts, files_written=len(written),
                writes=len(written) + len(expected) // 5, files_verified=len(expected) - len(problems),
                files_lost=len(problems))
    assert not problems, problems
    assert all(counts[k] > 0 for k in KINDS), counts


@LONG_TRANSFERS
def test_stalls_past_the_client_read_timeout(tmp_path, moto_server, seed, figures, syncd, monkeypatch, transfers):
    """A real read timeout: the client waits 1 s (monkeypatched), the proxy stalls 5 s."""
    from botocore.config import Config as BotoConfig

    import syncd.remote.s3 as s3mod
    import syncd.remote.s3_crt as s3_crt

    monkeypatch.setattr(s3mod, "BotoConfig", lambda **kw: BotoConfig(**{**kw, "read_timeout": 1,
                                                                         "connect_timeout": 1}))
    monkeypatch.setattr(s3_crt, "READ_TIMEOUT", 1.0)
    s = seed("stalls")
    rng = random.Random(s)
    # The budget the retry policy must absorb: `resync` gives a file ONESHOT_ATTEMPTS (5) tries,
    # and a try may send several requests: after a lost answer (a stall, a 503) syncd asks HEAD
    # before it sends the PUT again, awscrt retries a 503 once itself. A cap of faults "in a row
    # per request line" let one file lose all 5 tries (PUT stall, HEAD 503, HEAD ok then PUT
    # stall, HEAD stall, HEAD 503: no line faulted more than twice in a row). So the cap is per
    # object, over all its requests, in each resync: each failed try costs at least one fault,
    # faults take at most 2 of the 5 tries, and the others are left for what a loaded machine
    # adds (a clean answer later than the 1 s read timeout).
    faulted_tries = 2
    assert faulted_tries < ONESHOT_ATTEMPTS - 1
    with FaultProxy(port_of(moto_server), seed=s, rates=Rates(stall=0.3, slowdown=0.1), stall_seconds=5,
                    stall_then="hang", max_per_path=faulted_tries) as proxy:
        rig = Rig(tmp_path, proxy.url, direct=moto_server, remote={"transfers": transfers})
        expected = {f"s/f{i}.bin": rng.randbytes(rng.randrange(1, 50_000)) for i in range(12)}
        for rel, data in expected.items():
            write_file(rig.root / rel, data)
        r = syncd("--config", str(rig.config), "resync")
        assert r.code == 0, r.err
        for rel in list(expected)[:6]:
            (rig.root / rel).unlink()
        proxy.forgive()  # the restoring resync gets the whole budget again
        r = syncd("--config", str(rig.config), "resync")
        assert r.code == 0, r.err
        assert "restored 6" in r.out
        counts = proxy.counts()
    assert {rel: (rig.root / rel).read_bytes() for rel in expected} == expected
    assert not restore_temps(rig.root)
    problems = rig.check(expected)
    figures.add(f"faults: stalls past the read timeout (resync, {transfers})", faults=counts, files_written=len(expected),
                writes=len(expected), files_verified=len(expected) - len(problems), files_lost=len(problems))
    assert not problems, problems
    assert counts["stall"] > 0, counts


@TRANSFERS
@pytest.mark.parametrize("kind", ["slowdown", "internal", "reset"])
def test_every_request_faulted_once_still_completes(tmp_path, moto_server, seed, syncd, figures, kind, transfers):
    """The worst steady rate the retry policy must absorb: each request line fails once first."""
    s = seed(f"each_{kind}")
    rng = random.Random(s)
    with FaultProxy(port_of(moto_server), seed=s, rates=Rates(**{kind: 1.0}), max_per_request=1) as proxy:
        rig = Rig(tmp_path, proxy.url, direct=moto_server, remote={"transfers": transfers})
        expected = {f"e/f{i}.bin": rng.randbytes(rng.randrange(1, 200_000)) for i in range(5)}
        for rel, data in expected.items():
            write_file(rig.root / rel, data)
        r = syncd("--config", str(rig.config), "resync")
        assert r.code == 0, r.err
        # restores, --verify and `restore --to` go through the same faults
        for rel in list(expected)[:3]:
            (rig.root / rel).unlink()
        r = syncd("--config", str(rig.config), "resync", "--verify")
        assert r.code == 0, r.err
        assert "restored 3" in r.out
        r = syncd("--config", str(rig.config), "restore", "--to", str(tmp_path / "copy"))
        assert r.code == 0, r.err
        (rig.root / list(expected)[0]).unlink()
        r = syncd("--config", str(rig.config), "restore")
        assert r.code == 0, r.err
        counts = proxy.counts()
    assert local_tree(rig.root) == expected
    assert local_tree(tmp_path / "copy" / "uploads") == expected
    assert not restore_temps(tmp_path)
    problems = rig.check(expected)
    figures.add(f"faults: every request fails once ({kind}, {transfers})", faults=counts, files_written=len(expected),
                writes=len(expected), files_verified=len(expected) - len(problems), files_lost=len(problems))
    assert not problems, problems
    assert counts[kind] >= len(expected), counts
