"""The figures a reliability run collects, and the report `pytest tests/reliability --soak` writes.

Every scenario adds what it did (faults injected by kind, kills, files written, files checked
byte for byte, files lost) and the seeds it used. At the end of the session the totals are
printed; with --soak they are also written to `tests/reliability/last-run.md` / `.json` and into
the README's Reliability section (between the `reliability-figures` markers).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import random
import subprocess
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.reliability.faultproxy import KINDS

HERE = Path(__file__).parent
REPO = HERE.parent.parent
BEGIN, END = "<!-- reliability-figures:begin -->", "<!-- reliability-figures:end -->"
FAULT_NAMES = {"reset": "connection reset after N bytes", "stall": "stall, then reset",
               "slowdown": "HTTP 503 SlowDown", "internal": "HTTP 500 InternalError"}


@dataclass
class Figures:
    faults: Counter = field(default_factory=Counter)
    kills: int = 0
    files_written: int = 0
    writes: int = 0
    files_verified: int = 0
    files_lost: int = 0
    resurrected: int = 0
    tombstones_checked: int = 0
    hostile_cases: int = 0
    seeds: dict[str, int] = field(default_factory=dict)
    scenarios: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def seed(self, name: str) -> int:
        """The seed for `name`: $SYNCD_SEED_<NAME>, else $SYNCD_SEED, else a fresh random one."""
        env = os.environ.get(f"SYNCD_SEED_{name.upper()}") or os.environ.get("SYNCD_SEED")
        value = int(env) if env else random.SystemRandom().randrange(1, 2**31)
        with self.lock:
            self.seeds[name] = value
        print(f"seed {name}={value} (replay: SYNCD_SEED_{name.upper()}={value})")
        return value

    def add(self, scenario: str, *, faults: dict[str, int] | None = None, **counts: int) -> None:
        with self.lock:
            self.faults.update(faults or {})
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)
            self.scenarios.append({"scenario": scenario, **({"faults": dict(faults)} if faults else {}),
                                   **counts})

    def empty(self) -> bool:
        return not self.scenarios

    def as_dict(self, *, soak: bool, passed: int, failed: int, seconds: float) -> dict:
        return {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _commit(), "mode": "soak" if soak else "ci", "python": platform.python_version(),
            "tests_passed": passed, "tests_failed": failed, "seconds": round(seconds),
            "faults": {k: self.faults.get(k, 0) for k in KINDS}, "kills": self.kills,
            "files_written": self.files_written, "writes": self.writes,
            "files_verified": self.files_verified, "files_lost": self.files_lost,
            "resurrected_after_kill": self.resurrected, "tombstones_checked": self.tombstones_checked,
            "hostile_cases": self.hostile_cases, "seeds": dict(sorted(self.seeds.items())),
            "scenarios": self.scenarios,
        }


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def markdown(d: dict) -> str:
    faults = d["faults"]
    rows = [f"| {FAULT_NAMES[k]} | {faults[k]} |" for k in KINDS]
    seeds = " ".join(f"`SYNCD_SEED_{k.upper()}={v}`" for k, v in d["seeds"].items())
    return "\n".join([
        f"Last run: {d['date']}, commit `{d['commit']}`, `{d['mode']}` mode, {d['seconds']} s, "
        f"{d['tests_passed']} tests passed, {d['tests_failed']} failed.",
        "",
        "| faults injected (by kind) | count |",
        "|---|---|",
        *rows,
        f"| **total** | {sum(faults.values())} |",
        "",
        "| outcome | count |",
        "|---|---|",
        f"| `kill -9` of the daemon | {d['kills']} |",
        f"| files written (distinct) | {d['files_written']} |",
        f"| writes (creates, rewrites, appends, renames, deletes) | {d['writes']} |",
        f"| files verified byte-identical in the bucket (with `syncd-sha256`) | {d['files_verified']} |",
        f"| deletions checked to stay deleted after restarts (tombstones) | {d['tombstones_checked']} |",
        f"| deletions cut off by a kill and restored, as SPEC §4.5 says | {d['resurrected_after_kill']} |",
        f"| hostile or odd inputs checked | {d['hostile_cases']} |",
        f"| **files lost** | **{d['files_lost']}** |",
        "",
        f"Seeds (replay with these environment variables): {seeds}",
    ])


def write_report(d: dict) -> list[Path]:
    """last-run.json / last-run.md, and the README block when the run passed."""
    written = []
    (HERE / "last-run.json").write_text(json.dumps(d, indent=2) + "\n")
    md = markdown(d)
    (HERE / "last-run.md").write_text("# Reliability: last run\n\nWritten by "
                                      "`python -m pytest tests/reliability --soak`.\n\n" + md + "\n")
    written += [HERE / "last-run.json", HERE / "last-run.md"]
    readme = REPO / "README.md"
    text = readme.read_text()
    if d["tests_failed"] == 0 and BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _old, tail = rest.split(END, 1)
        readme.write_text(f"{head}{BEGIN}\n{md}\n{END}{tail}")
        written.append(readme)
    return written
