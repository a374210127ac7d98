"""kill -9 at random moments while an app writes, rewrites, renames and deletes files.

A seeded writer thread works on the watch the whole time (also while the daemon is down); the
daemon is killed at random moments (some during its startup, most while it uploads) and started
again. After a final clean start and drain:

- every file the writer left is on disk untouched and in the bucket byte-identical (with its
  `syncd-sha256`);
- no deletion the ledger had recorded (a tombstone seen before a kill) is restored;
- a deletion that a kill cut off before the watcher recorded it may come back (SPEC §4.5: a
  file missing at start is restored), but only with content the writer once wrote;
- the bucket holds exactly what is on disk (on_delete = "mirror");
- `PRAGMA integrity_check` is ok and no row is left `uploading`, `pending` or `deleting`.

Seeds: SYNCD_SEED_CRASH (writer and kill moments). The interleaving with the daemon is not
reproducible, the writer's choices and the kill schedule are.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sqlite3
import threading
from collections import Counter, defaultdict
from pathlib import Path

from tests.conftest import wait_for
from tests.reliability.util import Rig, is_ready, local_tree, restore_temps, wait_ready

MIB = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Writer:
    """An app working on the watch: a model of what it left on disk and what it ever wrote."""

    def __init__(self, root: Path, seed: int, big: bool) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.big = big
        self.live: dict[str, bytes] = {}
        self.history: dict[str, set[str]] = defaultdict(set)  # path -> sha256 of every version
        self.deleted: set[str] = set()  # paths deleted (names are never reused)
        self.dirs = [f"d{i}" for i in range(6)] + ["d0/sub", "d1/sub/deeper"]
        self.ops: Counter = Counter()
        self.n = 0
        self.daemon_up = threading.Event()  # deletions only while a daemon watches (see module doc)
        self.stop = threading.Event()
        self.lock = threading.Lock()  # held during each operation (the test reads the model)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="crash-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def finish(self) -> None:
        self.stop.set()
        self._thread.join(30)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            while not self.stop.wait(self.rng.uniform(0, 0.08)):
                with self.lock:
                    self.step()
        except BaseException as e:  # noqa: BLE001 - reported by finish()
            self.error = e

    def _content(self) -> bytes:
        r = self.rng.random()
        if r < 0.04:
            return self.rng.randbytes(self.rng.randrange(MIB, 3 * MIB))
        if self.big and r < 0.05:
            return self.rng.randbytes(self.rng.randrange(6 * MIB, 8 * MIB))  # multipart
        return self.rng.randbytes(self.rng.choice([0, 1, self.rng.randrange(2, 40_000)]))

    def _write(self, rel: str, data: bytes, mode: str = "wb") -> None:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, mode) as f:
            f.write(data)
        self.live[rel] = self.live.get(rel, b"") + data if mode == "ab" else data
        self.history[rel].add(sha(self.live[rel]))

    def step(self) -> None:
        self.n += 1
        up = self.daemon_up.is_set()
        ops = ["create"] * 5 + ["rewrite"] * 2 + ["append", "replace"]
        if up and self.live:
            ops += ["delete", "rename"] * 2 + ["rename_dir", "delete_dir"] * (self.n % 25 == 0)
        op = self.rng.choice(ops) if self.live else "create"
        self.ops[op] += 1
        if op == "create":
            self._write(f"{self.rng.choice(self.dirs)}/f{self.n}.bin", self._content())
            return
        rel = self.rng.choice(sorted(self.live))
        if op == "rewrite":
            self._write(rel, self._content())
        elif op == "append":
            self._write(rel, self.rng.randbytes(self.rng.randrange(1, 20_000)), "ab")
        elif op == "replace":  # write a temp file (excluded: *.tmp), then rename over the file
            tmp = self.root / f"{rel}.{self.n}.tmp"
            data = self._content()
            tmp.write_bytes(data)
            os.replace(tmp, self.root / rel)
            self.live[rel] = data
            self.history[rel].add(sha(data))
        elif op == "delete":
            (self.root / rel).unlink()
            self._gone(rel)
        elif op == "rename":
            new = f"{self.rng.choice(self.dirs)}/r{self.n}-{rel.rsplit('/', 1)[1]}"
            (self.root / new).parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.root / rel, self.root / new)
            self._moved(rel, new)
        elif op in ("rename_dir", "delete_dir"):
            d = self.rng.choice([d for d in self.dirs if "/" not in d])
            if not (self.root / d).is_dir():
                return
            self._adopt(d)
            inside = [r for r in self.live if r.startswith(d + "/")]
            if op == "delete_dir":
                shutil.rmtree(self.root / d)
                for r in inside:
                    self._gone(r)
                return
            nd = f"{d.split('-')[0]}-r{self.n}"
            os.rename(self.root / d, self.root / nd)
            for r in inside:
                self._moved(r, nd + r[len(d):])
            self.dirs = [nd + x[len(d):] if x == d or x.startswith(d + "/") else x for x in self.dirs]

    def _adopt(self, d: str) -> None:
        """Files restored under `d` after a kill (deletions cut off) move with the directory:
        from now on they are the app's files again."""
        for p in (self.root / d).rglob("*"):
            rel = p.relative_to(self.root).as_posix()
            if p.is_file() and rel not in self.live and not p.name.endswith(".tmp") \
                    and not p.name.startswith(".syncd-restore-"):
                data = p.read_bytes()
                if sha(data) not in self.history[rel]:
                    raise AssertionError(f"{rel} is on disk with content the app never wrote")
                self.live[rel] = data
                self.deleted.discard(rel)

    def _gone(self, rel: str) -> None:
        del self.live[rel]
        self.deleted.add(rel)

    def _moved(self, old: str, new: str) -> None:
        self.live[new] = self.live.pop(old)
        self.history[new].add(sha(self.live[new]))
        self.deleted.add(old)


