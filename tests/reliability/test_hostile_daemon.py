"""Hostile and odd input against a running daemon (`syncd run` against moto's server).

Each test fails if syncd loses a file, writes outside a root, leaves a partial file, or
crashes (the daemon must stay up and stop with exit 0).
"""

from __future__ import annotations

import os
import random
import unicodedata
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.daemon_util import write_file
from tests.reliability.util import (
    PREFIX,
    Rig,
    local_tree,
    restore_temps,
    start_until_ready,
    stop_clean,
    wait_ready,
)


def outside_snapshot(rig: Rig) -> set[str]:
    """Every path under the test's directory but outside the watch root and the state dir."""
    skip = (rig.root, rig.ledger.parent)
    return {p.relative_to(rig.tmp).as_posix() for p in rig.tmp.rglob("*")
            if not any(p == s or s in p.parents for s in skip) and not p.name.startswith("daemon")}


# --- keys that would escape the root, at the daemon's startup restore ---------------------------

ESCAPING = ["../escape.txt", "a/../../escape.txt", "a/b/../../../escape.txt", "/abs-escape.txt",
            "..\\escape.txt", "a\\..\\..\\escape.txt", "C:\\escape.txt", "C:/escape.txt", "c:escape.txt",
            "\\\\server\\share\\escape.txt", "./dot-escape.txt", "a/./b.txt", "a//b.txt", "x/..", "..",
            "nul\x00byte.txt", "trailing/..", "link/escape.txt", "file.txt/below.txt"]


def test_escaping_keys_at_daemon_start_are_refused_and_others_restored(tmp_path, moto_server, figures):
    rig = Rig(tmp_path, moto_server)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, rig.root / "link")  # a symlink in the root that leads out of it
    write_file(rig.root / "file.txt", b"a file where a key wants a directory")
    good = {"good.txt": b"good", "deep/er/good.bin": os.urandom(5000)}
    for rel, data in good.items():
        rig.client.put_object(Bucket=rig.bucket, Key=f"{PREFIX}/{rel}", Body=data)
    for k in ESCAPING:
        rig.client.put_object(Bucket=rig.bucket, Key=f"{PREFIX}/{k}", Body=b"evil")
    before = outside_snapshot(rig)
    d = rig.daemon()
    try:
        wait_ready(d)
        for rel, data in good.items():
            assert (rig.root / rel).read_bytes() == data
        assert rig.healthz()[0] == 200
        assert "refusing remote key" in d.log()
    finally:
        stop_clean(d)
    assert outside_snapshot(rig) == before
    assert not list(outside.iterdir())
    assert set(local_tree(rig.root)) == {*good, "file.txt"}
    # beside this test's own directory, among the other tests' (one of which is named for escaping)
    assert not [p for p in tmp_path.parent.iterdir() if "escape.txt" in p.name]
    assert not restore_temps(rig.root)
    # the failures are reported, never silently skipped
    failed = rig.ledger_query("SELECT path, last_error FROM files WHERE state='failed'")
    assert {p for p, _ in failed} >= {"link/escape.txt", "file.txt/below.txt"}, failed
    figures.add("hostile: escaping keys at daemon start", hostile_cases=len(ESCAPING),
                files_verified=len(good))


# --- odd names -------------------------------------------------------------------------------

LONG = "é" * 127 + "x"  # 255 bytes in UTF-8: the longest name ext4 allows
# a newline in a key gets a bare 404 from moto's server (its URL routing); it round-trips on
# file://, moto in-process and s3rver: see test_hostile_local.py
NAMES = {
    "tab\tand\rcr.txt": b"control characters",
    LONG: b"255 bytes",
    f"d/{LONG}/{LONG[:100]}.bin": b"long directory",
    unicodedata.normalize("NFC", "café.txt"): b"NFC",
    unicodedata.normalize("NFD", "café.txt"): b"NFD",
    " leading and trailing space ": b"spaces",
    "%2e%2e/percent.txt": b"percent-encoded dots are just characters",
    "emoji 😀/file?#&.txt": b"url characters",
}


