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
    return re.compile(r"(?s:" + regex + r")\Z")


def _match(pattern: str, rel: str, is_dir: bool = False) -> bool:
    rx = _compile(pattern)
    if "/" in pattern:
        return rx.match(rel) is not None
    name = rel.rsplit("/", 1)[-1]
    return rx.match(name) is not None


class Filter:
    """Decides which relative paths a watch keeps."""

    def __init__(self, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> None:
        self.include = tuple(include)
        self.exclude = tuple(exclude)

    def dir_excluded(self, rel_dir: str) -> bool:
        """True when a whole directory is excluded (pruned from walks and events)."""
        return any(_match(p, rel_dir) for p in self.exclude)

    def dir_wanted(self, rel_dir: str) -> bool:
        """False when the directory or any directory above it is excluded."""
        parts = rel_dir.split("/")
        return not any(self.dir_excluded("/".join(parts[:i])) for i in range(1, len(parts) + 1))

    def wants(self, rel: str) -> bool:
        """True when the file at `rel` (ledger path) is synced."""
        name = rel.rsplit("/", 1)[-1]
        if name.startswith(RESTORE_TEMP_PREFIX):
            return False
        if any(_match(p, rel) for p in self.exclude):
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
