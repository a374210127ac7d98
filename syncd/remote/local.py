"""`file://` remote: key K lives at ROOT/K with the file's mtime (SPEC §5).

Checksums and mtimes live in a sidecar tree, ROOT/.syncd-meta/<K>.json, out of the way of keys
(a watch prefix or remote prefix never starts with `.syncd-meta`: listings skip it). Writes are
temp file + fsync + rename + directory fsync, so a crash never leaves a partial object.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from syncd.bwlimit import Limiter
from syncd.fsutil import CHUNK, fsync_dir, give_to_parent_owner, make_dirs
from syncd.remote.base import (
    INTEGRITY,
    INVALID,
    LOCAL,
    NOT_FOUND,
    UNREACHABLE,
    Fetched,
    ObjectInfo,
    RemoteError,
)

META_DIR = ".syncd-meta"
NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, tmpfs)


STALE_TEMP = 60.0  # seconds untouched before a temp of a killed upload is removed


def _etag(st: os.stat_result) -> str:
    """The file remote's version tag: an object rewritten or touched gets another one."""
    return f"{st.st_size:x}-{st.st_mtime_ns:x}"


class LocalRemote:
    def __init__(self, root: Path, *, limiter: Limiter | None = None) -> None:
        self.root = Path(root)
        self._limiter = limiter  # bwlimit: what put and get move takes tokens (a copy's bytes do not)
        self._chunk = limiter.chunk if limiter is not None else CHUNK
        self.name = f"file://{self.root.as_posix()}"
        self._meta = self.root / META_DIR
        self._tmp = self._meta / ".tmp"

    def _clean_stale_temps(self) -> None:
        """A killed upload leaves its temp in .syncd-meta/.tmp; remove those untouched for a
        while (a live upload keeps writing its own)."""
        try:
            entries = list(os.scandir(self._tmp))
        except OSError:
            return
        now = time.time()
        for de in entries:
            try:
                if de.name.startswith("put-") and now - de.stat(follow_symlinks=False).st_mtime > STALE_TEMP:
                    os.unlink(de.path)
            except OSError:
                continue

    # --- paths ------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts) or "\\" in key or "\x00" in key:
            raise RemoteError(NOT_FOUND, f"invalid key {key!r}", code="InvalidKey")
        if parts[0] == META_DIR:
            raise RemoteError(NOT_FOUND, f"key {key!r} is reserved", code="InvalidKey")
        return self.root.joinpath(*parts)

    def _meta_path(self, key: str) -> Path:
        name = key.rsplit("/", 1)[-1]
        side = name + ".json"
        if len(os.fsencode(side)) > NAME_MAX:  # a 255-byte name has no room for ".json"
            side = "#" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest() + ".json"
        return self._meta.joinpath(*key.split("/")).with_name(side)

    def _read_meta(self, key: str, st: os.stat_result) -> dict:
        try:
            meta = json.loads(self._meta_path(key).read_text())
        except (OSError, ValueError):
            return {}
        # a sidecar only counts when it describes the bytes that are there now
        if meta.get("size") != st.st_size or meta.get("mtime_ns") != st.st_mtime_ns:
            return {}
        return meta

    def _atomic_write(self, target: Path, fill, mtime_ns: int | None) -> None:
        make_dirs(self._tmp)
        fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix="put-")
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            if mtime_ns is not None:
                os.utime(tmp, ns=(mtime_ns, mtime_ns))
            make_dirs(target.parent)
            # run as root (`check`, `resync`): the service's user must go on with it (SPEC §4.13)
            give_to_parent_owner(tmp, target.parent)
            os.replace(tmp, target)
            fsync_dir(target.parent)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def _write_meta(self, key: str, sha256: str, mtime_ns: int, size: int) -> None:
        data = json.dumps({"sha256": sha256, "mtime_ns": mtime_ns, "size": size}).encode()
        self._atomic_write(self._meta_path(key), lambda f: f.write(data), None)

    # --- Remote -----------------------------------------------------------------------
    def probe(self, prefix: str = "") -> None:
        if not self.root.is_dir():
            try:
                make_dirs(self.root)
            except OSError as e:
                raise RemoteError(UNREACHABLE, f"cannot create remote directory {self.root}: {e.strerror}",
                                  code="NoSuchDirectory") from e
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise RemoteError(UNREACHABLE, f"remote directory {self.root} is not writable", code="AccessDenied")
        self._clean_stale_temps()

    def list(self, prefix: str, *, start_after: str = "") -> Iterator[ObjectInfo]:
        start = self.root
        for seg in [p for p in prefix.rstrip("/").split("/") if p]:
            start = start / seg
        if not start.is_dir():
            return

        def rec(abs_dir: str, rel_dir: str) -> Iterator[ObjectInfo]:
            try:
                with os.scandir(abs_dir) as it:
                    entries = list(it)
            except FileNotFoundError:
                return
            items = []
            for de in entries:
                if not rel_dir and de.name == META_DIR:
                    continue
                try:
                    is_dir = de.is_dir()
                    if is_dir and de.is_symlink():
                        continue  # not followed (as os.walk), and not a file either
                except OSError:
                    continue
                # a directory's keys all start with "name/": sorting it as that gives S3's order
                items.append((de.name + "/" if is_dir else de.name, de, is_dir))
            items.sort(key=lambda t: t[0])
            for _sort, de, is_dir in items:
                key = f"{rel_dir}/{de.name}" if rel_dir else de.name
                if is_dir:
                    yield from rec(de.path, key)
                    continue
                if not key.startswith(prefix) or (start_after and key <= start_after):
                    continue
                try:
                    st = de.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield ObjectInfo(key=key, size=st.st_size, mtime_ns=st.st_mtime_ns, etag=_etag(st),
                                 modified_ns=st.st_mtime_ns)

        rel = start.relative_to(self.root).as_posix()
        yield from rec(str(start), "" if rel == "." else rel)

    def head(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self._path(key))
        except FileNotFoundError:
            return None
        meta = self._read_meta(key, st)
        return ObjectInfo(key=key, size=st.st_size, sha256=meta.get("sha256"),
                          mtime_ns=meta.get("mtime_ns", st.st_mtime_ns), etag=_etag(st), modified_ns=st.st_mtime_ns)

    def put(self, key: str, path: Path, *, size: int, sha256: str, mtime_ns: int,
            data: bytes | None = None) -> str:
        return self._put(key, path, sha256=sha256, mtime_ns=mtime_ns, data=data, limiter=self._limiter)

    def _put(self, key: str, path: Path, *, sha256: str, mtime_ns: int, data: bytes | None,
             limiter: Limiter | None) -> str:
        target = self._path(key)
        digest = hashlib.sha256()
        take = limiter.take if limiter is not None else None

        def fill(f: BinaryIO) -> None:
            if data is not None:
                if take is not None:
                    take(len(data))
                digest.update(data)
                f.write(data)
            else:
                with open(path, "rb") as src:
                    while chunk := src.read(self._chunk):
                        if take is not None:
                            take(len(chunk))
                        digest.update(chunk)
                        f.write(chunk)
            # the "server-side" check: what arrived must hash to what the client announced
            if digest.hexdigest() != sha256:
                raise RemoteError(INTEGRITY, f"checksum mismatch for {key} (file changed while uploading)",
                                  code="BadDigest")

        try:
            self._atomic_write(target, fill, mtime_ns)
        except FileNotFoundError as e:
            raise RemoteError(LOCAL, f"{path} vanished", code="NoSuchFile") from e
        st = os.stat(target)
        self._write_meta(key, sha256, mtime_ns, st.st_size)
        return _etag(st)

    def get(self, key: str, dest: BinaryIO, *, version_id: str | None = None) -> Fetched:
        if version_id is not None:
            raise RemoteError(INVALID, f"{self.name} keeps no versions (asked for {key} version {version_id})",
                              code="NoVersions")
        p = self._path(key)
        try:
            f = open(p, "rb")  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            raise RemoteError(NOT_FOUND, f"no object {key}", code="NoSuchKey") from None
        with f:
            st = os.fstat(f.fileno())
            take = self._limiter.take if self._limiter is not None else None
            while chunk := f.read(self._chunk):
                if take is not None:
                    take(len(chunk))
                dest.write(chunk)
        meta = self._read_meta(key, st)
        info = ObjectInfo(key=key, size=st.st_size, sha256=meta.get("sha256"),
                          mtime_ns=meta.get("mtime_ns", st.st_mtime_ns), etag=_etag(st), modified_ns=st.st_mtime_ns)
        return Fetched(info=info, server_verified=False)

    def copy(self, src: str, dst: str, *, sha256: str, mtime_ns: int,
             expect_sha256: str | None = None) -> str | None:
        sp = self._path(src)
        if not sp.is_file():
            raise RemoteError(NOT_FOUND, f"no object {src}", code="NoSuchKey")
        # the metadata is always the hash of what is copied (checked while copying, by `put`)
        want = expect_sha256 or hashlib.sha256(sp.read_bytes()).hexdigest()
        try:  # a "server-side" copy: no bytes cross the link to the store, none are limited
            return self._put(dst, sp, sha256=want, mtime_ns=mtime_ns, data=None, limiter=None)
        except RemoteError as e:
            if e.kind == INTEGRITY:
                raise RemoteError(NOT_FOUND, f"{src} changed before it could be copied",
                                  code="SourceChanged") from e
            raise

    def delete(self, key: str) -> None:
        for p in (self._path(key), self._meta_path(key)):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        pass
