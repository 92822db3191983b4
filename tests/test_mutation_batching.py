"""Batching edges the mutation run (``make mutation``) found untested.

Boundaries (a group that fills exactly, a delay that has exactly passed), the
zero-copy paths (one job, one slice), list and scalar outputs, and which run
mode a request gets.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from worker.batching import (
    ALONE_ROWS,
    Batch,
    Batcher,
    Job,
    RunMode,
    _concat,
    _join,
    run_batch,
    run_mode,
)
from worker.errors import InferenceError
from worker.model_config import ModelSettings
from worker.protocol.base import Bound
from worker.settings import Settings
from worker.signature import Signature, TensorSpec

Feeds = dict[str, np.ndarray]


def _job(
    rows: int,
    token: object = None,
    mode: str = RunMode.COALESCE,
    model: str = "m",
    version: int = 1,
    arrived: float = 0.0,
) -> Job:
    x = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    return Job(token, model, version, mode, {"x": x}, rows, arrived=arrived)


def _sig(*shapes: tuple[int | None, ...]) -> Signature:
    specs = tuple(
        TensorSpec(f"i{n}", "tensor(float)", np.dtype("float32"), s) for n, s in enumerate(shapes)
    )
    return Signature(inputs=specs, outputs=())


def _double(feeds: Feeds) -> dict[str, object]:
    return {"y": feeds["x"] * 2}


# -- run modes ----------------------------------------------------------------------------


def test_a_request_alone_runs_whole_even_on_a_dynamic_model() -> None:
    assert run_mode(_sig((None, 3)), alone=True) == RunMode.WHOLE
    assert run_mode(_sig((1, 3)), alone=True) == RunMode.WHOLE
    assert run_mode(_sig((None, 3))) == RunMode.COALESCE
    assert run_mode(_sig(())) == RunMode.WHOLE  # a scalar input: no axis 0


def test_for_request_takes_the_mode_feeds_and_rows_of_the_bound_request() -> None:
    x = np.zeros((4, 3), dtype=np.float32)
    job = Job.for_request("tok", "m", 7, _sig((None, 3)), Bound(feeds={"x": x}, rows=4))
    assert (job.token, job.model, job.version, job.mode, job.rows) == (
        "tok",
        "m",
        7,
        RunMode.COALESCE,
        4,
    )
    assert job.feeds["x"] is x
    alone = Job.for_request("t", "m", 1, _sig((None, 3)), Bound({"x": x}, 1, alone=True))
    assert alone.mode == RunMode.WHOLE
    fixed = Job.for_request("t", "m", 1, _sig((1, 3)), Bound({"x": x}, 4))
    assert fixed.mode == RunMode.ROWS
    # A bound request that does not say "alone" is not.
    plain = Job.for_request("t", "m", 1, _sig((None, 3)), SimpleNamespace(feeds={"x": x}, rows=4))
    assert plain.mode == RunMode.COALESCE


def test_feeds_without_one_shared_axis_0_run_whole() -> None:
    two = np.zeros((2, 3), dtype=np.float32)
    # axis-0 lengths that disagree
    j = Job(None, "m", 1, RunMode.COALESCE, {"a": two, "b": np.zeros((3, 3))}, 2)
    assert j.mode == RunMode.WHOLE
    # a scalar feed
    j = Job(None, "m", 1, RunMode.ROWS, {"a": two, "k": np.array(5)}, 2)
    assert j.mode == RunMode.WHOLE
    # same axis 0, different widths: they still share a batch axis
    j = Job(None, "m", 1, RunMode.COALESCE, {"a": two, "b": np.zeros((2, 4))}, 2)
    assert j.mode == RunMode.COALESCE


# -- the batcher's boundaries ---------------------------------------------------------------


def test_jobs_that_fill_a_group_exactly_go_out_together() -> None:
    b = Batcher(max_rows=10, max_delay_s=1.0)
    first, second = _job(6, token=1, model="m2", version=3), _job(4, token=2, model="m2", version=3)
    assert b.add(first) == []
    [batch] = b.add(second)
    assert (batch.model, batch.version, batch.jobs, batch.rows) == ("m2", 3, [first, second], 10)
    assert len(b) == 0


def test_a_job_that_would_overflow_the_group_starts_the_next_one() -> None:
    b = Batcher(max_rows=10, max_delay_s=1.0)
    first, second = _job(6, model="m2", version=3), _job(5, model="m2", version=3)
    b.add(first)
    [batch] = b.add(second)
    assert (batch.model, batch.version, batch.jobs) == ("m2", 3, [first])
    assert len(b) == 1
    [rest] = b.due(force=True)
    assert (rest.model, rest.version, rest.jobs) == ("m2", 3, [second])


def test_the_default_alone_size_is_the_flags_default() -> None:
    assert ALONE_ROWS == Settings.model_fields["coalesce_below_rows"].default == 256
    b = Batcher(max_rows=4000, max_delay_s=1.0)
    assert b.add(_job(ALONE_ROWS - 1)) == []
    [big] = b.add(_job(ALONE_ROWS, model="big", version=2))
    assert (big.model, big.version, big.rows) == ("big", 2, ALONE_ROWS)


def test_a_group_is_due_when_its_oldest_job_has_waited_exactly_the_delay() -> None:
    b = Batcher(max_rows=100, max_delay_s=0.5)
    b.add(_job(1, arrived=100.0, model="m2", version=4))
    b.add(_job(1, arrived=100.25, model="m2", version=4))
    assert b.next_deadline() == 100.5
    assert b.due(now=100.25) == []
    [batch] = b.due(now=100.5)
    assert (batch.model, batch.version, batch.rows) == ("m2", 4, 2)


def test_next_deadline_is_the_oldest_group_plus_the_delay() -> None:
    b = Batcher(max_rows=100, max_delay_s=0.5)
    b.add(_job(1, arrived=3.0, model="late"))
    b.add(_job(1, arrived=2.0, model="early"))
    assert b.next_deadline() == 2.5


def test_due_reads_the_clock_when_not_given_a_time() -> None:
    b = Batcher(max_rows=100, max_delay_s=0.5)
    b.add(_job(1, arrived=time.monotonic() - 1.0))
    b.add(_job(1, arrived=time.monotonic() + 60.0, model="later"))
    [batch] = b.due()
    assert batch.model == "m" and len(b) == 1


# -- running and splitting ------------------------------------------------------------------


def test_two_coalesced_jobs_share_one_run() -> None:
    jobs = [_job(2, token="a"), _job(3, token="b")]
    sizes: list[int] = []
    results = run_batch(_double, Batch("m", 1, jobs), 100, on_run=sizes.append)
    assert sizes == [5]
    for job, r in zip(jobs, results, strict=True):
        assert isinstance(r, dict)
        np.testing.assert_array_equal(r["y"], job.feeds["x"] * 2)


def test_one_job_or_one_slice_reaches_the_run_without_a_copy() -> None:
    job = _job(4)
    seen: list[Feeds] = []

    def run(feeds: Feeds) -> dict[str, object]:
        seen.append(feeds)
        return _double(feeds)

    run_batch(run, Batch("m", 1, [job]), max_rows=4)  # rows == max_rows: one run, not sliced
    assert seen[0]["x"] is job.feeds["x"]
    assert _concat([job]) is job.feeds
    part = {"y": np.ones(2)}
    assert _join([part]) is part


def test_list_outputs_are_split_and_joined_per_row() -> None:
    def labels(feeds: Feeds) -> dict[str, object]:
        return {"label": [f"r{v:g}" for v in feeds["x"][:, 0]]}

    a, b = _job(2), _job(3)
    sizes: list[int] = []
    ra, rb = run_batch(labels, Batch("m", 1, [a, b]), 100, on_run=sizes.append)
    assert sizes == [5]
    assert ra == {"label": ["r0", "r3"]} and rb == {"label": ["r0", "r3", "r6"]}
    # One request over max_rows, in two slices: the lists are joined back in order.
    [whole] = run_batch(labels, Batch("m", 1, [_job(4)]), 2, on_run=sizes.append)
    assert sizes[1:] == [2, 2]
    assert whole == {"label": ["r0", "r3", "r6", "r9"]}


def test_ragged_list_outputs_are_split_per_row() -> None:
    def topk(feeds: Feeds) -> dict[str, object]:
        return {"labels": [["a"] * (i + 1) for i in range(len(feeds["x"]))]}

    ra, rb = run_batch(topk, Batch("m", 1, [_job(1), _job(2)]), 100)
    assert ra == {"labels": [["a"]]} and rb == {"labels": [["a", "a"], ["a", "a", "a"]]}


def test_a_request_sliced_in_two_is_joined_whole() -> None:
    job = _job(8)
    sizes: list[int] = []
    [r] = run_batch(_double, Batch("m", 1, [job]), 4, on_run=sizes.append)
    assert sizes == [4, 4]
    assert isinstance(r, dict)
    np.testing.assert_array_equal(r["y"], job.feeds["x"] * 2)


def test_outputs_without_a_row_axis_are_computed_again_per_job() -> None:
    def total(feeds: Feeds) -> dict[str, object]:
        return {"sum": np.float32(feeds["x"].sum()), "rows": feeds["x"][:, 0]}

    a, b = _job(1), _job(2)
    sizes: list[int] = []
    ra, rb = run_batch(total, Batch("m", 1, [a, b]), 100, on_run=sizes.append)
    assert sizes == [3, 1, 2]  # one run, then one per job: a scalar cannot be cut
    assert isinstance(ra, dict) and isinstance(rb, dict)
    assert float(ra["sum"]) == 3.0 and float(rb["sum"]) == 15.0


def test_outputs_of_another_length_are_computed_again_per_job() -> None:
    def first_row(feeds: Feeds) -> dict[str, object]:
        return {"y": feeds["x"][:1]}

    sizes: list[int] = []
    results = run_batch(first_row, Batch("m", 1, [_job(2), _job(2)]), 100, on_run=sizes.append)
    assert sizes == [4, 2, 2]
    assert [r["y"].shape for r in results if isinstance(r, dict)] == [(1, 3), (1, 3)]


def test_a_whole_job_runs_on_its_own_feeds_and_counts_a_scalar_as_one_sample() -> None:
    k = np.array(3, dtype=np.int64)
    job = Job(None, "m", 1, RunMode.WHOLE, {"k": k}, 1)
    seen: list[Feeds] = []
    sizes: list[int] = []

    def run(feeds: Feeds) -> dict[str, object]:
        seen.append(feeds)
        return {"y": feeds["k"] * 2}

    [r] = run_batch(run, Batch("m", 1, [job]), 100, on_run=sizes.append)
    assert seen == [job.feeds] and sizes == [1]
    assert isinstance(r, dict) and int(r["y"]) == 6
    # A model without inputs: one sample too.
    [r] = run_batch(
        lambda f: {"c": 1},
        Batch("m", 1, [Job(None, "m", 1, RunMode.WHOLE, {}, 1)]),
        100,
        on_run=sizes.append,
    )
    assert r == {"c": 1} and sizes == [1, 1]


def test_an_unexpected_error_becomes_an_inference_error_naming_it() -> None:
    def broken(feeds: Feeds) -> dict[str, object]:
        raise ValueError("shape mismatch in node Gemm")

    [r] = run_batch(broken, Batch("m", 1, [_job(2)]), 100)
    assert isinstance(r, InferenceError)
    assert str(r) == "ValueError: shape mismatch in node Gemm"


@pytest.mark.parametrize("rows", [1, 4])
def test_rows_mode_runs_one_row_at_a_time(rows: int) -> None:
    sizes: list[int] = []
    [r] = run_batch(_double, Batch("m", 1, [_job(rows, mode=RunMode.ROWS)]), 100, sizes.append)
    assert sizes == [1] * rows
    assert isinstance(r, dict) and r["y"].shape == (rows, 3)


# -- per-model settings ----------------------------------------------------------------------


def _per_model(**models: ModelSettings) -> Batcher:
    """A Batcher of 8 rows whose models carry their own settings (any other: KeyError)."""
    return Batcher(max_rows=8, max_delay_s=1.0, settings_for=lambda model: models[model])


def test_each_model_gets_its_own_settings_by_name() -> None:
    b = _per_model(small=ModelSettings(max_batch_rows=2), big=ModelSettings(max_batch_rows=6))
    # "small" fills its 2 rows at once; "big" waits for more.
    [full] = b.add(_job(2, model="small"))
    assert (full.model, full.max_rows) == ("small", 2)
    assert b.add(_job(2, model="big")) == []
    [due] = b.due(force=True)
    assert (due.model, due.max_rows) == ("big", 6)


def test_a_model_without_a_batch_axis_runs_each_request_whole_never_sliced() -> None:
    b = _per_model(m=ModelSettings(batch_axis=False))
    job = _job(20)  # more rows than the Batcher's 8
    [batch] = b.add(job)
    assert job.mode == RunMode.WHOLE
    sizes: list[int] = []
    [r] = run_batch(_double, batch, 8, sizes.append)
    assert sizes == [20]  # one run on the request as sent
    assert isinstance(r, dict) and r["y"].shape == (20, 3)


def test_a_request_run_alone_is_sliced_at_its_models_max_rows() -> None:
    b = _per_model(m=ModelSettings(max_batch_rows=2, coalesce=False))
    [batch] = b.add(_job(5))
    assert batch.max_rows == 2
    sizes: list[int] = []
    [r] = run_batch(_double, batch, 8, sizes.append)  # 8: the flags' max rows
    assert sizes == [2, 2, 1]
    assert isinstance(r, dict) and r["y"].shape == (5, 3)
