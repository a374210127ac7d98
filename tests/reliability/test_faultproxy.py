"""The fault proxy's own promises: the fault budgets the scenarios rely on, and seeds that replay.

Its decisions (`FaultProxy.decide`) need no connection: these tests ask them directly.
"""

from __future__ import annotations

from syncd.retry import ONESHOT_ATTEMPTS
from tests.reliability.faultproxy import FaultProxy, Rates


def _upload_tries(proxy: FaultProxy, bucket: str, key: str) -> int:
    """How many tries syncd's one-shot upload of `key` loses to faults: the first try is a PUT;
    after a failed one (a lost answer may have stored it) a try asks HEAD first, then PUTs."""
    put = f"PUT /{bucket}/{key} HTTP/1.1".encode()
    head = f"HEAD /{bucket}/{key} HTTP/1.1".encode()
    lost = 0
    while True:
        if lost and proxy.decide(head)[0] is not None:
            lost += 1
            continue
        if proxy.decide(put)[0] is None:
            return lost
        lost += 1


def test_max_per_path_bounds_the_tries_a_file_loses_over_all_its_request_lines():
    # the rates of test_stalls_past_the_client_read_timeout, over many seeds and files
    worst = 0
    for seed in range(300):
        proxy = FaultProxy(0, seed=seed, rates=Rates(stall=0.3, slowdown=0.1), max_per_path=2)
        worst = max(worst, *(_upload_tries(proxy, "b", f"s/f{i}.bin") for i in range(12)))
    assert worst == 2  # reached, never passed
    assert worst < ONESHOT_ATTEMPTS


def test_max_per_request_alone_does_not_bound_the_tries_of_a_file():
    """Why max_per_path exists: each line's streak is capped, the file's tries are not."""
    worst = 0
    for seed in range(300):
        proxy = FaultProxy(0, seed=seed, rates=Rates(stall=0.3, slowdown=0.1), max_per_request=2)
        worst = max(worst, *(_upload_tries(proxy, "b", f"s/f{i}.bin") for i in range(12)))
    assert worst >= ONESHOT_ATTEMPTS


def test_max_per_path_counts_every_method_and_query_and_forgive_restores_it():
    proxy = FaultProxy(0, seed=1, rates=Rates(stall=1.0), max_per_path=2, max_per_request=10)
    lines = [b"PUT /b/k HTTP/1.1", b"HEAD /b/k HTTP/1.1", b"GET /b/k?partNumber=1 HTTP/1.1"] * 3
    assert [proxy.decide(line)[0] for line in lines].count("stall") == 2
    assert proxy.decide(b"PUT /b/other HTTP/1.1")[0] == "stall"  # another object has its own budget
    proxy.forgive()
    assert [proxy.decide(line)[0] for line in lines].count("stall") == 2


def test_the_faults_of_a_seed_do_not_depend_on_the_bucket_name():
    """The tests' buckets are named at random: a seed replays only if the name is left out."""
    def faults(bucket: str) -> list[str | None]:
        proxy = FaultProxy(0, seed=1723881692, rates=Rates(stall=0.3, slowdown=0.1))
        lines = [f"{m} /{bucket}{path} HTTP/1.1" for m in ("PUT", "HEAD", "GET")
                 for path in ("/backups/f1.bin", "/backups/f2.bin", "?list-type=2&prefix=backups%2F")]
        return [proxy.decide(line.encode())[0] for line in lines * 4]

    assert faults("syncd-test-1-0-aaaaaa") == faults("syncd-test-2-7-bbbbbb")
    assert any(faults("syncd-test-1-0-aaaaaa"))
