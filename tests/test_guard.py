"""The mass-deletion guard's rule for remote deletion events (SPEC §4.12, `syncd.guard`)."""

from __future__ import annotations

from syncd.guard import MASS_FLOOR, event_rule


def test_the_guard_pauses_event_deletions_that_would_remove_most_of_a_watch_and_no_fewer() -> None:
    # a watch of one or two files follows its remote deletions (below the floor)
    assert MASS_FLOOR == 3
    assert event_rule(pending=1, had=1, recent=1, max_deletes=1000) is None
    assert event_rule(pending=2, had=2, recent=2, max_deletes=1000) is None
    # from the floor on, more than half of the files at once pauses; half does not
    assert event_rule(pending=3, had=5, recent=3, max_deletes=1000) is not None
    assert event_rule(pending=20, had=40, recent=20, max_deletes=1000) is None
    why = event_rule(pending=21, had=40, recent=21, max_deletes=1000)
    assert why is not None and "21 of its 40 files" in why
    # a few deletions in a large watch go ahead, unless max_deletes within 60 s is passed
    assert event_rule(pending=5, had=10_000, recent=1000, max_deletes=1000) is None
    why = event_rule(pending=5, had=10_000, recent=1001, max_deletes=1000)
    assert why is not None and "exceed max_deletes=1000" in why
