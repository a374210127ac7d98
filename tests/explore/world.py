"""One run of a schedule: real `syncd run` daemons, a bucket on moto's server behind a fault
proxy, an app writing files, other tools writing the bucket; then the oracle.

The model the oracle judges by (per path of the shared watch prefix):
- `expect`: what the app (or another tool) wrote last, or None when its last act was a delete;
- `also`: other outcomes SPEC allows for it: a deletion made while syncd was down (or cut off
  by a kill before the watcher saw it) may come back with the content it had; a host whose
  disk and ledger are lost loses what it had not uploaded yet; a bucket wiped by another tool
  may be uploaded again or confirmed by a listing;
- `versions`: every content ever written there, so a file that matches none is corruption.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import boto3
from boto3.s3.transfer import TransferConfig

from syncd.guard import EVENT_GRACE
from tests.conftest import free_port, sns_fanout, wait_for, write_config
from tests.daemon_util import DaemonProc, http_get, live_tree
from tests.explore.schedule import Profile, Step
from tests.reliability.faultproxy import FaultProxy, Rates

PREFIX = "ex/up"  # remote prefix "ex", watch prefix "up"
GONE = None


class Violation(AssertionError):
    """The oracle's verdict: what broke, in one line per problem."""


def content(path: str, salt: int, size: int) -> bytes:
    seed = hashlib.sha256(f"{path}:{salt}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class PathModel:
    expect: bytes | None = None
    also: set[bytes | None] = field(default_factory=set)
    versions: set[bytes] = field(default_factory=set)
    owner: int | None = None  # shared mode: the host whose app writes this path
    deleted_at: float = 0.0  # when the app last deleted it (monotonic), to judge a kill after it
    deleted_on: int = -1
    clash: bool = False  # another tool made it both a file and a directory: one may fail, named
    needs_start: bool = False  # a restore refused once (integrity): a start gives it another chance
    # a host was lost (kill -9, then its ledger) before this content reached the bucket: a
    # multipart upload it had begun stays open (SPEC §4.10 aborts at a clean stop; the start-up
    # sweep aborts only keys its ledger knows; the rest is for the bucket's lifecycle rule)
    open_upload_allowed: bool = False
    wiped: bool = False  # another tool emptied the bucket while the app had this file
    wiped_held: dict[int, bytes | None] = field(default_factory=dict)  # what each host held then
    # an app write since the wipe cleared `wiped`: while none has reached the bucket, losing the
    # writer's disk brings the wipe's state back (the other hosts still hold what they held)
    wiped_before_write: bool = False
    last_deleted: set[bytes | None] = field(default_factory=set)  # what its last delete removed

    def allowed(self) -> set[bytes | None]:
        return {self.expect, *self.also}


@dataclass
class Host:
    i: int
    root: Path
    ledger: Path
    config: Path
    health: int
    proc: DaemonProc | None = None
    starts: int = 0
    started_at: float = 0.0  # wall clock: a listing ended after it was this process's


class World:
    def __init__(self, tmp: Path, moto: str, profile: Profile, seed: int, *, log: list[str],
                 quiet: float = 60.0) -> None:
        self.tmp, self.p, self.seed, self.trace = tmp, profile, seed, log
        self.quiet = quiet  # how long the oracle waits for the hosts to converge
        self.s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
        if profile.events:
            self.s3, _sqs, self.bucket, queues = sns_fanout(moto, hosts=profile.hosts, visibility=5)
        else:
            self.bucket = f"ex-{seed % 10**8}-{int(time.time() * 1000) % 10**6}"
            self.s3.create_bucket(Bucket=self.bucket)
            queues = []
        port = int(moto.rsplit(":", 1)[1])
        # a little background noise on every request, besides the faults the schedule aims
        self.proxy = FaultProxy(port, seed=seed, rates=Rates(reset=0.01, slowdown=0.01, internal=0.005),
                                stall_seconds=1.0, max_per_request=2)
        self.proxy.delay_seconds = 1.5
        self.proxy.start()
        self.model: dict[str, PathModel] = {}
        self.wiped = False  # another tool emptied the bucket
        self.listed_since_wipe = False  # and a host listed it since: a listing may confirm the wipe
        self.hosts: list[Host] = []
        for i in range(profile.hosts):
            base = tmp / f"host{i}"
            h = Host(i, base / "uploads", base / "state" / "ledger.db", base / "syncd.toml", free_port())
            remote = {"url": f"s3://{self.bucket}/ex", "endpoint_url": self.proxy.url,
                      "multipart_threshold_mb": 6, "multipart_chunk_mb": 5}
            if queues:
                remote["events_queue"] = queues[i]
            syncd = {"ledger": str(h.ledger), "settle_seconds": 0.3, "workers": 3, "rescan_interval": 0,
                     "health_listen": f"127.0.0.1:{h.health}", "max_backlog_age": 3600,
                     # events: only the queue may converge the hosts in the first check (a
                     # listing would hide a dropped event); without events, listings do it
                     "remote_rescan_interval": 3600 if profile.events or profile.mode == "backup" else 4,
                     # a replay can keep every decision in the hosts' logs
                     **({"log_level": os.environ["SYNCD_EXPLORE_LOG_LEVEL"]}
                        if os.environ.get("SYNCD_EXPLORE_LOG_LEVEL") else {})}
            h.root.mkdir(parents=True)
            write_config(h.config, remote=remote, syncd=syncd,
                         watches=[{"path": str(h.root), "prefix": "up", "mode": profile.mode,
                                   "on_delete": profile.on_delete}])
            self.hosts.append(h)
        self.counts: dict[str, int] = {"steps": 0, "kills": 0, "faults_armed": 0, "writes": 0, "deletes": 0,
                                       "faults_fired": 0, "files_checked": 0, "deletions_checked": 0}

    # --- lifecycle ----------------------------------------------------------------------------
    def note(self, msg: str) -> None:
        self.trace.append(f"{time.monotonic():.2f} {msg}")

    def start(self, h: Host, wait: bool = True) -> None:
        if h.proc is not None and h.proc.alive():
            return
        self.listed_since_wipe = self.wiped  # a start lists the remote (SPEC §3)
        h.starts += 1
        h.started_at = time.time()
        h.proc = DaemonProc(h.config, h.ledger, h.root.parent / f"daemon{h.starts}.log").start()
        if wait:
            self.wait_ready(h)

    def wait_ready(self, h: Host, timeout: float = 90) -> None:
        assert h.proc is not None
        wait_for(lambda: "ready:" in h.proc.log() or not h.proc.alive(), timeout, 0.05, f"host{h.i} ready")
        if not h.proc.alive():
            raise Violation(f"host{h.i} exited during its start ({h.proc.proc.returncode}):\n"
                            + h.proc.log()[-3000:])

    def stop(self, h: Host) -> None:
        """A clean stop: exit 0 within SPEC's 10 s (plus a start-up's slack), no traceback."""
        if h.proc is None or not h.proc.alive():
            return
        self.deletions_not_here_yet(h)
        try:
            code = h.proc.stop(timeout=18)
        except subprocess.TimeoutExpired:
            h.proc.kill9()
            raise Violation(f"host{h.i} did not stop within 18 s of SIGTERM (SPEC §4.10: 10 s)") from None
        if code != 0:
            raise Violation(f"host{h.i} stopped with exit {code}:\n{h.proc.log()[-3000:]}")
        if "Traceback" in h.proc.log():
            raise Violation(f"host{h.i} logged a traceback:\n{h.proc.log()[-3000:]}")

    def kill(self, h: Host) -> None:
        if h.proc is not None and h.proc.alive():
            self.deletions_not_here_yet(h)
            h.proc.kill9()
            self.counts["kills"] += 1
            # a deletion the watcher may not have recorded before the kill may come back (§4.5),
            # with content the app wrote (the bucket may hold an older version than the last)
            for pm in self.model.values():
                if pm.deleted_on == h.i and time.monotonic() - pm.deleted_at < 1.5:
                    pm.also |= pm.last_deleted | pm.versions

    def deletions_not_here_yet(self, h: Host) -> None:
        """`h` stops (or dies) before another host's recent app deletion reached its ledger (the
        event on its way): after a wipe its next listing may find the bucket empty, which deletes
        nothing locally and has the files uploaded again (SPEC §4.12), as a deletion made while
        syncd was down (§4.5). Its copy may come back everywhere."""
        if self.p.mode != "shared" or not self.wiped:
            return
        recent = [p for p, pm in self.model.items()
                  if pm.expect is None and pm.deleted_on not in (-1, h.i) and self.recently_deleted(pm)]
        if not recent:
            return
        tree = live_tree(h.root)
        for path in recent:
            if path in tree and not self.unlink_queued(h, path):
                self.model[path].also.add(tree[path])

    def close(self) -> None:
        for h in self.hosts:
            if h.proc is not None and h.proc.alive():
                h.proc.kill9()
        self.proxy.stop()

    # --- the app -----------------------------------------------------------------------------
    def pm(self, path: str) -> PathModel:
        return self.model.setdefault(path, PathModel())

    def up(self, h: Host) -> bool:
        return h.proc is not None and h.proc.alive()

    def app_write(self, h: Host, path: str, how: str, size: int, salt: int) -> None:
        f = h.root / path
        pm = self.pm(path)
        old = f.read_bytes() if f.is_file() else b""
        new = content(path, salt, size)
        if f.exists() and not f.is_file():
            return  # a directory there (another tool's clash): the app would fail too
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            return
        if how == "append":
            data = old + new[:max(1, size // 4)]
            with open(f, "ab") as fh:
                fh.write(data[len(old):])
        elif how == "temp_rename":
            data = new
            tmp = f.parent / f".{f.name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, f)
        elif how == "slow":
            data = new
            with open(f, "wb") as fh:
                for i in range(0, len(data), max(1, len(data) // 3)):
                    fh.write(data[i:i + max(1, len(data) // 3)])
                    fh.flush()
                    time.sleep(0.15)
        else:  # create, overwrite, new_dir (the directory made just before), large
            data = new
            f.write_bytes(data)
        pm.wiped_before_write = pm.wiped or pm.wiped_before_write
        pm.expect, pm.also, pm.wiped = data, set(), False
        pm.versions.add(data)
        self.counts["writes"] += 1

    def app_delete(self, h: Host, path: str) -> None:
        f = h.root / path
        if not f.is_file():
            return
        pm = self.pm(path)
        before = f.read_bytes()
        f.unlink()
        pm.last_deleted = {before} | self.copies_elsewhere(h, path)
        if not self.up(h):
            pm.also = {before}  # deleted while syncd was down: it may come back (SPEC §4.5)
        else:
            pm.also = set()
        pm.expect = GONE
        pm.deleted_at, pm.deleted_on = time.monotonic(), h.i
        self.counts["deletes"] += 1

    def app_rename(self, h: Host, path: str, to: str) -> None:
        src, dst = h.root / path, h.root / to
        if not src.is_file() or dst.exists():
            return
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            return
        data = src.read_bytes()
        os.rename(src, dst)
        self._moved(h, path, to, data)

    def _moved(self, h: Host, path: str, to: str, data: bytes) -> None:
        old, new = self.pm(path), self.pm(to)
        new.wiped_before_write = new.wiped or new.wiped_before_write
        new.expect, new.also, new.owner, new.wiped = data, set(), old.owner, False
        new.versions.add(data)
        old.last_deleted = {data} | self.copies_elsewhere(h, path)
        old.also = {data} if not self.up(h) else set()
        old.expect = GONE
        old.deleted_at, old.deleted_on = time.monotonic(), h.i

    def copies_elsewhere(self, h: Host, path: str) -> set[bytes | None]:
        """What the other hosts of a shared watch hold of a path the app deletes on `h`: the
        deletion's event removes those copies there, and until it does (or while it waits, paused,
        SPEC §4.12) they stay. One may be an earlier version than the app deleted: a change
        deleted before it was uploaded (within `settle_seconds`) never reached the other hosts."""
        if self.p.mode != "shared":
            return set()
        out: set[bytes | None] = set()
        for o in self.hosts:
            try:
                if o is not h and (o.root / path).is_file():
                    out.add((o.root / path).read_bytes())
            except FileNotFoundError:
                continue  # a deletion applied between the look and the read
        return out

    def app_rename_dir(self, h: Host, d: str, to: str) -> None:
        src, dst = h.root / d, h.root / to
        if not src.is_dir() or dst.exists():
            return
        # the app's files, not a restore's temp file syncd has in there right now
        files = {p.relative_to(h.root).as_posix(): p.read_bytes() for p in src.rglob("*")
                 if p.is_file() and not p.name.startswith(".syncd-")}
        os.rename(src, dst)
        for rel, data in files.items():
            self._moved(h, rel, to + rel[len(d):], data)

    # --- other tools and the operator ------------------------------------------------------------
    def other_put(self, path: str, size: int, salt: int, checksum: str, multipart: bool) -> None:
        pm = self.pm(path)
        data = content(path, salt, size)
        key = f"{PREFIX}/{path}"
        if multipart:
            import io
            extra = {"ChecksumAlgorithm": checksum} if checksum else {}
            cfg = TransferConfig(multipart_threshold=256 * 1024, multipart_chunksize=256 * 1024)
            self.s3.upload_fileobj(io.BytesIO(data), self.bucket, key, ExtraArgs=extra, Config=cfg)
        else:
            extra = {"ChecksumAlgorithm": checksum} if checksum else {}
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data, **extra)
        pm.expect, pm.also, pm.wiped, pm.wiped_before_write = data, set(), False, False
        pm.versions.add(data)

    def wipe_bucket(self) -> None:
        """Another tool empties the bucket (`aws s3 rm --recursive`): no app deletes anything."""
        keys = [o["Key"] for o in self.objects_raw()]
        held = [live_tree(h.root) for h in self.hosts]  # what each host had when the wipe came
        for i in range(0, len(keys), 1000):
            self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})
        self.wiped, self.listed_since_wipe = True, False
        for path, pm in self.model.items():
            # SPEC §4.12: events must not empty the hosts; a later listing may upload the files
            # again, or (shared) confirm the deletions. A deletion whose event came in the
            # wipe's burst waits with it (paused) until a listing
            pm.wiped, pm.wiped_before_write = True, False
            pm.wiped_held = {h.i: tree.get(path) for h, tree in zip(self.hosts, held, strict=True)}
            if pm.expect is None and self.deletion_on_its_way(path, pm):
                # the app's deletion had not reached another host yet (its event on the way, or
                # waiting its EVENT_GRACE there): it pauses with the wipe's burst, and a listing
                # that then finds the bucket empty deletes nothing locally and uploads the file
                # again (SPEC §4.12: an empty listing deletes nothing locally; paused deletion
                # events wait for a listing to confirm them). The app's deletion is undone by
                # the wipe, with the copy that host held
                pm.also |= {d for i, d in pm.wiped_held.items() if i != pm.deleted_on} - {GONE}

    def deletion_on_its_way(self, path: str, pm: PathModel) -> bool:
        """A shared watch's app deletion that may not be applied on every host yet: another host
        still holds a copy and its ledger has the local deletion queued (the event came, it waits
        EVENT_GRACE) or the deletion is recent enough for its event to be on the way."""
        if self.p.mode != "shared" or pm.deleted_on < 0 or not pm.wiped_held:
            return False
        if self.recently_deleted(pm):
            return True
        return any(d is not None and self.unlink_queued(self.hosts[i], path)
                   for i, d in pm.wiped_held.items() if i != pm.deleted_on)

    @staticmethod
    def recently_deleted(pm: PathModel) -> bool:
        """Deleted by the app recently enough for its event to be on its way to the other hosts."""
        return time.monotonic() - pm.deleted_at < EVENT_GRACE + 10

    def unlink_queued(self, h: Host, path: str) -> bool:
        """The host's ledger has the local deletion of `path` queued (its event came)."""
        return bool(self.ledger_rows(h, f"SELECT 1 FROM files WHERE path={path!r} AND state='deleting' "
                                        "AND op='unlink'"))

    def lose_host(self, h: Host) -> None:
        """The host's disk and ledger are lost (a container replaced): kill, wipe, start."""
        self.kill(h)
        time.sleep(0.3)  # a request the proxy already forwarded lands before we look
        remote, tombs = self.remote_files(), self.tombstones()
        for path, pm in self.model.items():
            here = (h.root / path)
            if self.p.mode == "shared" and pm.owner not in (None, h.i):
                continue
            if not here.is_file() and pm.expect is not None:
                continue
            # what this host had not made durable in the bucket is lost with it, as SPEC allows
            if pm.expect is not None and remote.get(path) != pm.expect:
                # what the bucket has, or nothing when a tombstone hides that (a file recreated
                # after a delete and lost before its upload)
                pm.also |= {remote.get(path), GONE}
                pm.open_upload_allowed = True
                if pm.wiped_before_write and remote.get(path) is None:
                    # every write since the wipe is lost with this disk: the path is wiped
                    # again, and the others keep what they held when the wipe came (their
                    # deletion waits for a listing, SPEC §4.12), the newest copy left: a
                    # listing may confirm the deletion or upload that copy again
                    pm.wiped = True
                    pm.also |= {v for i, v in pm.wiped_held.items() if i != h.i}
            if pm.expect is None and not (self.p.on_delete == "keep" and path in tombs):
                pm.also |= {remote.get(path)}  # its deletion had not reached the bucket yet
        shutil.rmtree(h.root)
        shutil.rmtree(h.ledger.parent)
        h.root.mkdir(parents=True)
        self.start(h)

    # --- looking at things ------------------------------------------------------------------------
    def objects_raw(self) -> list[dict[str, Any]]:
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            out += page.get("Contents", [])
        return out

    def remote_files(self) -> dict[str, bytes]:
        """Path -> bytes of the objects under the watch prefix that are files of the app (not
        syncd's own: tombstones, trash, check probes)."""
        out = {}
        for o in self.objects_raw():
            k = o["Key"]
            if not k.startswith(PREFIX + "/"):
                continue
            rel = k[len(PREFIX) + 1:]
            if rel.startswith((".syncd/", ".trash/", ".syncd-check/")):
                continue
            try:
                out[rel] = self.s3.get_object(Bucket=self.bucket, Key=k)["Body"].read()
            except self.s3.exceptions.NoSuchKey:
                continue
        return out

    def tombstones(self) -> set[str]:
        base = PREFIX + "/.syncd/tombstones/"
        return {o["Key"][len(base):] for o in self.objects_raw() if o["Key"].startswith(base)}

    def ledger_rows(self, h: Host, sql: str) -> list[tuple]:
        if not h.ledger.exists():
            return []
        con = sqlite3.connect(f"file:{h.ledger}?mode=ro", uri=True, timeout=30)
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()

    def settled(self, h: Host) -> bool:
        try:
            return not self.ledger_rows(h, "SELECT 1 FROM files WHERE state IN ('pending','uploading','deleting')"
                                           " AND (op IS NOT NULL) AND due_at < strftime('%s','now') + 60 LIMIT 1")
        except sqlite3.OperationalError:
            return False

    def listed(self, h: Host) -> bool:
        """This host's current process has listed the remote (after READY, SPEC §3)."""
        try:
            rows = self.ledger_rows(h, "SELECT listed_at FROM watches")
        except sqlite3.OperationalError:
            return False
        return bool(rows) and all((r[0] or 0) >= h.started_at for r in rows)

    def synced(self, h: Host) -> bool:
        """Settled, and every file on the host's disk is synced (not only seen)."""
        if not self.settled(h):
            return False
        done = {r[0] for r in self.ledger_rows(h, "SELECT path FROM files WHERE state IN ('synced','failed')")}
        return set(live_tree(h.root)) <= done

    def unsettled(self, h: Host) -> list[tuple]:
        return self.ledger_rows(h, "SELECT path, state, op, attempts, last_error FROM files WHERE state IN "
                                   "('pending','uploading','deleting') LIMIT 5")

    def failed_paths(self, h: Host) -> set[str]:
        return {r[0] for r in self.ledger_rows(h, "SELECT path FROM files WHERE state='failed'")}

    # --- steps ----------------------------------------------------------------------------------
    def needle(self, path: str) -> bytes:
        tail = b""
        if "?" in path:
            path, q = path.split("?", 1)
            tail = b"?" + q.encode()
        return b"/" + quote(f"{PREFIX}/{path}").encode() + (tail or b" ")

    def step(self, s: Step) -> None:
        self.counts["steps"] += 1
        op = s["op"]
        h = self.hosts[s["host"] % len(self.hosts)] if "host" in s else None
        if self.p.mode == "shared" and "path" in s and op in ("write", "delete", "rename"):
            owner = self.pm(s["path"]).owner
            if owner is None:
                self.pm(s["path"]).owner = owner = s["host"] % len(self.hosts)
            h = self.hosts[owner]  # one app replica writes a path (unique upload names)
        self.note(json.dumps(s))
        if op == "write":
            assert h is not None
            self.app_write(h, s["path"], s["how"], s["size"], s["salt"])
        elif op == "delete":
            assert h is not None
            self.app_delete(h, s["path"])
        elif op == "rename":
            assert h is not None
            self.app_rename(h, s["path"], s["to"])
        elif op == "rename_dir":
            assert h is not None
            if self.p.mode == "shared":
                return  # paths keep one owner in shared mode; a directory may hold several
            self.app_rename_dir(h, s["dir"], s["to"])
        elif op == "pause":
            time.sleep(s["seconds"])
        elif op == "kill":
            assert h is not None
            self.kill(h)
        elif op == "start":
            assert h is not None
            self.start(h)
        elif op == "stop":
            assert h is not None
            self.stop(h)
        elif op == "listing":  # a start lists the remote right after READY (SPEC §3)
            assert h is not None
            self.stop(h)
            self.start(h)
            try:
                wait_for(lambda: self.listed(h), 30, 0.05)
            except AssertionError:
                self.note(f"  (host{h.i} did not list the remote within 30 s)")
        elif op == "lose_host":
            assert h is not None
            self.lose_host(h)
        elif op == "arm":
            self.proxy.arm(s["kind"], s["method"], self.needle(s["path"]), s["count"])
            self.counts["faults_armed"] += 1
            if s["kind"] == "flip":
                self.pm(s["path"]).needs_start = True
        elif op == "await_fault":
            n = self.needle(s["path"])
            try:
                wait_for(lambda: not any(r.needle == n for r in self.proxy.armed), 8, 0.02)
            except AssertionError:
                self.note("  (the armed fault did not fire)")
        elif op == "await_request":
            n = self.needle(s["path"])
            try:
                wait_for(lambda: not any(r.needle == n and r.left > 1 for r in self.proxy.armed), 15, 0.02)
                time.sleep(0.5)  # the part is at the store; its answer is held
            except AssertionError:
                self.note("  (the request did not come)")
        elif op == "await_synced":
            assert h is not None
            if self.up(h):
                try:
                    wait_for(lambda: self.synced(h), 20, 0.05)
                except AssertionError:
                    self.note(f"  (host{h.i} did not settle)")
        elif op == "other_put":
            self.other_put(s["path"], s["size"], s["salt"], s["checksum"], s.get("multipart", False))
            path = s["path"]
            related = [k for k in self.model if k.startswith(path + "/") or path.startswith(k + "/")]
            for k in ([path, *related] if related else []):
                self.model[k].clash = True  # a file and a directory of one name (SPEC §4.14)
        elif op == "wipe_bucket":
            self.wipe_bucket()
        else:
            raise ValueError(f"unknown step {op}")

    def run(self, steps: list[Step]) -> None:
        for h in self.hosts:
            self.start(h, wait=False)
        for h in self.hosts:
            self.wait_ready(h)
        for s in steps:
            self.step(s)
        self.judge()

    # --- the oracle ------------------------------------------------------------------------------
    def judge(self) -> None:
        for h in self.hosts:
            self.start(h, wait=False)
        for h in self.hosts:
            self.wait_ready(h)
        self.proxy.disarm()
        self.proxy.enabled = False
        if self.p.events:
            self.judge_events()
        # a clean restart of every host: each lists the remote right after READY
        for h in self.hosts:
            self.stop(h)
            self.start(h)
        problems: list[str] = []
        try:
            wait_for(lambda: all(self.listed(h) and self.synced(h) for h in self.hosts)
                     and not self.trees_problems(final=True),
                     self.quiet, 0.2, "hosts converged")
        except AssertionError:
            problems += self.trees_problems(final=True)
            problems += [f"host{h.i}: work left after {self.quiet:.0f} s of quiet: {self.unsettled(h)}"
                         for h in self.hosts if not self.synced(h)]
            problems += [f"host{h.i}: no listing of the remote after its start" for h in self.hosts
                         if not self.listed(h)]
        for h in self.hosts:
            self.stop(h)
        problems += self.bucket_problems()
        for h in self.hosts:
            problems += self.ledger_problems(h)
        if not problems:
            problems += self.fresh_resync_problems()
        self.counts["faults_fired"] = sum(self.proxy.log.injected.values())
        if problems:
            raise Violation("\n".join(problems))
        self.counts["files_checked"] = sum(pm.expect is not None for pm in self.model.values())
        self.counts["deletions_checked"] = sum(pm.expect is None for pm in self.model.values())

    def judge_events(self) -> None:
        """With events, the hosts converge without a listing (SPEC §4.12: within seconds)."""
        # quiet: the last deletion's events have arrived and their EVENT_GRACE has passed, and no
        # host has work due (a watch with paused deletions still applies those of files synced
        # since the pause): what the restart's listing then finds is what the events left
        last = max((pm.deleted_at for pm in self.model.values()), default=0.0)
        try:
            wait_for(lambda: time.monotonic() - last > EVENT_GRACE + 2 and not self.trees_problems(final=False)
                     and not any(self.ledger_rows(h, "SELECT 1 FROM files WHERE state IN ('pending','uploading',"
                                                     "'deleting') AND due_at<1e18 LIMIT 1") for h in self.hosts),
                     self.quiet * 0.75, 0.2, "hosts converged through events")
        except AssertionError:
            problems = self.trees_problems(final=False)  # work still due (a retry's backoff) is no problem
            if problems:
                raise Violation(f"without a listing (events only), after {self.quiet * 0.75:.0f} s of quiet:\n"
                                + "\n".join(problems)) from None

    def trees_problems(self, *, final: bool) -> list[str]:
        out = []
        trees = [live_tree(h.root) for h in self.hosts]
        # a host whose guard paused remote deletions says so (/healthz 503): they wait for a
        # listing (SPEC §4.12: deletion events that would remove most of a watch)
        paused = {h.i for h in self.hosts if not final and self.deletions_paused(h)}
        for h, tree in zip(self.hosts, trees, strict=True):
            failed = self.failed_paths(h) if final else set()
            for path, data in tree.items():
                pm = self.model.get(path)
                if pm is None or (data not in pm.versions):
                    out.append(f"host{h.i}: {path}: content no one wrote (corrupt or phantom), {len(data)} bytes")
            for path, pm in self.model.items():
                have = tree.get(path)
                allowed = pm.allowed()
                if pm.wiped and pm.expect is not None:
                    # the bucket was wiped: the events must not take it from a host that had it
                    # (checked now); a listing may then confirm the deletion or upload it again.
                    # A host that had no copy then (lost with its disk after an earlier wipe no
                    # listing settled, a restore not done yet) cannot get one from this bucket:
                    # no event brings it back, only a listing (another host uploads it again)
                    held = pm.wiped_held.get(h.i)
                    allowed = allowed | ({GONE} if final or self.listed_since_wipe or held is None else set())
                    if not final and h.i != pm.owner and held != pm.expect:
                        # a host still catching up when the wipe came (a newer version's event
                        # waiting for its path, a restore in flight) cannot get the last version
                        # any more: SPEC §4.12 converges hosts through the remote's object, and
                        # another tool deleted it. It keeps an earlier version until a listing
                        allowed = allowed | pm.versions
                elif not final and pm.expect is None and (h.i in paused or (
                        self.wiped and (pm.wiped or not self.listed_since_wipe))):
                    # its removal event paused with the wipe's, or after it: a watch with paused
                    # deletions pauses the next ones too, until a listing (SPEC §4.12)
                    allowed = allowed | pm.last_deleted
                if pm.clash or (pm.needs_start and not final):
                    allowed = allowed | {GONE}
                if have in allowed:
                    continue
                if have is None and path in failed and not pm.clash:
                    out.append(f"host{h.i}: {path}: missing, failed: {self.last_error(h, path)}")
                elif have is None:
                    out.append(f"host{h.i}: {path}: missing (lost{' by events' if not final else ''})")
                elif pm.expect is None:
                    out.append(f"host{h.i}: {path}: deleted by the app, but back")
                else:
                    out.append(f"host{h.i}: {path}: stale content ({len(have)} bytes, expected {len(pm.expect)})")
        if len(trees) > 1:
            # a file/directory pair may end either way on each host (the first restored stays,
            # the other fails by name: README); every other path is the same everywhere, once
            # every host has listed
            clash = {p for p, pm in self.model.items()
                     if pm.clash or (not final and (self.unsettled_before_listing(pm)
                                                    or (paused and pm.expect is None)))}
            first = {p: d for p, d in trees[0].items() if p not in clash}
            for h, tree in zip(self.hosts[1:], trees[1:], strict=True):
                mine = {p: d for p, d in tree.items() if p not in clash}
                if mine != first:
                    diff = sorted(set(mine.items()) ^ set(first.items()))
                    out.append(f"host0 and host{h.i} differ: {[p for p, _ in diff][:8]}")
        return out

    def deletions_paused(self, h: Host) -> bool:
        code, body = http_get(f"http://127.0.0.1:{h.health}/healthz")
        return code == 503 and "paused" in body

    def unsettled_before_listing(self, pm: PathModel) -> bool:
        """A path that may differ between hosts until every host has listed: a restore refused
        once (a flipped byte), a wiped file (a host that had not caught up keeps an earlier
        version; one host's listing may confirm the wipe), a deletion paused with a wipe's (or
        after it: the guard pauses a watch's next deletions too)."""
        if pm.needs_start or pm.wiped:
            return True
        return pm.expect is None and self.wiped and (pm.wiped or not self.listed_since_wipe)

    def last_error(self, h: Host, path: str) -> str:
        rows = self.ledger_rows(h, f"SELECT last_error FROM files WHERE path={path!r}")
        return rows[0][0] if rows else "?"

    def bucket_problems(self) -> list[str]:
        out = []
        remote = self.remote_files()
        tree = live_tree(self.hosts[0].root)
        tombs = self.tombstones()
        for path, data in remote.items():
            if path in tree:
                if tree[path] != data:
                    out.append(f"bucket: {path}: differs from the hosts")
            elif self.p.on_delete == "keep" and path in tombs:
                continue  # kept, hidden by its tombstone
            elif self.model.get(path) is not None and self.model[path].clash:
                continue  # judged below: reported failed on the hosts
            else:
                out.append(f"bucket: {path}: an object no host has (deleted by the app but kept"
                           f"{' without a tombstone' if self.p.on_delete == 'keep' else ''})")
        for path in tree:
            if path not in remote:
                out.append(f"bucket: {path}: on the hosts, not in the bucket")
        uploads = [u for u in self.s3.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
                   if not getattr(self.model.get(u["Key"].removeprefix(PREFIX + "/")), "open_upload_allowed", False)]
        if uploads:
            out.append(f"bucket: {len(uploads)} multipart uploads left open: {[u['Key'] for u in uploads][:5]}")
        for h in self.hosts:
            temps = [p for p in h.root.rglob(".syncd-*")]
            if temps:
                out.append(f"host{h.i}: temp files left: {temps[:3]}")
            tree_h = live_tree(h.root)
            failed = self.failed_paths(h)
            for path in remote:
                if path not in tree_h and path not in failed and not (self.p.on_delete == "keep" and path in tombs):
                    pm = self.model.get(path)
                    if pm is not None and pm.clash:
                        out.append(f"host{h.i}: {path}: an object that is neither restored nor reported failed")
        return out

    def ledger_problems(self, h: Host) -> list[str]:
        out = []
        ok = self.ledger_rows(h, "PRAGMA integrity_check")
        if ok != [("ok",)]:
            out.append(f"host{h.i}: ledger integrity: {ok}")
        rows = self.ledger_rows(h, "SELECT path FROM files WHERE state='uploading'")
        if rows:
            out.append(f"host{h.i}: rows left uploading after a clean stop: {rows[:5]}")
        return out

    def fresh_resync_problems(self) -> list[str]:
        """A new host (empty disk, no ledger) restores exactly what the app has: no deleted file
        comes back, nothing is missing; an object that cannot become a file fails by name."""
        root, ledger = self.tmp / "fresh" / "uploads", self.tmp / "fresh" / "ledger.db"
        cfg = self.tmp / "fresh" / "syncd.toml"
        src = self.hosts[0].config.read_text()
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(src.replace(str(self.hosts[0].root), str(root)).replace(str(self.hosts[0].ledger), str(ledger)))
        res = subprocess.run([sys.executable, "-m", "syncd", "--config", str(cfg), "-q", "resync"],
                             capture_output=True, text=True, timeout=300)
        out = []
        tree = live_tree(root)
        want = live_tree(self.hosts[0].root)
        for path in sorted(set(tree) | set(want)):
            pm = self.model.get(path)
            if pm is not None and pm.clash:
                # one of a file/directory pair: restored whole, or failed by name (SPEC §4.14)
                if path in tree and tree[path] not in pm.versions:
                    out.append(f"fresh resync: {path}: content no one wrote")
                elif path not in tree and path in self.remote_files() and path not in res.stderr:
                    out.append(f"fresh resync: {path}: an object neither restored nor reported failed")
                continue
            if tree.get(path) != want.get(path):
                what = "missing" if path not in tree else "deleted by the app, but back" if path not in want \
                    else "different"
                out.append(f"fresh resync: {path}: {what}")
        # a file/directory pair still in the bucket: one of them cannot be restored (SPEC §4.14)
        remote = set(self.remote_files())
        expect_fail = any(any(o.startswith(p + "/") for o in remote) for p in remote)
        if res.returncode not in ((0, 1) if expect_fail else (0,)):
            out.append(f"fresh resync: exit {res.returncode}: {res.stderr.strip()[-500:]}")
        if expect_fail and res.returncode == 0:
            out.append("fresh resync: exit 0, although an object is both a file and a directory "
                       f"(one of them cannot be restored): {res.stderr.strip()[-300:]}")
        if "Traceback" in res.stderr:
            out.append(f"fresh resync: traceback: {res.stderr[-1500:]}")
        return out

