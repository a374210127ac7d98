"""Small files are in flight together (syncd.lane): a worker's claimed batch is not sent one by one.

A gate remote (file:// underneath) holds every put or get until N of them are in progress at
once, or a shared deadline passes: with one worker, only concurrent transfers reach N.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from syncd import lane
from syncd.config import load_config
from syncd.engine import UPLOAD_OPS, Engine
from syncd.lane import PER_WORKER
from syncd.ledger import Ledger
from syncd.pool import WorkerPool
from syncd.remote.local import LocalRemote
from tests.conftest import Store, wait_for, write_config

FILES = 12


class Gate:
    """A remote whose put/get wait for `n` calls in progress (or `release`, or the deadline)."""

    def __init__(self, inner: Any, n: int, wait: float = 5.0) -> None:
        self.inner = inner
        self.n = n
        self.wait = wait
        self.cond = threading.Condition()
        self.now = 0
        self.most = 0
        self.release = threading.Event()
        self.deadline: float | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _gated(self, fn: Any, *a: Any, **kw: Any) -> Any:
        with self.cond:
            self.now += 1
            self.most = max(self.most, self.now)
            self.cond.notify_all()
            if self.deadline is None:
                self.deadline = time.monotonic() + self.wait
            while self.now < self.n and not self.release.is_set() and time.monotonic() < self.deadline:
                self.cond.wait(0.05)
            if self.now >= self.n:
                self.release.set()  # the gate opened: everyone goes
        try:
            return fn(*a, **kw)
        finally:
            with self.cond:
                self.now -= 1

    def put(self, *a: Any, **kw: Any) -> Any:
        return self._gated(self.inner.put, *a, **kw)

    def get(self, *a: Any, **kw: Any) -> Any:
        return self._gated(self.inner.get, *a, **kw)


def _env(tmp_path: Path) -> tuple[Path, Path, Path]:
    root, remote = tmp_path / "uploads", tmp_path / "remote"
    root.mkdir()
    remote.mkdir()
    for i in range(FILES):
        (root / f"f{i:02d}.txt").write_bytes(b"x" * (100 + i))
    cfg = write_config(tmp_path / "syncd.toml", remote={"url": f"file://{remote}"},
                       watches=[{"path": str(root), "prefix": "uploads"}],
                       syncd={"ledger": str(tmp_path / "ledger.db"), "settle_seconds": 0, "workers": 1,
                              "health_listen": ""})
    return cfg, root, remote


@pytest.mark.parametrize("native", [False, True], ids=["botocore", "crt"])
@pytest.mark.parametrize("direction", ["upload", "restore"])
def test_one_worker_has_its_whole_batch_of_small_files_in_flight_at_once(tmp_path, monkeypatch, syncd,
                                                                         direction, native):
    cfg, root, remote_dir = _env(tmp_path)
    gates: list[Gate] = []
    # a remote whose requests wait off the GIL (awscrt's) gets more of them in flight per worker
    width = min(lane.PER_WORKER_CRT if native else PER_WORKER, FILES)
    assert width > PER_WORKER or not native

    def gated(cfg_: Any) -> Any:
        gates.append(Gate(LocalRemote(cfg_.remote.root), width))
        gates[-1].native_transfers = native
        return gates[-1]

    if direction == "restore":
        assert syncd("--config", str(cfg), "resync").code == 0
        for p in root.iterdir():
            p.unlink()
    monkeypatch.setattr("syncd.remote.open_remote", gated)
    r = syncd("--config", str(cfg), "resync")
    assert r.code == 0, r.err
    # one worker, one batch of 12 small files: PER_WORKER of them in flight at once (crt: all 12)
    assert gates[-1].most == width, f"at most {gates[-1].most} transfers were in flight together"
    assert sorted(p.name for p in root.iterdir()) == [f"f{i:02d}.txt" for i in range(FILES)]
    assert Store(kind="file", url=f"file://{remote_dir}", root=remote_dir).object_keys() == \
        sorted(f"uploads/f{i:02d}.txt" for i in range(FILES))


def test_stop_during_a_batch_finishes_the_transfers_in_flight_and_gives_back_the_others(tmp_path):
    # one worker: it and its 3 lane threads take 4 files; the 8 others of the batch wait their turn
    assert lane.lane_size(1) == 3
    cfg_path, _root, remote_dir = _env(tmp_path)
    cfg = load_config(cfg_path)
    ledger = Ledger(cfg.ledger)
    gate = Gate(LocalRemote(remote_dir), n=10**6, wait=60)
    stop = threading.Event()
    try:
        engine = Engine(cfg, ledger, gate, stop=stop)
        engine.plan()
        pool = WorkerPool(ledger, engine.transfers.handle, 1, stop=stop)
        pool.start(UPLOAD_OPS)
        wait_for(lambda: gate.now == 4, 20, what="4 uploads in flight at once")
        stop.set()  # SIGTERM: what is in flight finishes, what has not started is given back
        gate.release.set()
        assert pool.join(10)
        rows = ledger.query("SELECT state, lease_until FROM files")
        states = sorted(r["state"] for r in rows)
        assert states == ["pending"] * (FILES - 4) + ["synced"] * 4
        assert all(r["lease_until"] is None for r in rows)
        assert len(list(remote_dir.rglob("*.txt"))) == 4
        assert pool.lane.threads() == 0  # the pool's end ended its lane
    finally:
        stop.set()
        gate.release.set()
        ledger.close()


def test_lane_raises_the_first_error_after_the_others_and_can_run_again_after_close():
    pool = lane.Lane(3, name="syncd-lane-test")
    gate = threading.Barrier(4, timeout=10)
    seen: list[int] = []

    def fn(i: int) -> None:
        if i < 4:
            gate.wait()  # the first four are in flight together
        if i == 5:
            raise ValueError("boom")
        seen.append(i)

    with pytest.raises(ValueError) as e:
        pool.run(list(range(20)), fn, width=4)
    assert set(seen) | {5} | set(e.value.lane_unstarted) == set(range(20))  # each item ran or is handed back
    assert e.value.lane_unstarted  # taking new items stopped at the error
    pool.close()
    assert pool.threads() == 0
    seen.clear()
    pool.run(list(range(8)), lambda i: seen.append(i), width=4)  # a closed lane makes new threads
    assert sorted(seen) == list(range(8))
    pool.close()
    assert pool.threads() == 0
