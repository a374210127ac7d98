"""Smoke test of the WAN scenarios of bench/ (issue 16): syncd alone, a tiny dataset, 20 ms per request.

The full WAN benchmark is opt-in (`python bench/run.py --wan`, see bench/README.md).
"""

from __future__ import annotations

from pathlib import Path

from bench import tools
from bench.run import ALL, parse_args
from bench.scenarios import Result, Sizes
from bench.tools import Sample
from bench.wan import RCLONE_DEFAULTS, markdown, run_wan, verdicts

TINY = Sizes(a_files=20, a_size=512)


def test_wan_scenarios_are_opt_in() -> None:
    assert not set("wxy") & set(parse_args([]).only)
    assert parse_args(["--wan"]).only == "wxy"
    assert parse_args(["--only", "a", "--wan"]).only == "awxy"
    a = parse_args(["--wan", "--latency-ms", "200", "--wan-rounds", "1"])
    assert a.latency_ms == 200 and a.wan_rounds == 1
    assert parse_args(["--quick"]).only == ALL and parse_args([]).latency_ms == 0


def test_wan_upload_restore_and_noop_with_syncd_alone(tmp_path: Path) -> None:
    results, failed = run_wan({"syncd": tools.find_syncd()}, tmp_path, TINY, "wxy", [20.0], 1, say=lambda _m: None)
    assert not failed
    assert set(results) == {"w20", "x20", "y20"}
    for res in results.values():
        (s,) = res.samples["syncd"]
        assert s.rc == 0 and s.wall > 0
    vs = verdicts(results)
    assert {v.status for v in vs} == {"SKIP"} and len(vs) == 2  # upload and restore; no peer ran
    assert "| 20 ms | (w) first upload | syncd resync | defaults (workers 8) |" in markdown(results, vs)


def test_wan_verdicts_and_the_table_say_which_rclone_is_which() -> None:
    def res(key: str, walls: dict[str, float]) -> Result:
        r = Result(key, f"{key[1:]}ms per request: x", unit="files", work=100)
        for tool, wall in walls.items():
            r.add(tool, Sample(wall=wall, cpu=1.0, rss_mib=50, rc=0))
        return r

    results = {
        "w50": res("w50", {"syncd": 1.0, "aws": 2.5, RCLONE_DEFAULTS: 5.0, "rclone": 1.5}),  # 2.5x aws
        "x50": res("x50", {"syncd": 1.0, "aws": 1.5, "rclone": 1.2}),  # only 1.5x aws
        "w200": res("w200", {"syncd": 1.0, "aws": 3.0, "rclone": 0.9}),  # slower than tuned rclone
    }
    # in order of latency, upload before restore: w50, x50, w200
    assert [v.status for v in verdicts(results)] == ["PASS", "FAIL", "FAIL"]
    md = markdown(results, verdicts(results))
    assert "defaults (--transfers 4 --checkers 8, size + modtime)" in md
    assert "tuned: --transfers 16 --checksum --fast-list" in md