def test_odd_names_round_trip_through_the_daemon(tmp_path, moto_server, figures):
    rig = Rig(tmp_path, moto_server)
    bad = os.fsencode(rig.root) + b"/latin1-\xe9.txt"
    too_long_key = "t/" + "/".join([LONG] * 4) + "/k.txt"  # > 1024 bytes as a key
    d = rig.daemon()
    try:
        wait_ready(d)
        for rel, data in NAMES.items():
            write_file(rig.root / rel, data)
        with open(bad, "wb") as f:
            f.write(b"not utf-8")
        write_file(rig.root / too_long_key, b"too long")
        wait_for(lambda: rig.matches(NAMES), timeout=60, what="odd names uploaded")
        wait_for(lambda: rig.states().get("failed", 0) == 2, timeout=30, what="two names failed")
        st = rig.status()["watches"][0]
        reasons = " ".join(f["error"] for f in st["failures"])
        assert "not valid UTF-8" in reasons and "longer than 1024 bytes" in reasons, st["failures"]
        assert rig.healthz()[0] == 200
    finally:
        stop_clean(d)
    # NFC and NFD are two files and two keys
    assert len({unicodedata.normalize("NFC", "café.txt"), unicodedata.normalize("NFD", "café.txt")}
               & rig.rels()) == 2
    for rel in NAMES:
        (rig.root / rel).unlink()
    start_until_ready(rig)
    assert {rel: (rig.root / rel).read_bytes() for rel in NAMES} == NAMES
    assert Path(os.fsdecode(bad)).read_bytes() == b"not utf-8"
    assert (rig.root / too_long_key).read_bytes() == b"too long"
    assert not restore_temps(rig.root)
    figures.add("hostile: odd names", hostile_cases=len(NAMES) + 2, files_verified=len(NAMES))


# --- the watch root disappears, is replaced, comes back ------------------------------------------

def test_watch_root_vanishing_or_replaced_never_deletes_remotely(tmp_path, moto_server, figures):
    rig = Rig(tmp_path, moto_server, watch={"on_delete": "mirror"}, syncd={"rescan_interval": 1})
    files = {f"r/f{i}.txt": f"file {i}".encode() for i in range(20)}
    for rel, data in files.items():
        write_file(rig.root / rel, data)
    aside = tmp_path / "uploads.unmounted"
    d = rig.daemon()
    try:
        wait_ready(d)
        wait_for(lambda: rig.matches(files), timeout=60, what="uploaded")
        os.rename(rig.root, aside)  # like an unmount: the directory is gone
        wait_for(lambda: rig.healthz()[0] == 503 and "gone" in rig.healthz()[1], timeout=30, what="503 gone")
        wait_for(lambda: d.log().count("skipping its rescan") >= 2, timeout=30, what="rescans skipped")
        rig.root.mkdir()  # an empty directory in its place (a mount point without its disk)
        wait_for(lambda: "replaced" in rig.healthz()[1], timeout=30, what="503 replaced")
        wait_for(lambda: d.log().count("was replaced or unmounted; skipping") >= 2, timeout=30,
                 what="rescans skipped while replaced")
        assert rig.rels() == set(files)
        rig.root.rmdir()
        os.rename(aside, rig.root)  # the disk is back
        wait_for(lambda: rig.healthz()[0] == 200, timeout=30, what="healthy again")
        # and the daemon works again: a new file is uploaded, a deletion is mirrored
        write_file(rig.root / "r/after.txt", b"after")
        (rig.root / "r/f0.txt").unlink()
        expected = {**files, "r/after.txt": b"after"}
        del expected["r/f0.txt"]
        wait_for(lambda: rig.rels() == set(expected), timeout=30, what="working again")
    finally:
        stop_clean(d)
    assert not rig.check(expected)
    figures.add("hostile: watch root vanished and replaced", hostile_cases=2, files_verified=len(expected))


# --- the max_deletes cap -------------------------------------------------------------------------

