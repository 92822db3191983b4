"""recovery.plan: what a new owner does with a partition, from what the group committed."""

from __future__ import annotations

from worker.recovery import CAREFUL_RECORDS, CLEAN, RUNNING, Careful, Plan, plan, try_marker


def test_nothing_committed_commits_the_start_earliest_or_latest() -> None:
    assert plan(None, "", (5, 20)) == Plan(start=5)
    assert plan(None, "", (5, 20), latest=True) == Plan(start=20)


def test_nothing_committed_and_no_watermarks_does_nothing() -> None:
    assert plan(None, "", None) == Plan()


def test_a_clean_handover_needs_no_care() -> None:
    assert plan(7, CLEAN, (0, 50)) == Plan()


def test_a_stop_mid_stream_runs_the_records_up_to_the_high_watermark_carefully() -> None:
    assert plan(7, RUNNING, (0, 50)) == Plan(careful=Careful(7, 50, 0))


def test_a_try_marker_at_the_committed_offset_counts_its_crashes() -> None:
    assert plan(7, try_marker(7, 2), (0, 50)) == Plan(careful=Careful(7, 50, 2))


def test_without_watermarks_at_most_the_careful_window_runs_carefully() -> None:
    assert plan(7, RUNNING, None) == Plan(careful=Careful(7, 7 + CAREFUL_RECORDS, 0))


def test_nothing_after_the_committed_offset_needs_no_care() -> None:
    assert plan(50, RUNNING, (0, 50)) == Plan()


def test_an_operators_offset_reset_leaves_empty_metadata_and_needs_no_care() -> None:
    # kafka-consumer-groups --reset-offsets commits with no metadata: no worker died.
    assert plan(7, "", (0, 50)) == Plan()


def test_trailing_nuls_librdkafka_writes_are_ignored() -> None:
    assert plan(7, CLEAN + "\x00", (0, 50)) == Plan()
    assert plan(7, try_marker(7, 2) + "\x00", (0, 50)) == Plan(careful=Careful(7, 50, 2))
    assert plan(7, "\x00", (0, 50)) == Plan()
    assert plan(7, RUNNING + "\x00", (0, 50)) == Plan(careful=Careful(7, 50, 0))
