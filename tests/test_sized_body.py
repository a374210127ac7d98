"""fsutil.SizedBody: a file streamed as a request body gives exactly the bytes announced, or fails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from syncd.fsutil import FileChangedError, SizedBody


def drain(body: SizedBody, n: int = 1000) -> bytes:
    out = b""
    while chunk := body.read(n):
        out += chunk
    return out


def test_an_unchanged_file_is_read_whole_and_can_be_read_again(tmp_path: Path) -> None:
    f = tmp_path / "a"
    f.write_bytes(b"x" * 2500)
    with open(f, "rb") as fh:
        body = SizedBody(fh, 2500)
        assert drain(body) == b"x" * 2500
        assert body.seek(0) == 0 and drain(body, 700) == b"x" * 2500  # a retry's rewind
        assert not body.changed


@pytest.mark.parametrize("rewrite", [b"short", b"y" * 5000, b"z" * 2500], ids=["shrunk", "grown", "same size"])
def test_a_file_rewritten_while_it_is_sent_fails_before_its_last_bytes(tmp_path: Path, rewrite: bytes) -> None:
    f = tmp_path / "a"
    f.write_bytes(b"x" * 2500)
    os.utime(f, ns=(0, 1_000_000_000))  # the rewrite below surely moves the mtime
    with open(f, "rb") as fh:
        body = SizedBody(fh, 2500)
        first = body.read(1000)
        f.write_bytes(rewrite)  # truncated and written in place, as an app's save does
        with pytest.raises(FileChangedError):
            first += drain(body)
        assert body.changed and len(first) < 2500
        with pytest.raises(FileChangedError):  # no retry of a body that is not what was hashed
            body.seek(0)
