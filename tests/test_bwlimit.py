"""`bwlimit` (SPEC §2): the config value, the shared token bucket (on a fake clock: no test here
measures time), and every upload and restore going through it."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from syncd import bwlimit
from syncd.bwlimit import Limiter, MeteredBody, MeteredWriter, parse_rate, start_metering
from syncd.config import load_config
from tests.conftest import write_config

KIB, MIB = 1024, 1024 * 1024


# --- the value -------------------------------------------------------------------------------
@pytest.mark.parametrize("value, rate", [
    ("0", 0), ("off", 0), ("OFF", 0), (0, 0), (0.0, 0), ("0M", 0),
    ("8M", 8 * MIB), ("8m", 8 * MIB), ("512K", 512 * KIB), ("100B", 100), ("1.5K", 1536), (".5M", MIB // 2),
    ("1G", 1 << 30), ("2T", 2 << 40), ("1P", 1 << 50),
    ("10", 10 * KIB), (10, 10 * KIB), (2.5, 2560),  # a bare number is KiB/s, as in rclone
])
def test_a_bwlimit_in_rclones_syntax_is_bytes_per_second(value, rate):
    assert parse_rate(value) == rate


@pytest.mark.parametrize("value, says", [
    ("8MB", "suffix"), ("-1", "suffix"), ("fast", "suffix"), ("1Q", "suffix"), (-5, "suffix"),
    ("1M:512K", "UP:DOWN"), ("08:00,512K 12:00,10M 23:00,off", "timetable"), ("0.5B", "less than 1 byte/s"),
])
def test_a_bad_bwlimit_is_refused_saying_why(value, says):
    with pytest.raises(ValueError, match=says):
        parse_rate(value)


def _config(tmp: Path, bw: object) -> Path:
    return write_config(tmp / "syncd.toml", remote={"url": f"file://{tmp / 'remote'}"},
                        watches=[{"path": str(tmp / "up")}], syncd={"ledger": str(tmp / "l.db"), "bwlimit": bw})


def test_the_config_key_bwlimit_is_read_as_bytes_per_second(tmp_path):
    assert load_config(_config(tmp_path, "8M")).bwlimit == 8 * MIB
    assert load_config(_config(tmp_path, 0)).bwlimit == 0
    cfg = tmp_path / "none.toml"
    cfg.write_text(f'[remote]\nurl = "file://{tmp_path / "r"}"\n[[watch]]\npath = "{tmp_path / "up"}"\n')
    assert load_config(cfg).bwlimit == 0  # the default: no limit


@pytest.mark.parametrize("bw, says", [
    ("1M:512K", "syncd.bwlimit: only one rate"), ("8 MB", "syncd.bwlimit: only one rate"),
    ("lots", "syncd.bwlimit: must be a number"), (True, "syncd.bwlimit: must be a string or an integer"),
])
def test_a_bad_bwlimit_exits_2_naming_the_key_and_the_file(tmp_path, syncd, bw, says):
    cfg = _config(tmp_path, bw)
    r = syncd("--config", str(cfg), "status")
    assert r.code == 2, (r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and str(cfg) in lines[0], r.err


# --- the bucket, on a fake clock ---------------------------------------------------------------
class FakeClock:
    """Time that moves only when someone sleeps (`advance`), or never (a frozen clock)."""

    def __init__(self, advance: bool = True) -> None:
        self.now, self.advance, self.slept = 1000.0, advance, []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.slept.append(seconds)
            if self.advance:
                self.now += seconds


def test_the_rate_holds_over_30_seconds_of_reads():
    clock = FakeClock()
    lim = Limiter(8 * MIB, clock=clock, sleep=clock.sleep)
    start = clock.now
    while clock.now - start < 30:
        lim.take(16 * KIB)
    elapsed = clock.now - start
    # what went through: the bucket's depth at the start, then exactly the rate (within one read)
    assert abs(lim.taken - (lim.burst + 8 * MIB * elapsed)) <= 16 * KIB
    assert lim.taken / elapsed == pytest.approx(8 * MIB, rel=0.01)


def test_the_burst_after_an_idle_spell_is_a_quarter_second_of_the_rate():
    clock = FakeClock()
    lim = Limiter(4 * MIB, clock=clock, sleep=clock.sleep)
    assert lim.burst == MIB
    clock.now += 3600  # idle for an hour: the bucket does not fill beyond its depth
    lim.take(MIB)
    assert clock.slept == []
    lim.take(64 * KIB)
    assert clock.slept == [pytest.approx(64 * KIB / (4 * MIB))]


def test_a_large_take_is_paid_before_it_returns():
    clock = FakeClock()
    lim = Limiter(MIB, clock=clock, sleep=clock.sleep)
    lim.take(64 * MIB)  # a small file's whole buffer at once: the bucket goes into debt
    assert sum(clock.slept) == pytest.approx((64 * MIB - lim.burst) / MIB)


def test_threads_share_one_bucket():
    clock = FakeClock(advance=False)  # nobody's sleep pays: every reservation adds to one debt
    lim = Limiter(100_000, clock=clock, sleep=clock.sleep)

    def worker() -> None:
        for _ in range(100):
            lim.take(1000)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lim.taken == 800_000
    # the last reservation waits for everyone's bytes before it (no update lost between threads)
    assert max(clock.slept) == pytest.approx((800_000 - lim.burst) / 100_000)


def test_a_stop_ends_the_waits():
    lim = Limiter(1)  # one byte a second, on the real clock
    stop = threading.Event()
    stop.set()
    lim.interrupt_on(stop)
    lim.take(10 * MIB)  # would wait for months; returns at once
    assert lim.taken == 10 * MIB


def test_an_upload_body_costs_only_the_bytes_sent():
    """botocore hashes the body to sign it and rewinds it before sending: that pass is free; a
    rewind (a retry) starts the count again."""
    clock = FakeClock()
    lim = Limiter(MIB, clock=clock, sleep=clock.sleep)
    raw = _Seekable(os.urandom(300 * KIB))
    body = MeteredBody(raw, lim)
    while body.read(64 * KIB):  # the signer's pass
        pass
    body.seek(0)
    assert lim.taken == 0
    start_metering(type("Request", (), {"body": body})())
    while body.read(16 * KIB):  # sent
        pass
    assert lim.taken == 300 * KIB
    body.seek(0)  # a retry: signed again (free), sent again (counted)
    assert body.read(100) and lim.taken == 300 * KIB
    start_metering(type("Request", (), {"body": body})())
    body.read()
    assert lim.taken == 600 * KIB - 100


def test_a_restore_writer_takes_tokens_for_what_it_writes():
    clock = FakeClock()
    lim = Limiter(MIB, clock=clock, sleep=clock.sleep)
    out = _Seekable(b"")
    w = MeteredWriter(out, lim)  # type: ignore[arg-type]
    w.write(b"x" * 5000)
    assert lim.taken == 5000 and out.data == b"x" * 5000


class _Seekable:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n is None or n < 0 else self.pos + n
        out = self.data[self.pos:end]
        self.pos += len(out)
        return out

    def write(self, b: bytes) -> int:
        self.data += b
        return len(b)

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else len(self.data) + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos


# --- every upload and restore goes through it -------------------------------------------------
@pytest.fixture
def limiters(monkeypatch: pytest.MonkeyPatch) -> list[Limiter]:
    """Every Limiter made: the one a process shares."""
    made: list[Limiter] = []
    real = Limiter.__init__

    def init(self, *a, **kw):
        real(self, *a, **kw)
        made.append(self)

    monkeypatch.setattr(bwlimit.Limiter, "__init__", init)
    return made


# "moto_server": the default, `transfers = "auto"`, takes botocore under a limit (awscrt's bodies
# cannot be metered); "+botocore" asks for botocore by name
@pytest.mark.parametrize("store", ["file", "moto", "moto_server+botocore", "moto_server"], indirect=True)
def test_a_limited_resync_uploads_and_restores_every_byte_through_the_limiter(store, make_env, syncd, limiters):
    # a rate no test waits for: what is checked is that every byte was accounted for, not the time
    env = make_env(store, syncd={"bwlimit": "1G"}, remote={"multipart_threshold_mb": 5, "multipart_chunk_mb": 5})
    files = {"small.txt": os.urandom(4 * KIB),  # sent from memory
             "empty.bin": b"",
             "medium.bin": os.urandom(3 * MIB),  # streamed from the file in one PUT
             "big/large.bin": os.urandom(12 * MIB)}  # multipart: 3 parts
    for rel, data in files.items():
        (env.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (env.root / rel).write_bytes(data)
    total = sum(len(d) for d in files.values())

    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert len(limiters) == 1
    # exactly the bytes sent: over http:// botocore also reads each streamed body to sign it
    assert limiters[0].taken == total
    for rel, data in files.items():
        assert store.read(f"{env.prefix}/{rel}") == data, rel

    for rel in files:
        (env.root / rel).unlink()
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert "restored 4" in r.out
    assert len(limiters) == 2 and limiters[1].taken == total
    for rel, data in files.items():
        assert (env.root / rel).read_bytes() == data, rel


def test_no_limit_makes_no_limiter(tmp_path, make_env, syncd, limiters):
    from tests.conftest import Store

    env = make_env(Store(kind="file", url=f"file://{tmp_path / 'remote'}", root=tmp_path / "remote"))
    env.root.mkdir(parents=True)
    (env.root / "a.txt").write_bytes(b"a")
    assert syncd("--config", str(env.config), "resync").code == 0
    assert limiters == []
