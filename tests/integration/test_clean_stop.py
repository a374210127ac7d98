"""A clean stop records what the watcher was told before it (found by the fault explorer: a
rename into a new directory made just before SIGTERM was lost at the stop, and the old name came
back at the next start; SPEC §4.5: a deletion seen while running stays deleted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.reliability.util import Rig, stop_clean, wait_ready


@pytest.mark.parametrize("act", ["delete", "rename", "rename_into_a_new_directory"])
def test_a_file_deleted_just_before_sigterm_stays_deleted_after_the_next_start(
        tmp_path: Path, moto_server: str, act: str) -> None:
    rig = Rig(tmp_path, moto_server, watch={"on_delete": "mirror"})
    files = {f"f{i}.bin": f"content {i}".encode() for i in range(20)}
    for name, data in files.items():
        (rig.root / name).write_bytes(data)
    d = rig.daemon()
    wait_ready(d)
    wait_for(lambda: rig.rels() >= set(files) and rig.settled(), 60, 0.1, "every file synced")
    for name in files:  # the app acts, and the operator stops syncd at the same moment
        if act == "delete":
            (rig.root / name).unlink()
        elif act == "rename":
            (rig.root / name).rename(rig.root / f"moved-{name}")
        else:  # watchdog holds such a rename's IN_MOVED_FROM 0.5 s for a partner that never comes
            (rig.root / f"new-{name}").mkdir()
            (rig.root / name).rename(rig.root / f"new-{name}" / name)
    stop_clean(d)
    d = rig.daemon()
    try:
        wait_ready(d)
        wait_for(rig.settled, 60, 0.1, "ledger settled")
        back = sorted(n for n in files if (rig.root / n).exists())
        assert not back, f"deleted before the stop, back after the start: {back}"
        assert "InotifyEmitter" not in d.log()
    finally:
        stop_clean(d)
    assert not rig.rels() & set(files)


@pytest.mark.parametrize("store", ["file"], indirect=True)
def test_the_watcher_records_every_event_it_was_given_before_it_stops(store, make_env, syncd,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The deterministic form of the race: the recorder is behind (a slow ledger) when the stop
    comes; every deletion already reported is recorded, none is dropped with the queue."""
    import time as time_mod

    from syncd.config import load_config
    from syncd.ledger import Ledger
    from syncd.watcher import Watcher
    env = make_env(store, watch={"on_delete": "mirror"})
    env.root.mkdir(parents=True, exist_ok=True)
    names = [f"f{i}.bin" for i in range(30)]
    for n in names:
        (env.root / n).write_bytes(n.encode())
    assert syncd("--config", str(env.config), "resync").code == 0
    cfg = load_config(env.config)
    ledger = Ledger(cfg.ledger)
    watcher = Watcher(cfg, ledger, request_rescan=lambda _r: None)
    real = Watcher.apply

    def slow(self, batch):  # a busy disk under the ledger: one event at a time, slowly
        for one in batch:
            time_mod.sleep(0.02)
            real(self, [one])

    monkeypatch.setattr(Watcher, "apply", slow)
    try:
        watcher.start()
        (env.root / names[0]).unlink()
        wait_for(lambda: watcher.events_seen > 0, 10, 0.01, "the recorder at work on the first event")
        for n in names[1:]:  # reported while the recorder is busy: they wait in its queue
            (env.root / n).unlink()
        watcher.stop()
        states = {r["path"]: r["state"] for r in ledger.query("SELECT path, state FROM files")}
        kept = sorted(n for n in names if states.get(n) == "synced")
        assert not kept, f"deletions reported before the stop but not recorded: {kept}"
    finally:
        ledger.close()
