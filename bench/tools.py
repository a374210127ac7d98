"""The contenders (syncd, `aws s3 sync`, `rclone sync`), their setup, and measured runs.

A measured run is one child process: wall time from spawn to exit, its CPU (user + sys) and its
peak RSS from `os.wait4`, which covers the child and every descendant it waited for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BENCH_VENV = BENCH_DIR / ".venv"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
RCLONE_TRANSFERS = 16
TRANSFERS = ""  # run.py --transfers: `[remote] transfers` of every syncd run ("": syncd's default)


@dataclass
class Sample:
    wall: float  # seconds
    cpu: float  # seconds, user + sys
    rss_mib: float  # peak resident set size
    rc: int


@dataclass
class Tool:
    name: str
    argv: list[str]  # how to start it
    version: str = ""
    notes: list[str] = field(default_factory=list)


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}
    env.update(CREDENTIALS)
    env.update(extra or {})
    return env


def measure(argv: list[str], *, env: dict[str, str], log: Path, cwd: Path | None = None,
            timeout: float = 1800) -> Sample:
    """Run one child to completion; raise if it fails."""
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"timed out after {timeout}s: {' '.join(argv)} (log {log})")
            time.sleep(0.002)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    sample = Sample(wall=wall, cpu=ru.ru_utime + ru.ru_stime, rss_mib=ru.ru_maxrss / 1024, rc=proc.returncode)
    if sample.rc != 0:
        raise RuntimeError(f"exit {sample.rc}: {' '.join(argv)} (log {log})")
    return sample


def _version(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=bench_env())
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return (out.stdout or out.stderr).strip().splitlines()[0]


# --- setup: find or install the peers -----------------------------------------------------------

def _apt_install(pkg: str, say) -> bool:
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return False
    say(f"setup: apt-get install -y {pkg}")
    if subprocess.run(["apt-get", "install", "-y", "-q", pkg], capture_output=True).returncode == 0:
        return True
    subprocess.run(["apt-get", "update", "-q"], capture_output=True)
    return subprocess.run(["apt-get", "install", "-y", "-q", pkg], capture_output=True).returncode == 0


def _real_aws(path: str) -> str:
    """Resolve a pyenv shim (a bash script that re-dispatches) to the real entry point."""
    try:
        head = Path(path).read_bytes()[:200]
    except OSError:
        return path
    if b"pyenv" in head and shutil.which("pyenv"):
        out = subprocess.run(["pyenv", "which", "aws"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return path


def find_aws(install: bool, say) -> Tool | None:
    candidates = [str(BENCH_VENV / "bin" / "aws")]
    if (w := shutil.which("aws")) is not None:
        candidates.insert(0, _real_aws(w))
    for c in candidates:
        if Path(c).exists() and (v := _version([c, "--version"])):
            return Tool("aws s3 sync", [c], version=v)
    if not install:
        return None
    say(f"setup: pip install awscli into {BENCH_VENV}")
    ok = subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], capture_output=True).returncode == 0 \
        and subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", "-q", "awscli"],
                           capture_output=True).returncode == 0
    if not ok and _apt_install("awscli", say):
        w = shutil.which("aws")
        if w and (v := _version([w, "--version"])):
            return Tool("aws s3 sync", [w], version=v)
    c = str(BENCH_VENV / "bin" / "aws")
    if ok and (v := _version([c, "--version"])):
        return Tool("aws s3 sync", [c], version=v)
    return None


def find_rclone(install: bool, say) -> Tool | None:
    w = shutil.which("rclone")
    if w is None and install and _apt_install("rclone", say):
        w = shutil.which("rclone")
    if w is None:
        return None
    v = _version([w, "version"])
    return Tool("rclone", [w], version=v or "?") if v else None


def find_syncd() -> Tool:
    script = Path(sys.executable).parent / "syncd"
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "syncd"]
    return Tool("syncd", argv, version=_version([*argv, "--version"]) or "?")


def setup(install: bool = True, say=print) -> dict[str, Tool]:
    """syncd plus every peer that runs here (installed when missing); a missing one is skipped."""
    tools = {"syncd": find_syncd()}
    aws = find_aws(install, say)
    if aws is None:
        say("setup: aws CLI not available and could not be installed: skipping the `aws s3 sync` peer")
    else:
        tools["aws"] = aws
    rclone = find_rclone(install, say)
    if rclone is None:
        say("setup: rclone not available and could not be installed: skipping the rclone peer")
    else:
        tools["rclone"] = rclone
    for t in tools.values():
        say(f"setup: {t.name}: {' '.join(t.argv)} ({t.version})")
    return tools


# --- command lines ------------------------------------------------------------------------------

def rclone_env(endpoint: str, conf: Path) -> dict[str, str]:
    conf.touch()
    return bench_env({
        "RCLONE_CONFIG": str(conf),
        "RCLONE_CONFIG_BENCH_TYPE": "s3",
        "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
        "RCLONE_CONFIG_BENCH_ENDPOINT": endpoint,
        "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "RCLONE_CONFIG_BENCH_REGION": "us-east-1",
        "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true",
    })


def aws_sync(tool: Tool, endpoint: str, src: str, dst: str) -> list[str]:
    return [*tool.argv, "--endpoint-url", endpoint, "s3", "sync", src, dst, "--only-show-errors"]


def rclone_sync(tool: Tool, src: str, dst: str) -> list[str]:
    return [*tool.argv, "sync", src, dst, "--checksum", "--fast-list", "--transfers", str(RCLONE_TRANSFERS),
            "--s3-no-check-bucket", "-q"]


def write_syncd_config(path: Path, *, endpoint: str, bucket: str, prefix: str, watch: Path, watch_prefix: str,
                       ledger: Path, settle: float = 2.0, workers: int | None = None,
                       log_level: str = "info", remote_extra: dict[str, int] | None = None,
                       bwlimit: str = "") -> Path:
    lines = [
        "[syncd]",
        f'ledger = "{ledger}"',
        f'log_level = "{log_level}"',
        f"settle_seconds = {settle}",
        'health_listen = ""',
    ]
    if workers is not None:
        lines.append(f"workers = {workers}")
    if bwlimit:
        lines.append(f'bwlimit = "{bwlimit}"')
    lines += [
        "",
        "[remote]",
        f'url = "s3://{bucket}/{prefix}"',
        f'endpoint_url = "{endpoint}"',
        'region = "us-east-1"',
        *([f'transfers = "{TRANSFERS}"'] if TRANSFERS else []),
        *(f"{k} = {v}" for k, v in (remote_extra or {}).items()),
        "",
        "[[watch]]",
        f'path = "{watch}"',
        f'prefix = "{watch_prefix}"',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
