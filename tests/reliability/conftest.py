"""Fixtures of the reliability suite: soak mode, seeds, the figures of the run and its report."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.reliability.figures import Figures, write_report

FIGURES = Figures()
_session = {"start": time.monotonic(), "passed": 0, "failed": 0}


def is_soak(config: pytest.Config) -> bool:
    return bool(config.getoption("--soak", default=False)) or os.environ.get("SYNCD_SOAK") == "1"


@pytest.fixture(scope="session")
def soak(request: pytest.FixtureRequest) -> bool:
    """Longer, larger runs: `pytest tests/reliability --soak` or SYNCD_SOAK=1."""
    return is_soak(request.config)


@pytest.fixture
def figures() -> Figures:
    return FIGURES


@pytest.fixture
def seed(figures: Figures, request: pytest.FixtureRequest):
    """`seed("name")`: a printed, replayable seed (SYNCD_SEED_<NAME> or SYNCD_SEED)."""

    def get(name: str) -> int:
        value = figures.seed(name)
        request.node.user_properties.append((f"seed_{name}", value))
        return value

    return get


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    seeds = [f"SYNCD_SEED_{k[5:].upper()}={v}" for k, v in item.user_properties if k.startswith("seed_")]
    if seeds and report.failed:
        report.sections.append(("replay with", " ".join(seeds)))
    if "reliability" in item.nodeid:
        if report.failed:
            _session["failed"] += 1
        elif report.when == "call" and report.passed:
            _session["passed"] += 1


def pytest_collection_finish(session: pytest.Session) -> None:
    """The README figures are only rewritten by a run of the whole suite (no -k, every file)."""
    here = Path(__file__).parent
    ran = {Path(str(item.path)).name for item in session.items if Path(str(item.path)).parent == here}
    every = {p.name for p in here.glob("test_*.py")}
    _session["complete"] = ran == every and not session.config.getoption("keyword") \
        and not session.config.getoption("markexpr")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if FIGURES.empty():
        return
    d = FIGURES.as_dict(soak=is_soak(config), passed=_session["passed"], failed=_session["failed"],
                        seconds=time.monotonic() - _session["start"])
    tr = terminalreporter
    tr.section("reliability figures")
    faults = ", ".join(f"{k} {v}" for k, v in d["faults"].items())
    tr.write_line(f"faults injected: {faults}; kills: {d['kills']}; files written: {d['files_written']}; "
                  f"verified: {d['files_verified']}; lost: {d['files_lost']}")
    tr.write_line("seeds: " + " ".join(f"SYNCD_SEED_{k.upper()}={v}" for k, v in d["seeds"].items()))
    if is_soak(config):
        if not _session.get("complete"):
            tr.write_line("not writing the report: only a part of tests/reliability ran")
            return
        for p in write_report(d):
            tr.write_line(f"wrote {p}")
