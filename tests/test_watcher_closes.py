"""The watcher's close facts (upload_on_close, SPEC §4.1) are facts about a closed file: a
close event read after a new writer started rewriting the file must not make its half-written
content look whole (shared-events:1055162706: a prefix was uploaded as the file)."""

from __future__ import annotations

import os
from pathlib import Path

from watchdog.events import FileModifiedEvent, FileMovedEvent

from syncd.config import load_config
from syncd.ledger import Ledger
from syncd.watcher import Watcher
from tests.conftest import write_config


def watcher(tmp_path: Path) -> tuple[Watcher, Path]:
    root = tmp_path / "uploads"
    root.mkdir()
    cfg = load_config(write_config(tmp_path / "syncd.toml", remote={"url": "file://" + str(tmp_path / "remote")},
                                   watches=[{"path": str(root), "prefix": "up"}],
                                   syncd={"ledger": str(tmp_path / "ledger.db")}))
    return Watcher(cfg, Ledger(cfg.ledger), request_rescan=lambda _r: None), root


def renamed_into_place(root: Path, name: str, data: bytes) -> FileMovedEvent:
    tmp = root / f".{name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, root / name)
    return FileMovedEvent(str(tmp), str(root / name))


def test_a_file_renamed_into_place_and_closed_is_due_at_once(tmp_path: Path) -> None:
    w, root = watcher(tmp_path)
    moved = renamed_into_place(root, "f.bin", b"whole")
    w.apply([("up", moved)])
    st = (root / "f.bin").stat()
    assert w.closes.closed("up", "f.bin", st.st_size, st.st_mtime_ns)


def test_a_rewrite_seen_after_the_rename_in_the_same_batch_is_not_closed(tmp_path: Path) -> None:
    w, root = watcher(tmp_path)
    moved = renamed_into_place(root, "f.bin", b"8 bytes!")
    with open(root / "f.bin", "wb") as f:  # the app rewrites it at once, slowly: a first part
        f.write(b"x" * 1000)
        f.flush()
        st = (root / "f.bin").stat()
        w.apply([("up", moved), ("up", FileModifiedEvent(str(root / "f.bin")))])
        assert not w.closes.closed("up", "f.bin", st.st_size, st.st_mtime_ns)


def test_a_rewrite_seen_in_the_batch_after_the_rename_drops_the_close_read_late(tmp_path: Path) -> None:
    w, root = watcher(tmp_path)
    moved = renamed_into_place(root, "f.bin", b"8 bytes!")
    with open(root / "f.bin", "wb") as f:  # the rewrite's first part is on disk before the rename is read
        f.write(b"x" * 1000)
        f.flush()
        st = (root / "f.bin").stat()
        w.apply([("up", moved)])  # its modify event comes in the next batch
        w.apply([("up", FileModifiedEvent(str(root / "f.bin")))])
        assert not w.closes.closed("up", "f.bin", st.st_size, st.st_mtime_ns)
