"""Schedules: what the app, the operator, other tools and the network do, as a list of steps.

A schedule is a pure function of (profile, seed, length): the same triple gives the same steps,
so a failing seed replays. Steps are plain dicts (JSON), so a shrunk schedule can be saved and
replayed as it is. Besides single random operations, the generator composes short *seams*: one
fault aimed at one file plus the operation that races it (a lost answer, then a delete), the
shapes of the bugs that example-based tests did not think of.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

Step = dict[str, Any]


@dataclass(frozen=True)
class Profile:
    name: str
    hosts: int
    mode: str  # backup | shared
    events: bool  # an SQS queue per host fed by the bucket's notifications (through SNS)
    on_delete: str  # keep | mirror | trash


PROFILES = {p.name: p for p in (
    Profile("backup-mirror", 1, "backup", False, "mirror"),
    Profile("backup-keep", 1, "backup", False, "keep"),
    Profile("shared-events", 2, "shared", True, "mirror"),
    Profile("shared-listing", 2, "shared", False, "mirror"),
)}

# how a file is written by the app: at once, in slow chunks, appended, rewritten in place, or
# written to a temp file then renamed into place (careful writers, Django's storage)
WRITES = ("create", "create", "slow", "append", "overwrite", "temp_rename", "new_dir")
CHECKSUMS = ("CRC32", "CRC32C", "SHA256", "SHA1")
# CRC64NVME (S3's default for new objects; a multipart one is a full-object checksum) came later:
# drawn from its own stream in place of half the SHA1s, so that older seeds keep their schedules
LATER_CHECKSUM = "CRC64NVME"


class Gen:
    def __init__(self, profile: Profile, seed: int) -> None:
        self.p = profile
        self.rng = random.Random(seed)
        self.later = random.Random(f"later:{seed}")  # choices added since: not drawn from `rng`
        self.n = 0
        self.steps: list[Step] = []

    # --- names --------------------------------------------------------------------------
    def new_path(self, depth: int | None = None) -> str:
        self.n += 1
        depth = self.rng.choice((0, 0, 1, 1, 2)) if depth is None else depth
        dirs = [f"d{self.rng.randrange(3)}" for _ in range(depth)]
        return "/".join([*dirs, f"f{self.n}.bin"])

    def some_path(self) -> str:
        """A path used before (so operations meet), or a new one."""
        used = sorted({s["path"] for s in self.steps if "path" in s and s["op"] == "write"})
        if used and self.rng.random() < 0.75:
            return self.rng.choice(used)
        return self.new_path()

    def host(self) -> int:
        return self.rng.randrange(self.p.hosts)

    def size(self) -> int:
        r = self.rng.random()
        return self.rng.choice((0, 1, 17)) if r < 0.1 else self.rng.randrange(1, 3000) if r < 0.9 \
            else self.rng.randrange(100_000, 400_000)

    def add(self, op: str, **kw: Any) -> None:
        self.steps.append({"op": op, **kw})

    def write(self, h: int, path: str, how: str | None = None) -> None:
        self.add("write", host=h, path=path, how=how or self.rng.choice(WRITES), size=self.size(),
                 salt=self.rng.randrange(1 << 30))

    def pause(self, lo: float = 0.0, hi: float = 0.6) -> None:
        self.add("pause", seconds=round(self.rng.uniform(lo, hi), 2))

    # --- seams: a fault or a timing aimed at one file --------------------------------------
    def seam_lost_answer(self) -> None:
        """The store acts, its answer is lost, then the app deletes or renames the file."""
        h, path = self.host(), self.new_path()
        self.add("arm", kind=self.rng.choice(("lost", "lost", "truncate")), method="PUT", path=path,
                 count=self.rng.choice((1, 2)))
        self.write(h, path, "create")
        self.add("await_fault", path=path)
        if self.rng.random() < 0.7:
            self.add("delete", host=h, path=path)
        else:
            self.add("rename", host=h, path=path, to=self.new_path())

    def seam_lost_copy(self) -> None:
        """A rename's server-side copy whose answer is lost, then the new name is deleted."""
        h, path = self.host(), self.new_path()
        self.write(h, path, "create")
        self.add("await_synced", host=h)
        to = self.new_path()
        self.add("arm", kind="lost", method="PUT", path=to, count=1)
        self.add("rename", host=h, path=path, to=to)
        self.add("await_fault", path=to)
        self.add("delete", host=h, path=to)

    def seam_busy_event(self) -> None:
        """Quick rewrites on one host while another host is busy restoring the previous one."""
        if self.p.hosts < 2:
            return self.seam_lost_answer()
        h, path = self.host(), self.new_path()
        self.add("arm", kind="delay", method="GET", path=path, count=self.rng.choice((1, 2, 3)))
        for _ in range(self.rng.choice((2, 3, 4))):
            self.write(h, path, "overwrite")
            self.pause(0.2, 0.5)

    def seam_wipe(self) -> None:
        """Another tool empties the bucket once the hosts have synced."""
        for _ in range(self.rng.randrange(3, 7)):
            self.write(self.host(), self.new_path(), "create")
        for h in range(self.p.hosts):
            self.add("await_synced", host=h)
        self.add("wipe_bucket")
        self.pause(1.0, 3.0)

    def seam_stop_in_multipart(self) -> None:
        """A clean stop while a large file is in the middle of its multipart upload."""
        h, path = self.host(), self.new_path(0)
        self.add("arm", kind="hold", method="PUT", path=path + "?uploadId=", count=2)
        self.add("write", host=h, path=path, how="large", size=7 << 20, salt=self.rng.randrange(1 << 30))
        self.add("await_request", method="PUT", path=path + "?uploadId=")
        self.add("stop", host=h)
        self.add("start", host=h)

    def seam_clash(self) -> None:
        """Another tool writes `c` and `c/d.txt`: one of them cannot become a file."""
        base = self.new_path(0).removesuffix(".bin")
        first, second = (base, f"{base}/inner.bin") if self.rng.random() < 0.5 else (f"{base}/inner.bin", base)
        self.add("other_put", path=first, size=self.size(), salt=self.rng.randrange(1 << 30), checksum="")
        self.add("other_put", path=second, size=self.size(), salt=self.rng.randrange(1 << 30), checksum="")
        self.add("listing", host=self.host())

    def seam_flipped_composite(self) -> None:
        """Another tool's multipart object (a composite checksum) is flipped on its way down."""
        path = self.new_path()
        self.add("arm", kind="flip", method="GET", path=path, count=1)
        self.add("other_put", path=path, size=self.rng.randrange(600_000, 1_500_000),
                 salt=self.rng.randrange(1 << 30), checksum=self.rng.choice(CHECKSUMS), multipart=True)
        self.add("listing", host=self.host())

    # --- the rest: ordinary life --------------------------------------------------------------
    def ordinary(self) -> None:
        r = self.rng.random()
        h = self.host()
        if r < 0.40:
            self.write(h, self.some_path())
        elif r < 0.52:
            self.add("delete", host=h, path=self.some_path())
        elif r < 0.60:
            self.add("rename", host=h, path=self.some_path(), to=self.new_path())
        elif r < 0.64:
            self.add("rename_dir", host=h, dir=f"d{self.rng.randrange(3)}", to=f"e{self.rng.randrange(1000)}")
        elif r < 0.72:
            self.pause()
        elif r < 0.78:
            self.add("kill", host=h)
            if self.rng.random() < 0.5:
                self.write(h, self.some_path())  # the app goes on while syncd is down
            self.add("start", host=h)
        elif r < 0.80:
            self.add("lose_host", host=h)
        elif r < 0.88:
            self.add("arm", kind=self.rng.choice(("reset", "cut", "lost", "truncate", "slowdown", "stall")),
                     method=self.rng.choice(("PUT", "GET", "HEAD", "DELETE")), path=self.some_path(),
                     count=self.rng.choice((1, 2)))
        elif r < 0.93:
            path, size, salt = self.new_path(), self.size(), self.rng.randrange(1 << 30)
            checksum = self.rng.choice(("", *CHECKSUMS))
            if checksum == "SHA1" and self.later.random() < 0.5:
                checksum = LATER_CHECKSUM
            self.add("other_put", path=path, size=size, salt=salt, checksum=checksum,
                     multipart=self.rng.random() < 0.3)
        elif r < 0.96:
            self.add("await_synced", host=h)
        else:
            self.add("listing", host=h)

    SEAMS = ("seam_lost_answer", "seam_lost_answer", "seam_lost_copy", "seam_busy_event", "seam_wipe",
             "seam_stop_in_multipart", "seam_clash", "seam_flipped_composite")

    def build(self, length: int) -> list[Step]:
        seams = self.SEAMS if self.p.events else tuple(s for s in self.SEAMS if s not in ("seam_wipe",))
        for _ in range(self.rng.randrange(2, 5)):  # a few files first, so operations meet
            self.write(self.host(), self.new_path(), "create")
        while len(self.steps) < length:
            if self.rng.random() < 0.25:
                getattr(self, self.rng.choice(seams))()
            else:
                self.ordinary()
        return self.steps


def generate(profile: Profile, seed: int, length: int = 30) -> list[Step]:
    return Gen(profile, seed).build(length)
