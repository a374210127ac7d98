"""Smoke test of the benchmark harness (bench/): syncd alone on a tiny dataset, no peers.

The full benchmark is not part of the test suite (`python bench/run.py`, see the README).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import report, tools
from bench.run import parse_args
from bench.scenarios import Bench, Result, Sizes
from bench.tools import Sample

TINY = Sizes(a_files=20, a_size=512, b_files=1, b_size=1024, d_files=50, d_size=64, e_rate=20.0, e_seconds=1.0,
             e_settle=0.3, f_small=20, f_large=50, h_rate=20.0, h_seconds=1.0, h_crash_at=2.0,
             h_compare=False, i_files=60, i_size=512, i_requests=8, i_clients=2, s_files=6, s_rate=5.0,
             s_rescan=1.0, s_compare=False, s_quiet=1.0)


def test_args() -> None:
    a = parse_args(["--quick"])
    assert a.rounds == 1 and a.only == "abcdefgh"
    assert parse_args(["--only", "i", "--latency-ms", "50"]).only == "i"
    assert parse_args(["--rounds", "5", "--only", "ac"]).rounds == 5


def test_syncd_alone_on_a_tiny_dataset(tmp_path: Path) -> None:
    bench = Bench({"syncd": tools.find_syncd()}, tmp_path, TINY, rounds=1, say=lambda _m: None)
    results = {"a": bench.scenario_a(), "c": bench.scenario_c(), "g": bench.scenario_g()}
    for res in results.values():
        (s,) = res.samples["syncd"]
        assert s.rc == 0 and s.wall > 0 and s.cpu > 0 and s.rss_mib > 10
    (floor,) = results["c"].samples["list-floor"]  # the bare listing found syncd's objects
    assert floor.rc == 0
    md = report.markdown(results, report.verdicts(results), ["# t"])
    assert "| syncd resync | 1 |" in md and "| (info) bare botocore: import, client, list the prefix" in md
    # no peer ran: every target is skipped, none passes or fails
    assert {v.status for v in report.verdicts(results)} == {"SKIP"}


def test_verdicts_pass_and_fail() -> None:
    def res(key: str, walls: dict[str, float], work: float = 100, unit: str = "files") -> Result:
        r = Result(key, key, unit=unit, work=work)
        for tool, wall in walls.items():
            r.add(tool, Sample(wall=wall, cpu=wall / 2, rss_mib=50 if tool == "syncd" else 60, rc=0))
        return r

    results = {
        "a": res("a", {"syncd": 1.0, "aws": 1.5, "rclone": 1.2}),  # 1.5x aws, 1.2x rclone
        "c": res("c", {"syncd": 0.5, "rclone": 0.4, "list-floor": 0.6}),  # slower than rclone
        "g": res("g", {"syncd": 1.0, "aws": 1.0}),
    }
    by_n = {v.n: v for v in report.verdicts(results)}
    assert {n: by_n[n].status for n in (1, 2, 3, 7)} == {1: "PASS", 2: "SKIP", 3: "FAIL", 7: "PASS"}
    assert by_n[3].detail.endswith("a bare botocore listing of the same objects alone: 0.60s")


def test_loss_window_scenario_on_a_tiny_run(tmp_path: Path) -> None:
    from bench.loss_window import scenario_h

    bench = Bench({"syncd": tools.find_syncd()}, tmp_path, TINY, rounds=1, say=lambda _m: None)
    res = scenario_h(bench)
    lat, crash = res.extra["latency"], res.extra["crash"]
    assert lat["files"] == 20 and lat["stored"] == 20 and lat["hist_count"] == 20
    assert crash["acknowledged"] > 0
    md = report.markdown({"h": res}, report.verdicts({"h": res}), ["# t"])
    assert "close -> stored (server clock)" in md and "acknowledged more than 1s before it" in md
    assert {v.n for v in report.verdicts({"h": res}) if v.status != "SKIP"} == {8}


def test_first_byte_scenario_on_a_tiny_run(tmp_path: Path) -> None:
    from bench.first_byte import scenario_i

    bench = Bench({"syncd": tools.find_syncd()}, tmp_path, TINY, rounds=1, say=lambda _m: None)
    res = scenario_i(bench)
    lazy, eager, quiet = res.extra["lazy"], res.extra["eager"], res.extra["quiet"]
    # every missing file requested at READY came back 200 with the seeded bytes, and the restore
    # behind READY still brought back all of them
    assert lazy["requests"] == 8 and lazy["right"] == 8 and lazy["statuses"] == {"200": 8}
    assert lazy["on_disk"] == 60 and eager["on_disk"] == 60 and quiet["right"] == 8
    assert lazy["ttfb"]["p50"] > 0 and lazy["reached"]["p50"] == lazy["reached"]["p50"]  # not NaN
    md = report.markdown({"i": res}, report.verdicts({"i": res}), ["# t"])
    assert "time to first byte of a missing file through /files/" in md and "without lazy_restore" in md
    assert not res.notes
    # figures only: (i) adds no target
    assert all(v.status == "SKIP" for v in report.verdicts({"i": res}))


def test_shared_watches_converge_scenario_on_a_tiny_run(tmp_path: Path) -> None:
    from bench.converge import markdown, scenario_s, verdicts

    bench = Bench({"syncd": tools.find_syncd()}, tmp_path, TINY, rounds=1, say=lambda _m: None)
    res = scenario_s(bench)
    for how in ("events", "listing"):
        r = res.extra[how]
        assert r["files"] == 6 and r["arrived"] == 6 and r["wrong"] == [] and r["extra_on_b"] == []
        assert (r["a"]["uploads"], r["b"]["uploads"], r["b"]["restored"]) == (6, 0, 6)  # nothing bounced back
    (v,) = verdicts(res)
    assert v.n == 5 and v.status in ("PASS", "FAIL")  # a timing: reported, not asserted
    md = markdown(res, [v])
    assert "events_queue, remote_rescan_interval 0 | 6/6" in md and "listing, remote_rescan_interval 1 | 6/6" in md


def test_the_loss_window_under_load_scenario_on_a_tiny_run(tmp_path: Path) -> None:
    from dataclasses import replace

    from bench.loss_load import markdown, scenario_k, verdicts

    sizes = replace(TINY, k_rate=20.0, k_backlog=20, k_kills=1, k_kill_between=(3.0, 3.0))
    bench = Bench({"syncd": tools.find_syncd()}, tmp_path, sizes, rounds=1, say=lambda _m: None)
    res = scenario_k(bench)
    runs = res.extra["runs"]
    assert [r["mode"] for r in runs] == ["steady", "backlog"] and all(r["uploads"]["acked"] > 0 for r in runs)
    assert runs[1]["backlog"] == 20
    vs = verdicts(res)
    assert [v.status in ("PASS", "FAIL") for v in vs] == [True, True]  # timings: reported, not asserted
    md = markdown(res, vs)
    assert "| steady | 3 |" in md and "| backlog, all runs |" in md


def test_the_rate_meter_counts_object_bodies_only() -> None:
    """bench (l)'s proxy: PUT bodies up; GET bodies of objects down (not listings, HEADs, a 100
    Continue or chunk framing), however the stream is cut."""
    from collections import deque

    from bench.ratelimit import HttpCounter

    up = (b"PUT /b/k/x HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello"
          b"HEAD /b/k/x HTTP/1.1\r\n\r\n"
          b"GET /b?list-type=2&prefix=k HTTP/1.1\r\n\r\n"
          b"GET /b/k/x HTTP/1.1\r\n\r\n"
          b"POST /b/k/y?uploads HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
    down = (b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"  # HEAD: no body follows
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n<x/>\r\n0\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    for cut in (1, 7, 1000):
        pending: deque = deque()
        req, resp = HttpCounter("request", pending), HttpCounter("response", pending)
        assert sum(req.feed(up[i:i + cut]) for i in range(0, len(up), cut)) == 5
        assert sum(resp.feed(down[i:i + cut]) for i in range(0, len(down), cut)) == 5  # "abc" + "de"
        assert not pending


def test_the_rate_meter_reports_the_lowest_and_highest_window() -> None:
    from bench.ratelimit import TICK, window_rates

    # 10 ticks of 100 bytes, then 10 of 300: bodies at 1,000 then 3,000 bytes/s
    series = [(t, 100 if t < 10 else 300, 150) for t in range(20)]
    r = window_rates(series, window=10 * TICK)
    assert r["windows"] == 11 and r["bytes"] == 4000
    assert (r["min"], r["max"]) == (1000, 3000)
    assert r["body"] == 4000 / (20 * TICK) and r["all"] == 3000 / (20 * TICK)


def test_server_option_refuses_what_a_server_cannot_run() -> None:
    a = parse_args(["--quick"])
    assert a.server == "waitress" and a.skipped == []
    a = parse_args(["--server", "s3rver"])  # the default set: the rest runs, the report says what did not
    assert a.only == "abcg" and any(x.startswith("(d)/(f) seeds") for x in a.skipped)
    with pytest.raises(SystemExit):  # asked for by name: refused
        parse_args(["--server", "s3rver", "--only", "ad"])
    assert parse_args(["--server", "werkzeug", "--wan"]).only == "wxy"
    assert parse_args(["--server", "s3rver", "--only", "ag", "--latency-ms", "50"]).only == "ag"


def test_the_werkzeug_server_closes_each_connection_and_answers_the_commands(tmp_path: Path) -> None:
    import http.client

    from bench.s3server import MotoServer
    from bench.scenarios import FAKE_AUTH

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_bytes(b"hello")
    with MotoServer(kind="werkzeug") as srv:
        srv.bucket("bkt")
        assert srv.seed("bkt", "p", tmp_path / "d") == 1
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request("PUT", "/bkt/p/x", body=b"abc", headers=FAKE_AUTH)
        resp = conn.getresponse()
        resp.read()
        # moto's own server mode: every request its own connection
        assert resp.status == 200 and resp.getheader("Connection") == "close"
        assert srv.count("bkt", "p/") == 2 and list(srv.stored("bkt")) == ["p/x"]


def test_the_delay_proxy_passes_every_byte_both_ways_in_order() -> None:
    """s3rver's --latency-ms: a delay line in a TCP proxy; what goes in comes out, whole and in order."""
    import socket
    import threading

    from bench.s3server import delay_proxy

    upstream = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        conn, _ = upstream.accept()
        with conn:
            while chunk := conn.recv(1 << 16):
                conn.sendall(chunk)

    threading.Thread(target=echo, daemon=True).start()
    port = delay_proxy(upstream.getsockname()[1], 5)
    payload = bytes(range(256)) * 4096  # 1 MiB, many chunks through the delay line
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        threading.Thread(target=c.sendall, args=(payload,), daemon=True).start()
        got = bytearray()
        while len(got) < len(payload):
            chunk = c.recv(1 << 16)
            assert chunk, "the proxy closed early"
            got += chunk
    assert bytes(got) == payload
    upstream.close()
