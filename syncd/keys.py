"""Local relative paths <-> object keys, and the safety rules for keys coming back (SPEC §1, §4.4, §4.9).

A *ledger path* is a relative path with `/` separators. A name that is not valid UTF-8 is kept
with its bytes backslash-escaped (it can never become a key and its row is `failed`).
"""

from __future__ import annotations

import re
from pathlib import PurePath

MAX_KEY_BYTES = 1024
# Names under a watch prefix that are syncd's own and never restored or listed as files.
RESERVED_DIRS = (".trash", ".syncd-check", ".syncd")  # .syncd/tombstones/ (SPEC §4.5)
RESTORE_TEMP_PREFIX = ".syncd-restore-"

_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL_OK = re.compile(r"[\x00]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class UnsafeKey(ValueError):
    """A key that would land outside the watch root, or cannot be a local file name."""


def check_prefix(prefix: str) -> str | None:
    """Return why `prefix` (no leading/trailing `/`) cannot be a key prefix, or None."""
    if not prefix:
        return None
    if "\\" in prefix or "\x00" in prefix:
        return "must not contain backslashes or NUL"
    for seg in prefix.split("/"):
        if seg in ("", ".", ".."):
            return f"{prefix!r} has an empty, '.' or '..' segment"
    return None


def join_key(*parts: str) -> str:
    """Join key parts with `/`, skipping empty ones (no leading `/`)."""
    return "/".join(p for p in parts if p)


def ledger_name(name: str) -> str:
    """A file-system name (str from os.fsdecode) as stored in the ledger."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def rel_path(root: PurePath, path: PurePath) -> str | None:
    r"""The ledger path of `path` inside the watch root `root` ("" for the root), else None.

    Pure and flavour-aware, so Windows paths work (and are tested on Linux) with PureWindowsPath:
    drive letters and UNC shares, either separator, the root matched case-insensitively as
    Windows does, and a root that is a whole drive (`D:\`, where "root + separator" as a string
    prefix would match nothing). Parts are joined with "/": a key never holds a backslash.
    """
    try:
        rel = path.relative_to(root)
    except ValueError:
        return None
    if ".." in rel.parts:  # pure paths keep "..": "root/../x" is not inside the root
        return None
    return "/".join(ledger_name(p) for p in rel.parts)


def name_problem(name: str) -> str | None:
    """Why a single file-system name cannot be part of a key, or None if it can."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8, so it cannot be an S3 key"
    if "\\" in name:
        return "name contains a backslash, which syncd refuses in keys (unsafe on restore)"
    return None


def key_problem(key: str) -> str | None:
    if len(key.encode("utf-8", "surrogateescape")) > MAX_KEY_BYTES:
        return f"key is longer than {MAX_KEY_BYTES} bytes"
    return None


def rel_from_key(key: str, base: str) -> str:
    """The ledger path of `key` under `base` (remote prefix / watch prefix), or raise UnsafeKey.

    Refuses everything that could escape the root: `..`, `.`, empty segments, absolute keys,
    drive letters, backslashes, NUL and other control characters that no file name should carry.
    """
    if base:
        if not key.startswith(base + "/"):
            raise UnsafeKey(f"key {key!r} is not under {base + '/'!r}")
        rel = key[len(base) + 1:]
    else:
        rel = key
    if not rel:
        raise UnsafeKey("empty relative path")
    if rel.startswith("/"):
        raise UnsafeKey(f"absolute path in key {key!r}")
    if "\\" in rel:
        raise UnsafeKey(f"backslash in key {key!r}")
    if "\x00" in rel:
        raise UnsafeKey(f"NUL in key {key!r}")
    if _SURROGATE.search(rel):  # a file:// remote's file whose name is not UTF-8: no ledger row can hold it
        raise UnsafeKey(f"key {key!r} is not valid UTF-8")
    if _DRIVE.match(rel):
        raise UnsafeKey(f"drive letter in key {key!r}")
    for seg in rel.split("/"):
        if seg in ("", ".", ".."):
            raise UnsafeKey(f"'{seg or '(empty)'}' segment in key {key!r}")
        if ":" in seg and _DRIVE.match(seg):
            raise UnsafeKey(f"drive letter in key {key!r}")
    return rel


def is_reserved(rel: str) -> bool:
    """syncd's own objects under a watch prefix: trash, check probes, tombstones, restore temp files."""
    first = rel.split("/", 1)[0]
    if first in RESERVED_DIRS:
        return True
    return rel.rsplit("/", 1)[-1].startswith(RESTORE_TEMP_PREFIX)
