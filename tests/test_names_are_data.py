"""Names are data (SPEC §4.14) and JSON logs are JSON on every line (SPEC §2).

A file name in an uploads directory comes from the internet. Every name class that can forge a
log line or drive a terminal — newline, carriage return, an escape sequence, bidi controls,
bytes that are not UTF-8, and a name that is itself a log line — goes through every place syncd
prints names: `restore --dry-run`, `resync -v` (its `failed:` lines and debug lines), `status`,
`status --json`, `run`'s log, the page and /metrics. What comes out is read as bytes (the
commands run as real processes): valid UTF-8, no control character but each line's own
newline, no bidi control, and no line that a name started.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

from syncd.names import shown
from tests.conftest import Store, free_port, wait_for
from tests.daemon_util import DaemonProc

FORGED = "x\n2026-12-07 10:00:00,000 INFO syncd.daemon: all files synced"
NAMES = ["nl\nname.txt", "cr\rname.txt", "esc\x1b[31mred.txt", "rlo\u202egnp.exe", "iso\u2066x\u2069.txt", FORGED]
BAD_UTF8 = b"bad\xff.txt"
# a key longer than 1024 bytes: the file is `failed` with a reason, so warnings and `failed:` name it
LONG = "/".join(["d" * 200] * 6)
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f\u202a-\u202e\u2066-\u2069]")
# where a name's newline would have started a line of its own
NAME_STARTED_LINE = re.compile(r"(?m)^(?:name\.txt|2026-12-07 10:00:00,000)")


def printable(what: str, data: bytes) -> str:
    """`data` as text, failing when it holds invalid UTF-8, a raw control or bidi character, or
    a line that a name's newline started."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AssertionError(f"{what}: invalid UTF-8 at byte {e.start}: "
                             f"{data[max(0, e.start - 60):e.start + 5]!r}") from None
    bad = [line for line in text.split("\n") if RAW.search(line)]
    assert not bad, f"{what}: raw control characters in {bad[:3]!r}"
    started = [m.group() for m in NAME_STARTED_LINE.finditer(text)]
    assert not started, f"{what}: a name started a line of its own: {started!r}\n{text[-3000:]}"
    return text


def syncd(config: Path, *args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "syncd", "--config", str(config), *args], capture_output=True,
                       timeout=120)
    if "-v" not in args:  # -v asks for tracebacks
        assert b"Traceback" not in p.stdout + p.stderr, (p.stdout + p.stderr).decode(errors="replace")
    return p


def write(root: Path, rel: str | bytes, data: bytes = b"x") -> None:
    path = os.path.join(os.fsencode(root), os.fsencode(rel))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def file_env(make_env, tmp_path: Path, **kw):
    root = tmp_path / "remote"
    return make_env(Store(kind="file", url=f"file://{root}", root=root), **kw)


def test_a_hostile_name_is_printed_escaped_in_logs_output_status_and_the_page(tmp_path, make_env):
    port = free_port()
    env = file_env(make_env, tmp_path, syncd={"health_listen": f"127.0.0.1:{port}"})
    for name in NAMES:
        write(env.root, name)  # uploaded: named by `-v`
        write(env.root, f"{LONG}/{name}")  # failed: named by warnings, `failed:`, status, the page
        write(env.tmp / "remote" / "uploads", "r" + name)  # restored: named by the dry run
    write(env.root, BAD_UTF8)
    write(env.tmp / "remote" / "uploads", b"r" + BAD_UTF8)

    p = syncd(env.config, "restore", "--dry-run")
    out = printable("restore --dry-run stdout", p.stdout)
    printable("restore --dry-run stderr", p.stderr)
    assert "restore uploads/rx\\n2026-12-07 10:00:00,000 INFO syncd.daemon: all files synced" in out

    p = syncd(env.config, "resync", "-v")
    assert p.returncode == 1
    printable("resync -v stdout", p.stdout)
    err = printable("resync -v stderr", p.stderr)
    assert f"failed: uploads/{LONG}/x\\n2026-12-07 10:00:00,000 INFO syncd.daemon: all files synced: key is" in err
    assert "failed: uploads/bad\\xff.txt: name is not valid UTF-8" in err
    assert "uploads/esc\\x1b[31mred.txt" in err and "uploads/rlo\\u202egnp.exe" in err

    text = printable("status", syncd(env.config, "status").stdout)
    assert f"{LONG}/cr\\rname.txt: key is longer" in text and "bad\\xff.txt: name is not valid UTF-8" in text
    raw = syncd(env.config, "status", "--json").stdout
    printable("status --json", raw)
    failed = {f["path"] for f in json.loads(raw)["watches"][0]["failures"]}
    assert {f"{LONG}/{n}" for n in NAMES} | {"bad\\xff.txt"} <= failed  # JSON keeps the name itself

    for name in NAMES:  # new failures, so that `run` warns about them
        write(env.root, f"{LONG}/run-{name}")
    daemon = DaemonProc(env.config, env.ledger, tmp_path / "run.log").start()
    try:
        daemon.wait_ready()
        page = printable("GET /", get(f"http://127.0.0.1:{port}/"))
        assert "x\\n2026-12-07 10:00:00,000 INFO syncd.daemon: all files synced" in page
        metrics = printable("GET /metrics", get(f"http://127.0.0.1:{port}/metrics"))
        assert "gnp.exe" not in metrics and "all files synced" not in metrics  # counts, no names (SPEC §6)
        printable("GET /status", get(f"http://127.0.0.1:{port}/status"))
        wait_for(lambda: "run-x\\n2026-12-07" in daemon.log_path.read_bytes().decode(errors="replace"), 30,
                 what="run's warning naming the new failure")
    finally:
        assert daemon.stop() == 0
    printable("run's log", daemon.log_path.read_bytes())


