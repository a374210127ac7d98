"""What a packager and CI rely on (issue 14, findings 21 and 22): a license, the metadata that
says what syncd runs on, one pinned set of tested versions used everywhere it is installed, and
CI checking types and style besides the tests."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_license_and_metadata_say_what_syncd_is_and_runs_on() -> None:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert meta["license"] == {"text": "MIT"} and "LICENSE" in meta["license-files"]
    assert meta["requires-python"] == ">=3.11"
    assert "Programming Language :: Python :: 3.11" in meta["classifiers"]
    assert "License :: OSI Approved :: MIT License" in meta["classifiers"]
    assert "Python 3.11 or newer" in (REPO / "README.md").read_text()


def test_every_dependency_is_pinned_in_the_constraints_that_every_install_uses() -> None:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned = {_name(line) for line in (REPO / "constraints.txt").read_text().splitlines()
              if line and not line.startswith("#") and "==" in line}
    wanted = {_name(r) for r in meta["dependencies"] + meta["optional-dependencies"]["test"]}
    assert wanted <= pinned, sorted(wanted - pinned)
    readme = (REPO / "README.md").read_text()
    installs = re.findall(r"pip install [^\n`]*", readme) + re.findall(r"pip install [^\n`]*",
                                                                       (REPO / ".ci" / "run").read_text())
    installs = [i for i in installs if "-e ." in i or "-e '.[test]'" in i]
    assert len(installs) >= 3 and all("-c constraints.txt" in i for i in installs), installs
    assert "constraints.txt" in (REPO / "packaging" / "container" / "Dockerfile").read_text()


def test_ci_runs_the_readme_test_command_then_ruff_and_mypy() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    test_command = re.search(r"python3 -m venv \.venv && \.venv/bin/pip install -c constraints\.txt "
                             r"-e '\.\[test\]' && \.venv/bin/python -m pytest -q", readme)
    assert test_command is not None and test_command.group(0) in ci
    assert ci.index(test_command.group(0)) < ci.index(".venv/bin/ruff check .") < ci.index(".venv/bin/mypy")
    mypy = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    assert mypy["files"] == ["syncd"]
