"""The poison-pill rules, without a broker: what a new owner does with a partition."""

from __future__ import annotations

from worker.recovery import (
    CAREFUL_RECORDS,
    CLEAN,
    CRASH_LIMIT,
    RUNNING,
    assess,
    clean_metadata,
    run_marker,
    try_marker,
)


def test_a_clean_handover_or_a_new_group_needs_no_care() -> None:
    assert assess(120, CLEAN, 500) is None
    assert assess(None, "", 500) is None


def test_an_unclean_stop_runs_what_follows_one_at_a_time_up_to_the_end() -> None:
    careful = assess(120, run_marker(129), 10_000)
    assert careful is not None
    assert (careful.start, careful.until, careful.crashes) == (120, 130, 0)
    assert not careful.covers(119) and careful.covers(120) and careful.covers(129)
    assert not careful.covers(130)


def test_the_careful_window_reaches_the_last_record_handed_over() -> None:
    careful = assess(10, run_marker(9_000), 10_000)
    assert careful is not None and careful.covers(9_000) and not careful.covers(9_001)
    assert careful.until == 9_001


def test_an_older_workers_window_is_bounded() -> None:
    careful = assess(10, RUNNING, 10_000)
    assert careful is not None and careful.until == 10 + CAREFUL_RECORDS
    unknown_end = assess(10, RUNNING, None)
    assert unknown_end is not None and unknown_end.until == 10 + CAREFUL_RECORDS


def test_nothing_after_the_committed_offset_needs_no_care() -> None:
    assert assess(130, RUNNING, 130) is None
    assert assess(130, run_marker(200), 130) is None
    assert assess(130, run_marker(129), 200) is None


def test_try_markers_count_crashes_of_the_record_at_the_committed_offset_only() -> None:
    careful = assess(120, try_marker(120, 1), 200)
    assert careful is not None and careful.crashes == 1
    assert careful.attempt(120) == 2 and careful.attempt(121) == 1
    stale = assess(125, try_marker(120, 2), 200)  # a marker for another offset counts nothing
    assert stale is not None and stale.crashes == 0
    garbage = assess(120, "try:120:x", 200)
    assert garbage is not None and garbage.crashes == 0


def test_a_record_is_given_up_after_the_crash_limit_counting_the_first_unnoticed_crash() -> None:
    assert CRASH_LIMIT == 3
    # crash 1: unnoticed (metadata "run:<last>"); crash 2: careful try 1; crash 3: try 2
    after_first = assess(7, run_marker(19), 20)
    after_second = assess(7, try_marker(7, 1), 20)
    after_third = assess(7, try_marker(7, 2), 20)
    assert after_first is not None and not after_first.give_up(7)
    assert after_second is not None and not after_second.give_up(7)
    assert after_third is not None and after_third.give_up(7)
    assert not after_third.give_up(8)  # the records after it run normally


def test_markers_are_what_the_broker_stores() -> None:
    assert try_marker(42, 2) == "try:42:2"
    assert run_marker(42) == "run:42"
    # far below the broker's offset.metadata.max.bytes (4096 by default)
    assert len(try_marker(2**63 - 1, 99)) < 100 and len(run_marker(2**63 - 1)) < 100


def test_only_the_trailing_nuls_librdkafka_writes_are_ignored() -> None:
    assert clean_metadata("clean\x00") == CLEAN and clean_metadata(None) == ""
    assert assess(5, "clean\x00", 10) is None
    # Metadata that only ends like a marker is someone else's: the window stays careful.
    assert clean_metadata("cleanX\x00") == "cleanX"
    careful = assess(5, "cleanX\x00", 10)
    assert careful is not None and (careful.start, careful.until) == (5, 10)