def test_mass_deletion_pauses_at_max_deletes_until_released(tmp_path, moto_server, syncd, figures):
    rig = Rig(tmp_path, moto_server, watch={"on_delete": "mirror"}, syncd={"max_deletes": 5})
    files = {f"m/f{i:02d}.txt": f"file {i}".encode() for i in range(30)}
    for rel, data in files.items():
        write_file(rig.root / rel, data)
    d = rig.daemon()
    try:
        wait_ready(d)
        wait_for(lambda: rig.matches(files) and rig.settled(), timeout=60, what="uploaded")
        doomed = sorted(files)[:20]
        for rel in doomed:
            (rig.root / rel).unlink()
        wait_for(lambda: "paused" in rig.healthz()[1], timeout=30, what="deletions paused")
        assert rig.healthz()[0] == 503
        # the cap holds: no more than max_deletes objects were deleted before the pause
        wait_for(lambda: rig.states().get("deleting", 0) + rig.states().get("deleted", 0) == 20, timeout=30,
                 what="all deletions recorded")
        assert len(set(files) - rig.rels()) <= 5, sorted(set(files) - rig.rels())
        assert rig.states().get("deleting", 0) >= 15
        # local work goes on meanwhile
        write_file(rig.root / "m/new.txt", b"new")
        wait_for(lambda: rig.read("m/new.txt") == b"new", timeout=30, what="uploads while paused")
        r = syncd("--config", str(rig.config), "retry", "--deletes")
        assert r.code == 0, r.err
        wait_for(lambda: rig.rels() == (set(files) - set(doomed)) | {"m/new.txt"}, timeout=60,
                 what="deletions released")
        wait_for(lambda: rig.healthz()[0] == 200, timeout=30, what="healthy")
    finally:
        stop_clean(d)
    figures.add("hostile: mass deletion over max_deletes", hostile_cases=1, files_verified=len(files) - 20 + 1)


# --- 100 MB of events in a burst ---------------------------------------------------------------------

def test_100_mb_burst_of_appends_and_rewrites(tmp_path, moto_server, soak, seed, figures):
    s = seed("burst")
    rng = random.Random(s)
    total = (500 if soak else 100) * 1024 * 1024
    rig = Rig(tmp_path, moto_server, syncd={"settle_seconds": 0.5})
    names = [f"burst/f{i:02d}.log" for i in range(20)]
    content = {rel: b"" for rel in names}
    d = rig.daemon()
    written = writes = 0
    try:
        wait_ready(d)
        (rig.root / "burst").mkdir()
        block = rng.randbytes(1024 * 1024)
        while written < total:
            rel = rng.choice(names)
            n = rng.choice([512, 4096, 65536])
            off = rng.randrange(0, len(block) - n)
            data = block[off:off + n]
            if rng.random() < 0.02 or len(content[rel]) > 2 * 1024 * 1024:
                content[rel] = data  # rewrite
                mode = "wb"
            else:
                content[rel] += data
                mode = "ab"
            with open(rig.root / rel, mode) as f:
                f.write(data)
            written += n
            writes += 1
        wait_for(lambda: rig.matches(content), timeout=180, interval=1, what=f"final contents (seed {s})")
        wait_for(rig.settled, timeout=60, what="settled")
        assert d.alive()
        assert rig.healthz()[0] == 200
    finally:
        stop_clean(d)
    print(f"{writes} writes, {written / 1e6:.0f} MB")
    figures.add("hostile: 100 MB burst of events", hostile_cases=1, files_written=len(names), writes=writes,
                files_verified=len(names))


# --- symlink loops ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("follow", [False, True])
def test_symlink_loops_with_the_daemon(tmp_path, moto_server, figures, follow):
    rig = Rig(tmp_path, moto_server, watch={"follow_symlinks": follow})
    write_file(rig.root / "a/real.txt", b"real")
    os.symlink("..", rig.root / "a/loop")  # a/loop -> the root
    os.symlink(rig.root / "c", rig.root / "b")  # b -> c -> b
    os.symlink(rig.root / "b", rig.root / "c")
    os.symlink("self", rig.root / "self")
    write_file(tmp_path / "outside/o.txt", b"outside")
    os.symlink(tmp_path / "outside", rig.root / "ext")  # a legitimate link out of the root
    d = rig.daemon()
    try:
        wait_ready(d)
        write_file(rig.root / "a/live.txt", b"live")  # its events come through a/loop/a/loop/...
        (rig.root / "n").mkdir()
        os.symlink("..", rig.root / "n/up")  # a new directory holding a loop
        write_file(rig.root / "n/new.txt", b"new")
        expected = {"a/real.txt", "a/live.txt", "n/new.txt"} | ({"ext/o.txt"} if follow else set())
        wait_for(lambda: rig.rels() >= expected, timeout=30, what="uploads")
        wait_for(rig.settled, timeout=30, what="settled")
        assert d.alive() and rig.healthz()[0] == 200
    finally:
        stop_clean(d)
    assert rig.rels() == expected
    assert not rig.ledger_query("SELECT path FROM files WHERE path LIKE '%loop%' OR path LIKE '%up/%'")
    assert rig.states().get("failed", 0) == 0
    figures.add(f"hostile: symlink loops (follow_symlinks={follow})", hostile_cases=1,
                files_verified=len(expected))