def test_every_stderr_line_of_a_json_resync_is_a_json_object(tmp_path, make_env):
    env = file_env(make_env, tmp_path, syncd={"log_format": "json"})
    write(env.root, "ok.txt")
    for name in NAMES:
        write(env.root, f"{LONG}/{name}")
    write(env.root, BAD_UTF8)

    def json_lines(what: str, data: bytes) -> list[dict]:
        lines = printable(what, data).splitlines()
        assert lines, f"{what}: nothing on stderr"
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"{what}: not JSON: {line!r}\n{data.decode(errors='replace')}") from None
            assert isinstance(out[-1], dict) and {"time", "level", "msg"} <= out[-1].keys(), line
        return out

    p = syncd(env.config, "resync", "-v")
    assert p.returncode == 1
    msgs = [o["msg"] for o in json_lines("resync stderr", p.stderr)]
    assert any(m.startswith(f"failed: uploads/{LONG}/x\\n2026-12-07") for m in msgs), msgs
    assert p.stdout.decode().startswith("uploaded 1,")  # the summary is the command's product: stdout

    p = syncd(env.config, "restore", "--at", "2h", "-v")  # an error (exit 2), with -v's traceback
    assert p.returncode == 2
    objs = json_lines("restore --at stderr", p.stderr)
    assert objs[-1]["level"] == "error" and "file://" in objs[-1]["msg"], objs

    bad = write_bad_config(env.config)
    objs = json_lines("config error stderr", syncd(bad, "status").stderr)
    assert "no_such_key" in objs[-1]["msg"], objs


def write_bad_config(config: Path) -> Path:
    """The config with an unknown key: an error before logging is set up, still in JSON."""
    bad = config.with_name("bad.toml")
    bad.write_text(config.read_text().replace("[syncd]\n", "[syncd]\nno_such_key = 1\n", 1))
    return bad


def test_a_name_is_shown_escaped_and_escaping_twice_changes_nothing():
    assert shown(FORGED) == "x\\n2026-12-07 10:00:00,000 INFO syncd.daemon: all files synced"
    assert shown("a\r\t\x1b[31m\x7f\x85") == "a\\r\\t\\x1b[31m\\x7f\\x85"
    assert shown("rlo\u202egnp\u2066.exe\u200b") == "rlo\\u202egnp\\u2066.exe\\u200b"
    # undecodable bytes read from the disk print as the ledger stores them (SPEC §5): one form
    assert shown(b"bad\xff.txt") == shown("bad\udcff.txt") == "bad\\xff.txt"
    assert shown("bad\\xff.txt") == "bad\\xff.txt"  # the ledger's form is kept, not escaped again
    for name in NAMES + ["bad\udcff.txt"]:
        assert shown(shown(name)) == shown(name)
    assert shown("caf\u00e9 \u65e5\u672c.jpg") == "caf\u00e9 \u65e5\u672c.jpg"  # printable unicode stays
