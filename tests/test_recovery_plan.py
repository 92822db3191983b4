"""recovery.plan: what a new owner does with a partition, from what the group committed."""

from __future__ import annotations

from worker.recovery import (
    CAREFUL_RECORDS,
    CLEAN,
    RUNNING,
    Careful,
    Plan,
    plan,
    run_marker,
    try_marker,
)


def test_nothing_committed_commits_the_start_earliest_or_latest() -> None:
    assert plan(None, "", (5, 20)) == Plan(start=5)
    assert plan(None, "", (5, 20), latest=True) == Plan(start=20)


def test_nothing_committed_and_no_watermarks_does_nothing() -> None:
    assert plan(None, "", None) == Plan()


def test_a_clean_handover_needs_no_care() -> None:
    assert plan(7, CLEAN, (0, 50)) == Plan()


def test_a_stop_mid_stream_runs_the_records_up_to_the_last_one_handed_over_carefully() -> None:
    # run:<last>: the records from the committed offset up to last may have run.
    assert plan(7, run_marker(1200), (0, 5000)) == Plan(careful=Careful(7, 1201, 0))
    assert plan(7, run_marker(7), (0, 50)) == Plan(careful=Careful(7, 8, 0))


def test_the_careful_window_reaches_far_past_the_committed_offset() -> None:
    # Far more than CAREFUL_RECORDS handed over since the last commit: all run carefully.
    last = 7 + 40 * CAREFUL_RECORDS
    assert plan(7, run_marker(last), None) == Plan(careful=Careful(7, last + 1, 0))


def test_the_careful_window_ends_at_the_high_watermark() -> None:
    assert plan(7, run_marker(1200), (0, 50)) == Plan(careful=Careful(7, 50, 0))


def test_nothing_handed_over_past_the_committed_offset_needs_no_care() -> None:
    assert plan(7, run_marker(6), (0, 50)) == Plan()
    assert plan(7, run_marker(-1), (0, 50)) == Plan()
    assert plan(50, run_marker(60), (0, 50)) == Plan()


def test_a_try_marker_at_the_committed_offset_counts_its_crashes() -> None:
    # Only the record it names had run since the careful records before it settled.
    assert plan(7, try_marker(7, 2), (0, 50)) == Plan(careful=Careful(7, 8, 2))


def test_an_older_workers_bare_run_marker_runs_a_fixed_window_carefully() -> None:
    assert plan(7, RUNNING, (0, 50)) == Plan(careful=Careful(7, 50, 0))
    assert plan(7, RUNNING, (0, 5000)) == Plan(careful=Careful(7, 7 + CAREFUL_RECORDS, 0))
    assert plan(7, RUNNING, None) == Plan(careful=Careful(7, 7 + CAREFUL_RECORDS, 0))
    assert plan(50, RUNNING, (0, 50)) == Plan()


def test_a_marker_of_another_offset_or_unreadable_is_careful_without_counting() -> None:
    assert plan(9, try_marker(7, 2), (0, 5000)) == Plan(careful=Careful(9, 9 + CAREFUL_RECORDS, 0))
    assert plan(7, "run:x", (0, 50)) == Plan(careful=Careful(7, 50, 0))
    assert plan(7, "run:--3", (0, 50)) == Plan(careful=Careful(7, 50, 0))


def test_an_operators_offset_reset_leaves_empty_metadata_and_needs_no_care() -> None:
    # kafka-consumer-groups --reset-offsets commits with no metadata: no worker died.
    assert plan(7, "", (0, 50)) == Plan()


def test_trailing_nuls_librdkafka_writes_are_ignored() -> None:
    assert plan(7, CLEAN + "\x00", (0, 50)) == Plan()
    assert plan(7, try_marker(7, 2) + "\x00", (0, 50)) == Plan(careful=Careful(7, 8, 2))
    assert plan(7, "\x00", (0, 50)) == Plan()
    assert plan(7, RUNNING + "\x00", (0, 50)) == Plan(careful=Careful(7, 50, 0))
    assert plan(7, run_marker(20) + "\x00", (0, 50)) == Plan(careful=Careful(7, 21, 0))