def tombstones(rig: Rig) -> set[str]:
    """Paths whose deletion the ledger has committed (state `deleted`)."""
    if not rig.ledger.exists():
        return set()
    try:
        return {r[0] for r in rig.ledger_query("SELECT path FROM files WHERE state IN ('deleted','deleting') "
                                               "AND op IS NOT 'put'")}
    except sqlite3.Error:
        return set()


def test_kill_9_loop_while_an_app_writes(tmp_path, moto_server, soak, seed, figures):
    s = seed("crash")
    rng = random.Random(s + 1)
    kills = 100 if soak else 12  # the explorer kills too, in every schedule that says so
    rig = Rig(tmp_path, moto_server, watch={"on_delete": "mirror"},
              syncd={"settle_seconds": 0.2, "health_listen": "", "max_deletes": 1_000_000},  # capped elsewhere
              remote={"multipart_threshold_mb": 5, "multipart_chunk_mb": 5})
    writer = Writer(rig.root, s, big=soak)
    recorded: set[str] = set()  # tombstones seen in the ledger before some kill
    writer.start()
    stop = threading.Event()
    try:
        for i in range(kills):
            d = rig.daemon()
            # a random moment: a third of the kills land during the startup (before ready)
            life = rng.uniform(0.3, 1.5) if i % 3 == 0 else rng.uniform(1.5, 4.0)
            deadline = life
            while deadline > 0 and not stop.wait(0.05):
                deadline -= 0.05
                if is_ready(d):
                    writer.daemon_up.set()
            with writer.lock:
                writer.daemon_up.clear()
                recorded |= tombstones(rig) & writer.deleted
            d.kill9()
            assert "Traceback" not in d.log(), d.log()
    finally:
        writer.finish()
    # the final clean start: it finishes everything left behind
    d = rig.daemon()
    try:
        wait_ready(d)
        wait_for(lambda: rig.settled() and rig.rels() == set(local_tree(rig.root)), timeout=180, interval=0.5,
                 what=f"the final drain (seed {s})")
    finally:
        code = d.stop(timeout=30)
    assert code == 0, d.log()

    disk = local_tree(rig.root)
    # the app's files: on disk untouched (syncd never overwrote one), in the bucket identical
    assert {rel: disk.get(rel) for rel in writer.live} == writer.live
    problems = rig.check(writer.live)
    # everything else on disk is a deletion cut off by a kill, restored with a version the app wrote
    extra = set(disk) - set(writer.live)
    assert extra <= writer.deleted, sorted(extra - writer.deleted)[:10]
    assert not extra & recorded, f"tombstoned files restored: {sorted(extra & recorded)[:10]}"
    assert all(sha(disk[rel]) in writer.history[rel] for rel in extra)
    problems += rig.check({rel: disk[rel] for rel in extra})
    assert rig.rels() == set(disk)
    assert not restore_temps(rig.root)
    con = sqlite3.connect(rig.ledger)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        states = dict(con.execute("SELECT state, count(*) FROM files GROUP BY state").fetchall())
        gone = {r[0] for r in con.execute("SELECT path FROM files WHERE state='deleted'")}
    finally:
        con.close()
    assert set(states) <= {"synced", "deleted"}, states
    assert recorded <= gone
    print(f"kills {kills}, writer ops {dict(writer.ops)}, files {len(writer.history)}, live {len(writer.live)}, "
          f"tombstones checked {len(recorded)}, resurrected {len(extra)}")
    figures.add("crash loop (kill -9)", kills=kills, files_written=len(writer.history),
                writes=sum(writer.ops.values()), files_verified=len(writer.live) + len(extra) - len(problems),
                files_lost=len(problems), resurrected=len(extra), tombstones_checked=len(recorded))
    assert not problems, problems[:20]
