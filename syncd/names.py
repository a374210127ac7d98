"""File and key names are data (SPEC §4.14): `shown(name)` is how any of them is printed.

A name comes from whoever uploaded the file. Printed raw, `x\\n2026-12-07 10:00:00,000 INFO ...`
forges a log line, `\\x1b[...` drives the operator's terminal, U+202E reorders what a reader
sees. Logs (both formatters, `syncd.logs`), command output (`failed:` lines, dry-run plans,
`status`) and the page (`syncd.page`, HTML escaping on top) all show names through `shown`.

What is escaped: C0 and C1 controls and DEL (`\\n`, `\\r`, `\\t`, else `\\xNN`), undecodable bytes
(`os.fsdecode` keeps them as lone surrogates: shown as the byte, `\\xff`), other lone surrogates,
and the characters that hide or reorder text: bidi embeddings, overrides, isolates and marks,
zero-width characters, line/paragraph separators, BOM (`\\uNNNN`).

A backslash is *not* escaped, on purpose: the ledger already stores a name that is not valid
UTF-8 with its bytes backslash-escaped (SPEC §5, `keys.ledger_name`), so `bad\\xff.txt` read from
the ledger and the same name read from the disk both print as `bad\\xff.txt`. The price is that a
name holding a literal backslash followed by `n` looks like an escaped newline; it cannot forge
anything (a backslash is printable) and such a name is refused as a key anyway. Because the
output holds nothing that is escaped again, `shown` is idempotent: escaping at a call site and
again in the log formatter never doubles a backslash.

JSON output (`status --json`, GET /status) keeps JSON's own escaping of the raw name (scripts
want the name itself); `json.dumps` there writes ASCII only, so bidi characters and surrogates
come out as `\\uNNNN` too.
"""

from __future__ import annotations

import os
import re
from typing import Any

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:  # surrogateescape's stand-in for the undecodable byte o - 0xDC00
        return f"\\x{o - 0xDC00:02x}"
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def shown(name: Any) -> str:
    """`name` (str, bytes or a path) as it may be printed: one line, no control, reordering or
    invisible character, valid UTF-8 when encoded."""
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "surrogateescape")
    elif not isinstance(name, str):
        name = str(name)
    return _UNSAFE.sub(_escape, name)
