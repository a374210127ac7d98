"""Writes the README's explorer-figures block from a long run's report (`SYNCD_EXPLORE_REPORT`).

    python -m tests.explore.figures REPORT.json --commit SHA [--when "..."] [--note "..."] [--readme README.md]

The block sits between `<!-- explorer-figures:begin -->` and `<!-- explorer-figures:end -->`;
only that part of the README changes. Figures are copied from the report, not typed by hand.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
from pathlib import Path

BEGIN, END = "<!-- explorer-figures:begin -->", "<!-- explorer-figures:end -->"
# the oracle's words (tests/explore/world.py) for each kind of broken promise, counted in the failures
KINDS = (
    ("files lost (missing on a host or in a fresh resync)", ": missing"),
    ("deleted files back", "deleted by the app, but back"),
    ("stale hosts after quiet", "stale content"),
    ("bytes no one wrote", "content no one wrote"),
    ("multipart uploads left open", "multipart uploads left open"),
)


def block(report: dict, commit: str, when: str, note: str) -> str:
    elapsed = int(report.get("elapsed", report.get("seconds", 0)))  # what the run took
    rows = [
        ("schedules (4 profiles in turn)", report.get("schedules", 0)),
        ("steps", report.get("steps", 0)),
        ("app writes / deletes and renames", f"{report.get('writes', 0)} / {report.get('deletes', 0)}"),
        ("`kill -9` (and lost hosts)", report.get("kills", 0)),
        ("faults aimed at one file (armed / fired, with the background 1-2%)",
         f"{report.get('faults_armed', 0)} / {report.get('faults_fired', 0)}"),
        ("files checked on every host, the bucket and a fresh resync", report.get("files_checked", 0)),
        ("deletions checked to stay deleted", report.get("deletions_checked", 0)),
        *((what, sum(f.count(needle) for f in report.get("failures", []))) for what, needle in KINDS),
        ("**schedules that broke the contract**", f"**{len(report.get('failures', []))}**"),
    ]
    out = [BEGIN,
           f"Last long run: {when}, commit `{commit}`, {elapsed // 60} min {elapsed % 60} s of new seeds on "
           f"this 2-core machine "
           f"(`SYNCD_EXPLORE_SECONDS={report.get('seconds', 0)} SYNCD_EXPLORE_KEEP_GOING=1`){note}.",
           "", "| figure | count |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    failures = report.get("failures", [])
    if failures:
        out += ["", "Failing seeds (replay each with `SYNCD_EXPLORE=PROFILE:SEED:30`):", ""]
        for f in failures:
            m = re.search(r"profile (\S+) seed (\d+)", f)
            # the message after the heading, the replay lines and the schedule (test_explore.explore)
            what = "; ".join(ln.strip() for ln in f.split("\n")[4:] if ln.strip()) or f
            out.append(f"- `{m.group(1)}:{m.group(2)}`: {what}" if m else f"- {what}")
    out.append(END)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--commit", required=True)
    ap.add_argument("--when", default=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"))
    ap.add_argument("--note", default="", help="appended to the first sentence, e.g. ', while other work ran on it'")
    ap.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[2] / "README.md")
    a = ap.parse_args(argv)
    text = a.readme.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = block(json.loads(a.report.read_text()), a.commit, a.when, a.note)
    a.readme.write_text(text[:start] + new + text[end:])


if __name__ == "__main__":
    main()
