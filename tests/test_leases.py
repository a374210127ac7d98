"""syncd.leases: the kernel says whether anyone still writes a file (a read lease, Linux)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from syncd import leases
from syncd.leases import Leases

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not leases.method()[0],
                                reason="kernel leases are a Linux feature")


def test_a_closed_file_is_whole_with_its_size_and_mtime(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"closed")
    st = Leases().whole(f)
    assert st is not None and (st.st_size, st.st_mtime_ns) == (6, f.stat().st_mtime_ns)


def test_a_file_open_for_writing_is_not_whole(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    with open(f, "wb") as w:
        w.write(b"half")
        assert Leases().whole(f) is None  # this process's own writer counts too
    holder = subprocess.Popen([sys.executable, "-c", "import sys; f = open(sys.argv[1], 'ab'); print(flush=True); "
                               "sys.stdin.read()", str(f)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline()  # open now
        assert Leases().whole(f) is None
    finally:
        holder.communicate(timeout=10)
    assert Leases().whole(f) is not None


def test_symlinks_fifos_and_vanished_files_are_not_whole(tmp_path: Path) -> None:
    import os

    (tmp_path / "target").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    os.mkfifo(tmp_path / "fifo")
    lz = Leases()
    assert lz.whole(tmp_path / "link") is None
    assert lz.whole(tmp_path / "link", follow_symlinks=True) is not None
    assert lz.whole(tmp_path / "fifo") is None
    assert lz.whole(tmp_path / "gone") is None


BREAK = r'''
import os, subprocess, sys, time
from syncd import leases
path = sys.argv[1]
real_fstat = os.fstat
calls = []

def slow_fstat(fd):
    calls.append(fd)
    if len(calls) == 2:  # the second one runs under the lease: a writer opens the file meanwhile
        w = subprocess.Popen([sys.executable, "-c", "import sys; open(sys.argv[1], 'ab').write(b'y')", path])
        time.sleep(0.5)
        calls.append(w)
    return real_fstat(fd)

leases.os.fstat = slow_fstat
st = leases.Leases().whole(path)
calls[-1].wait(10)
print("alive", st is not None, flush=True)
'''


def test_a_writer_opening_the_file_under_the_lease_does_not_end_syncd(tmp_path: Path) -> None:
    """A lease break signals the holder, SIGIO by default, which ends a process: not syncd."""
    f = tmp_path / "a.bin"
    f.write_bytes(b"x")
    res = subprocess.run([sys.executable, "-c", BREAK, str(f)], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).parent.parent)
    assert res.returncode == 0 and res.stdout.strip() == "alive True", (res.returncode, res.stdout, res.stderr)
    assert f.read_bytes() == b"xy"  # the writer went on once the lease was released


def test_without_leases_every_file_is_left_to_settle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"x")
    monkeypatch.setattr(leases.sys, "platform", "win32")
    lz = Leases()
    assert not lz.usable and "not on Linux" in lz.description
    assert lz.whole(f) is None
