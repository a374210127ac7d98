"""The fault explorer in the default test command: the corpus of seeds that found bugs, then new
seeds until the budget is spent (README "The fault explorer").

- `SYNCD_EXPLORE_SECONDS` (default 30): the budget for new seeds after the corpus (at least one
  schedule; another starts while the mean schedule still fits).
- `SYNCD_EXPLORE=PROFILE:SEED[:LENGTH]` replays one schedule (and nothing else).
- `SYNCD_EXPLORE_SCHEDULE=FILE` replays a saved (shrunk) schedule: `{"profile": ..., "steps": [...]}`.
- `SYNCD_EXPLORE_SHRINK` (seconds, default 120): how long a failure is shrunk before it is reported.
- `SYNCD_EXPLORE_REPORT=FILE`: where the figures of the new seeds' run are written (JSON).
- `SYNCD_EXPLORE_KEEP_GOING=1`: a long run goes on after a failing seed (no shrinking) and fails
  at the end with every failure.
- `SYNCD_EXPLORE_LOG_LEVEL=debug`: the hosts log every decision (their logs stay under the
  test's temp dir, `run/hostN/daemonM.log`).
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from tests.explore.schedule import PROFILES, Step, generate
from tests.explore.world import Violation, World

HERE = Path(__file__).parent
CORPUS = json.loads((HERE / "corpus.json").read_text())
LENGTH = 30
FIGURES: dict[str, int] = {"schedules": 0, "steps": 0, "kills": 0, "faults_armed": 0, "writes": 0, "deletes": 0,
                           "violations": 0}


pytestmark = pytest.mark.usefixtures("moto_computes_crc32c")


@pytest.fixture(autouse=True)
def _small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Other tools' multipart objects here have 256 KiB parts (S3's floor is 5 MiB; moto's is a
    setting): composite checksums without writing megabytes."""
    import moto.s3.models

    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", 256 * 1024)


def run_schedule(tmp: Path, moto: str, profile: str, seed: int, steps: list[Step], quiet: float = 60.0) -> World:
    trace: list[str] = []
    world = World(tmp, moto, PROFILES[profile], seed, log=trace, quiet=quiet)
    try:
        world.run(steps)
    except Violation as e:
        FIGURES["violations"] += 1
        raise Violation(f"{e}\n--- trace ---\n" + "\n".join(trace[-80:])) from None
    finally:
        world.close()
        for k, v in world.counts.items():
            FIGURES[k] = FIGURES.get(k, 0) + v
        FIGURES["schedules"] += 1
    return world


