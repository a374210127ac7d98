"""Key safety and pattern semantics (SPEC §2 patterns, §4.4 hostile keys)."""

from __future__ import annotations

import pytest

from syncd.keys import UnsafeKey, is_reserved, ledger_name, name_problem, rel_from_key
from syncd.patterns import Filter, matches_any


@pytest.mark.parametrize("rel", ["../x", "a/../../x", "/abs", "..\\x", "C:\\x", "c:x", "nul\x00b", "./x",
                                 "a//b", "a/./b", "a/", ""])
def test_hostile_keys_are_refused(rel):
    with pytest.raises(UnsafeKey):
        rel_from_key("p/" + rel, "p")


@pytest.mark.parametrize("rel", ["a.txt", "a b/c d.txt", "ü/файл.txt", "..hidden", "a..b", "x/.dot"])
def test_ordinary_keys_map_to_paths(rel):
    assert rel_from_key("p/q/" + rel, "p/q") == rel


def test_key_outside_base_is_refused():
    with pytest.raises(UnsafeKey):
        rel_from_key("other/a.txt", "p")


def test_reserved_names():
    assert is_reserved(".trash/2026-01-01/a") and is_reserved(".syncd-check/host")
    assert is_reserved("d/.syncd-restore-abc") and not is_reserved("d/trash/a")


def test_non_utf8_names_are_escaped_and_flagged():
    name = b"bad-\xff.txt".decode("utf-8", "surrogateescape")
    assert ledger_name(name) == "bad-\\xff.txt"
    assert "UTF-8" in name_problem(name)
    assert name_problem("fine ü.txt") is None
    assert "backslash" in name_problem("a\\b")


def test_pattern_without_slash_matches_name_at_any_depth():
    f = Filter(exclude=["*.tmp"])
    assert not f.wants("a.tmp") and not f.wants("x/y/a.tmp") and f.wants("x/a.txt")


def test_pattern_with_slash_matches_whole_path():
    assert matches_any(["img/*.jpg"], "img/a.jpg")
    assert not matches_any(["img/*.jpg"], "img/sub/a.jpg")
    assert matches_any(["img/**/*.jpg"], "img/sub/deep/a.jpg")
    assert matches_any(["img/**/*.jpg"], "img/a.jpg")
    assert matches_any(["**/thumbs/*"], "a/b/thumbs/x.png")


def test_exclude_wins_over_include_and_prunes_directories():
    f = Filter(include=["*.jpg"], exclude=["cache", "private/**"])
    assert f.wants("a/b.jpg")
    assert not f.wants("a/b.png")
    assert not f.wants("cache/b.jpg") and f.dir_excluded("x/cache")
    assert not f.wants("private/a/b.jpg")
    assert not f.wants(".syncd-restore-xyz")
