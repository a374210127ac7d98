"""include / exclude / restore globs (SPEC §2).

A pattern without `/` matches a file name at any depth; for `exclude` it also matches a
directory name, which prunes that whole subtree (what `.gitignore` users expect). A pattern with
`/` matches the whole relative path: `*` stays inside one directory, `**` crosses directories.
Exclude wins over include.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from syncd.keys import RESTORE_TEMP_PREFIX


@lru_cache(maxsize=512)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(_regex(pattern))


def _regex(pattern: str) -> str:
    pat = pattern.lstrip("/")
    anchored = "/" in pattern
    out = []
    i = 0
    while i < len(pat):
        c = pat[i]
        if c == "*":
            if pat.startswith("**", i):
                i += 2
                if i < len(pat) and pat[i] == "/":
                    out.append("(?:.*/)?")  # "**/" = zero or more directories
                    i += 1
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pat.find("]", i + 2 if pat.startswith("[!", i) or pat.startswith("[]", i) else i + 1)
            if j == -1:
                out.append(re.escape(c))
            else:
                body = pat[i + 1:j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    regex = "".join(out)
    if not anchored:
        regex = "[^/]*" if regex == "" else regex
    return r"(?s:" + regex + r")\Z"


def _match(pattern: str, rel: str, is_dir: bool = False) -> bool:
    rx = _compile(pattern)
    if "/" in pattern:
        return rx.match(rel) is not None
    name = rel.rsplit("/", 1)[-1]
    return rx.match(name) is not None


class Filter:
    """Decides which relative paths a watch keeps.

    Called for every file of every scan: the name patterns are one regex, and the verdict on
    each directory is remembered (a tree has far fewer directories than files)."""

    DIR_CACHE = 4096

    def __init__(self, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> None:
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        names = [_regex(p) for p in self.exclude if "/" not in p]
        self._ex_name = re.compile("|".join(names)) if names else None  # matched on the name
        self._ex_path = [_compile(p) for p in self.exclude if "/" in p]  # on the whole path
        self._dirs: dict[str, bool] = {}

    def _excluded(self, rel: str) -> bool:
        if self._ex_name is not None and self._ex_name.match(rel.rsplit("/", 1)[-1]):
            return True
        return any(rx.match(rel) for rx in self._ex_path)

    def dir_excluded(self, rel_dir: str) -> bool:
        """True when a whole directory is excluded (pruned from walks and events)."""
        return self._excluded(rel_dir)

    def dir_wanted(self, rel_dir: str) -> bool:
        """False when the directory or any directory above it is excluded."""
        wanted = self._dirs.get(rel_dir)
        if wanted is None:
            parent = rel_dir.rpartition("/")[0]
            wanted = not self._excluded(rel_dir) and (not parent or self.dir_wanted(parent))
            if len(self._dirs) >= self.DIR_CACHE:
                self._dirs.clear()
            self._dirs[rel_dir] = wanted
        return wanted

    def wants(self, rel: str) -> bool:
        """True when the file at `rel` (ledger path) is synced."""
        name = rel.rsplit("/", 1)[-1]
        if name.startswith(RESTORE_TEMP_PREFIX):
            return False
        if self._excluded(rel):
            return False
        # an excluded directory anywhere above excludes the file
        if "/" in rel and not self.dir_wanted(rel.rsplit("/", 1)[0]):
            return False
        if self.include:
            return any(_match(p, rel) for p in self.include)
        return True


def matches_any(patterns: Iterable[str], rel: str) -> bool:
    """For `restore GLOB...`: does `rel` match any of the patterns."""
    return any(_match(p, rel) for p in patterns)