def shrink(tmp: Path, moto: str, profile: str, seed: int, steps: list[Step], budget: float) -> list[Step]:
    """Delta debugging, bounded in time: drop chunks of steps while the schedule still fails."""
    deadline = time.monotonic() + budget
    n, k = 0, 2
    while len(steps) > 1 and time.monotonic() < deadline:
        size = max(1, len(steps) // k)
        removed = False
        for start in range(0, len(steps), size):
            if time.monotonic() > deadline:
                break
            cand = steps[:start] + steps[start + size:]
            n += 1
            try:
                # a shorter quiet: a candidate that needs longer to converge counts as failing too
                run_schedule(tmp / f"shrink{n}", moto, profile, seed, cand, quiet=20.0)
            except Violation:
                steps, removed = cand, True
                break
            except Exception:  # noqa: BLE001 - a candidate that breaks the harness is no smaller bug
                continue
        if not removed:
            if size == 1:
                break
            k = min(len(steps), k * 2)
    return steps


def explore(tmp: Path, moto: str, profile: str, seed: int, steps: list[Step] | None = None,
            length: int = LENGTH) -> None:
    steps = steps if steps is not None else generate(PROFILES[profile], seed, length)
    try:
        run_schedule(tmp / "run", moto, profile, seed, steps)
    except Violation as e:
        budget = float(os.environ.get("SYNCD_EXPLORE_SHRINK", "120"))
        if os.environ.get("SYNCD_EXPLORE_KEEP_GOING") == "1":
            budget = 0.0
        small = shrink(tmp, moto, profile, seed, list(steps), budget) if budget > 0 else steps
        saved = tmp / "schedule.json"
        saved.write_text(json.dumps({"profile": profile, "seed": seed, "steps": small}, indent=1))
        raise Violation(
            f"explorer: profile {profile} seed {seed} broke the contract.\n"
            f"replay: SYNCD_EXPLORE={profile}:{seed}:{length} python -m pytest tests/explore -q\n"
            f"shrunk to {len(small)} of {len(steps)} steps: SYNCD_EXPLORE_SCHEDULE={saved} "
            f"python -m pytest tests/explore -q\n{json.dumps(small)}\n{e}") from None


def _replay() -> tuple[str, int, list[Step], int] | None:
    if os.environ.get("SYNCD_EXPLORE_SCHEDULE"):
        doc = json.loads(Path(os.environ["SYNCD_EXPLORE_SCHEDULE"]).read_text())
        return doc["profile"], int(doc["seed"]), doc["steps"], len(doc["steps"])
    if os.environ.get("SYNCD_EXPLORE"):
        parts = os.environ["SYNCD_EXPLORE"].split(":")
        length = int(parts[2]) if len(parts) > 2 else LENGTH
        return parts[0], int(parts[1]), generate(PROFILES[parts[0]], int(parts[1]), length), length
    return None


REPLAY = _replay()


@pytest.mark.skipif(REPLAY is None, reason="replays one schedule only when SYNCD_EXPLORE or "
                                           "SYNCD_EXPLORE_SCHEDULE is set")
def test_replay(tmp_path: Path, moto_server: str) -> None:
    assert REPLAY is not None
    explore(tmp_path, moto_server, *REPLAY)


@pytest.mark.skipif(REPLAY is not None, reason="replaying one schedule")
@pytest.mark.parametrize("entry", CORPUS, ids=[f"{c['profile']}:{c['seed']}" for c in CORPUS])
def test_the_corpus_of_seeds_that_found_bugs_still_holds(entry: dict, tmp_path: Path, moto_server: str) -> None:
    """Each of these seeds once found a bug (its note says which); it must keep passing. An entry
    with `steps` is a schedule reduced by hand from its seed: it replays those steps."""
    explore(tmp_path, moto_server, entry["profile"], entry["seed"], entry.get("steps"),
            length=entry.get("length", LENGTH))


@pytest.mark.skipif(REPLAY is not None, reason="replaying one schedule")
def test_new_seeds_within_the_budget(tmp_path: Path, moto_server: str) -> None:
    """Fresh seeds, every profile in turn, until the budget is spent: each run explores new
    schedules. A failure prints its seed and the command that replays it."""
    budget = float(os.environ.get("SYNCD_EXPLORE_SECONDS", "30"))
    deadline = time.monotonic() + budget
    rng = random.Random()
    names = sorted(PROFILES)
    i = rng.randrange(len(names))
    n = 0
    keep_going = os.environ.get("SYNCD_EXPLORE_KEEP_GOING") == "1"  # a long run: count, then fail
    failures: list[str] = []
    started = time.monotonic()
    # a schedule starts only while one more (as long as the mean so far) fits in the budget:
    # the budget is what the run takes, not when its last schedule may begin
    while n == 0 or time.monotonic() + (time.monotonic() - started) / n < deadline:
        profile = names[i % len(names)]
        seed = rng.randrange(1, 2**31)
        print(f"explorer: {profile}:{seed}")
        try:
            explore(tmp_path / f"s{n}", moto_server, profile, seed)
        except Violation as e:
            if not keep_going:
                raise
            failures.append(str(e).split("\n--- trace ---")[0])
        i += 1
        n += 1
    report = {**FIGURES, "seconds": int(budget), "elapsed": int(time.monotonic() - started), "failures": failures}
    print(f"explorer figures: {json.dumps(report)}")
    if os.environ.get("SYNCD_EXPLORE_REPORT"):
        Path(os.environ["SYNCD_EXPLORE_REPORT"]).write_text(json.dumps(report, indent=1) + "\n")
    assert not failures, "\n\n".join(failures)
