"""The fault proxy's own promises: the fault budgets the scenarios rely on, and seeds that replay.

Its decisions (`FaultProxy.decide`) need no connection: these tests ask them directly.
"""

from __future__ import annotations

from tests.reliability.faultproxy import FaultProxy, Rates


def test_the_faults_of_a_seed_do_not_depend_on_the_bucket_name():
    """The tests' buckets are named at random: a seed replays only if the name is left out."""
    def faults(bucket: str) -> list[str | None]:
        proxy = FaultProxy(0, seed=1723881692, rates=Rates(stall=0.3, slowdown=0.1))
        lines = [f"{m} /{bucket}{path} HTTP/1.1" for m in ("PUT", "HEAD", "GET")
                 for path in ("/backups/f1.bin", "/backups/f2.bin", "?list-type=2&prefix=backups%2F")]
        return [proxy.decide(line.encode())[0] for line in lines * 4]

    assert faults("syncd-test-1-0-aaaaaa") == faults("syncd-test-2-7-bbbbbb")
    assert any(faults("syncd-test-1-0-aaaaaa"))
