"""Coalescing rules and the run/split/fallback logic, without Kafka."""

from __future__ import annotations

import numpy as np
import pytest

from worker.batching import Batch, Batcher, Job, RunMode, run_batch, run_mode
from worker.errors import InferenceError
from worker.model_config import ModelSettings
from worker.signature import Signature, TensorSpec


def _job(
    rows: int,
    token: object = None,
    mode: str = RunMode.COALESCE,
    width: int = 3,
    model: str = "m",
    arrived: float = 0.0,
) -> Job:
    x = np.arange(rows * width, dtype=np.float32).reshape(rows, width)
    return Job(token, model, 1, mode, {"x": x}, rows, arrived=arrived)


def _double(feeds: dict[str, np.ndarray]) -> dict[str, object]:
    return {"y": feeds["x"] * 2}


def test_small_jobs_coalesce_until_the_delay_passes() -> None:
    b = Batcher(max_rows=100, max_delay_s=0.005)
    assert b.add(_job(2, arrived=0.0)) == [] and b.add(_job(3, arrived=0.001)) == []
    assert b.due(now=0.004) == []
    [batch] = b.due(now=0.006)
    assert batch.rows == 5 and len(batch.jobs) == 2 and len(b) == 0


def test_a_full_group_is_handed_out_at_once_and_never_exceeds_max_rows() -> None:
    b = Batcher(max_rows=10, max_delay_s=1.0)
    out = [batch for i in range(8) for batch in b.add(_job(3, token=i))]
    assert all(batch.rows <= 10 for batch in out)
    assert [j.token for batch in out for j in batch.jobs] == list(range(len(out) * 3))


def test_different_shapes_or_models_never_share_a_run() -> None:
    b = Batcher(max_rows=100, max_delay_s=0.0)
    b.add(_job(2, width=3))
    b.add(_job(2, width=4))
    b.add(_job(2, model="other"))
    assert len(b.due(now=1.0)) == 3


def test_large_and_fixed_shape_jobs_run_alone() -> None:
    b = Batcher(max_rows=1024, max_delay_s=1.0, alone_rows=64)
    [big] = b.add(_job(64))
    [fixed] = b.add(_job(4, mode=RunMode.WHOLE))
    assert len(big.jobs) == len(fixed.jobs) == 1 and len(b) == 0


def test_a_careful_records_job_runs_alone_and_leaves_the_waiting_group_waiting() -> None:
    # After an unclean stop a covered record runs alone: if it takes the process down,
    # no other request was in its run.
    b = Batcher(max_rows=1024, max_delay_s=1.0)
    assert b.add(_job(2, token="a")) == []
    careful = _job(2, token="careful")
    careful.guarded = True
    [alone] = b.add(careful)
    assert [j.token for j in alone.jobs] == ["careful"] and alone.guarded
    [waiting] = b.due(now=5.0)
    assert [j.token for j in waiting.jobs] == ["a"] and not waiting.guarded


def test_run_batch_splits_outputs_back_per_job_without_copying_a_single_job() -> None:
    b = Batcher(max_rows=100, max_delay_s=0.0)
    jobs = [_job(r, token=r) for r in (1, 2, 3)]
    for j in jobs:
        b.add(j)
    [batch] = b.due(now=1.0)
    sizes: list[int] = []
    results = run_batch(_double, batch, max_rows=100, on_run=sizes.append)
    assert sizes == [6]  # one run for the three requests
    for job, result in zip(jobs, results, strict=True):
        assert isinstance(result, dict)
        np.testing.assert_array_equal(result["y"], job.feeds["x"] * 2)


def test_a_request_over_max_rows_runs_in_slices_and_is_reassembled() -> None:
    job = _job(10)
    sizes: list[int] = []
    [result] = run_batch(_double, _single(job), 4, on_run=sizes.append)
    assert sizes == [4, 4, 2]
    assert isinstance(result, dict)
    np.testing.assert_array_equal(result["y"], job.feeds["x"] * 2)


def _single(job: Job) -> Batch:
    return Batch(job.model, job.version, [job])


def test_one_bad_request_does_not_sink_its_neighbours() -> None:
    def fragile(feeds: dict[str, np.ndarray]) -> dict[str, object]:
        if (feeds["x"] < 0).any():
            raise InferenceError("negative input")
        return _double(feeds)

    good, bad = _job(2, token="good"), _job(2, token="bad")
    bad.feeds["x"][0, 0] = -1
    b = Batcher(max_rows=100, max_delay_s=0.0)
    b.add(good)
    b.add(bad)
    [batch] = b.due(now=1.0)
    results = run_batch(fragile, batch, max_rows=100)
    assert isinstance(results[0], dict) and isinstance(results[1], InferenceError)


def test_fixed_batch_of_one_runs_row_by_row() -> None:
    job = _job(3, mode=RunMode.ROWS)
    sizes: list[int] = []
    [result] = run_batch(_double, _single(job), 100, on_run=sizes.append)
    assert sizes == [1, 1, 1]
    assert isinstance(result, dict) and result["y"].shape == (3, 3)


@pytest.mark.parametrize(
    ("shape", "mode"),
    [((None, 3), RunMode.COALESCE), ((1, 3), RunMode.ROWS), ((4, 3), RunMode.WHOLE)],
)
def test_run_mode_from_signature(shape: tuple[int | None, ...], mode: str) -> None:
    spec = TensorSpec("x", "tensor(float)", np.dtype("float32"), shape)
    assert run_mode(Signature(inputs=(spec,), outputs=())) == mode


def test_clear_drops_queued_jobs() -> None:
    b = Batcher(max_rows=100, max_delay_s=1.0)
    b.add(_job(2))
    b.clear()
    assert len(b) == 0 and b.due(now=10.0, force=True) == [] and b.next_deadline() is None


def test_take_hands_out_the_oldest_group_whose_model_has_a_free_slot() -> None:
    b = Batcher(max_rows=100, max_delay_s=1.0, settings_for=lambda m: ModelSettings(instances=2))
    b.add(_job(2, model="busy", token="busy"))
    b.add(_job(2, model="a", token="a1"))
    b.add(_job(2, model="b", token="b"))
    b.add(_job(2, model="a", token="a2"))
    asked: list[tuple[str, int, int | None]] = []

    def free(model: str, version: int, instances: int | None) -> bool:
        asked.append((model, version, instances))
        return model != "busy"

    first = b.take(free)
    assert first is not None and [j.token for j in first.jobs] == ["a1", "a2"]
    assert asked == [("busy", 1, 2), ("a", 1, 2)]
    second = b.take(free)
    assert second is not None and [j.token for j in second.jobs] == ["b"]
    assert b.take(free) is None and len(b) == 1  # the busy model's group still waits
