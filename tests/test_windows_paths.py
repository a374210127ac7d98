"""Windows paths <-> keys, checked on Linux with PureWindowsPath.

Upload side: a local path under a watch root becomes a ledger path with "/" (keys.rel_path).
Restore side: a key from the bucket must land inside the root as a valid Windows name
(keys.rel_from_key refuses escapes everywhere; restore.windows_name_problem refuses what only
Windows cannot create).
"""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath

import pytest

from syncd.keys import UnsafeKey, join_key, rel_from_key, rel_path
from syncd.restore import windows_name_problem

W = PureWindowsPath


@pytest.mark.parametrize("root, path, rel", [
    (r"C:\data\uploads", r"C:\data\uploads\photos\cat.jpg", "photos/cat.jpg"),
    (r"C:\data\uploads", r"C:\data\uploads", ""),
    (r"C:\data\uploads", "C:/data/uploads/mixed\\seps/a.txt", "mixed/seps/a.txt"),
    (r"C:\data\uploads", r"c:\DATA\Uploads\Keep Case\Ünïcode file.PDF", "Keep Case/Ünïcode file.PDF"),
    ("D:\\", r"D:\x\y.bin", "x/y.bin"),  # a whole drive as the watch
    (r"\\fileserver\share\uploads", r"\\fileserver\share\uploads\a\b.txt", "a/b.txt"),
    (r"\\fileserver\share", r"\\FILESERVER\Share\top.txt", "top.txt"),  # a share root
    (r"C:\data\uploads", "C:\\data\\uploads\\" + "\\".join(f"d{i}" for i in range(40)) + "\\f",
     "/".join(f"d{i}" for i in range(40)) + "/f"),
])
def test_windows_path_to_ledger_path(root: str, path: str, rel: str) -> None:
    assert rel_path(W(root), W(path)) == rel
    assert "\\" not in rel


@pytest.mark.parametrize("root, path", [
    (r"C:\data\uploads", r"D:\data\uploads\a.txt"),  # another drive
    (r"C:\data\uploads", r"C:\data\uploads2\a.txt"),  # a sibling sharing the prefix
    (r"C:\data\uploads", r"C:\data\uploads\..\secrets\a.txt"),
    (r"C:\data\uploads", r"\\server\share\data\uploads\a.txt"),
    (r"\\server\share\uploads", r"\\server\other\uploads\a.txt"),
    (r"C:\data\uploads", r"C:\data"),
])
def test_windows_paths_outside_the_root_have_no_ledger_path(root: str, path: str) -> None:
    assert rel_path(W(root), W(path)) is None


def test_posix_paths_use_the_same_rule() -> None:
    p = PurePosixPath
    assert rel_path(p("/srv/up"), p("/srv/up/a b/ü.txt")) == "a b/ü.txt"
    assert rel_path(p("/srv/up"), p("/srv/up2/x")) is None
    assert rel_path(p("/"), p("/srv/x")) == "srv/x"
    # on Linux a backslash is an ordinary character of one name (refused later by name_problem)
    assert rel_path(p("/srv/up"), p("/srv/up/a\\b")) == "a\\b"


@pytest.mark.parametrize("remote_prefix, watch_prefix", [("backups", "uploads"), ("", "uploads"),
                                                         ("a/b", "media/img")])
@pytest.mark.parametrize("rel", ["cat.jpg", "photos/2024/cat.jpg", "with space/ünï.txt",
                                 ".hidden/x", "a.b.c/d.e"])
def test_keys_round_trip_between_windows_paths_and_the_bucket(remote_prefix: str, watch_prefix: str,
                                                              rel: str) -> None:
    root = W(r"D:\app\uploads")
    local = root.joinpath(*rel.split("/"))
    key = join_key(remote_prefix, watch_prefix, rel_path(root, local) or "")
    assert key == "/".join(p for p in (remote_prefix, watch_prefix, rel) if p)
    back = rel_from_key(key, join_key(remote_prefix, watch_prefix))
    assert back == rel
    assert root.joinpath(*back.split("/")) == local
    assert not any(windows_name_problem(seg) for seg in back.split("/"))


@pytest.mark.parametrize("key", [
    "uploads/C:/Windows/system.ini",  # drive letter segment
    "uploads/c:evil.txt",  # drive-relative path
    "uploads/a\\..\\..\\boot.ini",  # backslashes
    "uploads/\\\\server\\share\\x",  # UNC
    "uploads/../x",
    "uploads/a/../../x",
    "uploads//x",
    "uploads/./x",
    "uploads/x\x00.txt",
    "other/x",  # not under the base
])
def test_keys_that_would_escape_a_windows_root_are_refused(key: str) -> None:
    with pytest.raises(UnsafeKey):
        rel_from_key(key, "uploads")


@pytest.mark.parametrize("name", [
    "CON", "con", "PRN", "AUX", "NUL", "nul.txt", "NUL.tar.gz", "Con.JPG", "NUL .txt",
    "COM1", "com9.log", "LPT1", "lpt3.txt", "COM\u00b9", "LPT\u00b2.txt", "CONIN$", "conout$.x",
])
def test_reserved_windows_names_are_refused_on_restore(name: str) -> None:
    problem = windows_name_problem(name)
    assert problem and "reserved" in problem


@pytest.mark.parametrize("name", [
    "trailing.", "trailing ", "dots...", "a<b", "a>b", 'a"b', "a|b", "a?b", "a*b", "ab:stream",
    "tab\there", "new\nline", "\x1f",
])
def test_invalid_windows_names_are_refused_on_restore(name: str) -> None:
    problem = windows_name_problem(name)
    assert problem and "not a valid Windows file name" in problem


@pytest.mark.parametrize("name", [
    "CONSOLE.txt", "COM10", "COM0x", "LPT", "nul_file", "con-fig.toml", "NULL", ".hidden", "a.b.c",
    "cat.jpg", "ünïcode", "with space.txt", "CON_", "xNUL",
])
def test_ordinary_names_that_look_reserved_are_fine(name: str) -> None:
    assert windows_name_problem(name) is None


@pytest.mark.parametrize("name", ["CON", "nul.txt", "COM1.a.b", "LPT\u00b3", "CONIN$", "aux .c", "prn"])
def test_agrees_with_pathlib_on_reserved_names(name: str) -> None:
    assert W("C:/x", name).is_reserved()
    assert windows_name_problem(name) is not None
