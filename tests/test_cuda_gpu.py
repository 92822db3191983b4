"""On a real GPU: every test model on CUDA against the CPU at 64 rows (TF32-sized
tolerances), fp32 exactness with TF32 off, scalar inputs, warm-up at the largest
batch, the arena limit and the optimized-graph cache.

Skipped, through the worker's own probe (tests/conftest.py), wherever a Conv
and a MatMul cannot run on CUDA device 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.gpu import write_big_model
from tests.modelzoo import UNBATCHED_ZOO, ZOO, sample_feeds, write_scale_by_scalar
from worker.errors import ModelLoadError
from worker.repository import ModelRepository
from worker.runtime import TF32_TOLERANCE, RuntimeOptions, load_session, memcpy_nodes

pytestmark = pytest.mark.gpu

CPU = RuntimeOptions(device="cpu")
CUDA = RuntimeOptions(device="cuda:0")
EXACT = RuntimeOptions(device="cuda:0", cuda_tf32=False)
ROWS = 64


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    root = tmp_path_factory.mktemp("zoo")
    for builder in {**ZOO, **UNBATCHED_ZOO}.values():
        builder(root)
    return ModelRepository(root)


def _close(got: Any, want: Any, rtol: float) -> None:
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and got.shape == want.shape and got.dtype == want.dtype
        if want.dtype.kind == "f":
            scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)
        else:
            np.testing.assert_array_equal(got, want)
    else:  # seq(map)
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.keys() == w.keys()
            np.testing.assert_allclose(list(g.values()), list(w.values()), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("name", sorted({**ZOO, **UNBATCHED_ZOO}))
def test_zoo_on_cuda_matches_cpu(zoo: ModelRepository, name: str) -> None:
    ref = zoo.resolve(name)
    cpu, gpu = load_session(ref, CPU), load_session(ref, CUDA)
    assert gpu.device == "cuda:0" and gpu.providers[0] == "CUDAExecutionProvider"
    # Warm-up on CUDA succeeds wherever it does on CPU: a device failure would have
    # been a load error. Some graphs reject zero feeds on both (``split``: its
    # ``split`` input of zeros cannot cover one row) and are served anyway.
    assert gpu.warmed_up == cpu.warmed_up
    feeds = sample_feeds(cpu.signature, rows=ROWS, seed=5)
    want, got = cpu.run(feeds), gpu.run(feeds)
    assert list(got) == list(want)
    for key in want:
        _close(got[key], want[key], TF32_TOLERANCE)
    gpu.close()


@pytest.mark.parametrize("name", ["mnist-mlp", "small-cnn", "slow"])
def test_tf32_off_is_fp32_exact(zoo: ModelRepository, name: str) -> None:
    ref = zoo.resolve(name)
    cpu, gpu = load_session(ref, CPU), load_session(ref, EXACT)
    feeds = sample_feeds(cpu.signature, rows=ROWS, seed=6)
    want, got = cpu.run(feeds), gpu.run(feeds)
    for key in want:
        _close(got[key], want[key], 1e-4)  # fp32 re-association only; TF32 would be ~1e-3


def test_scalar_input_keeps_its_shape_on_cuda(tmp_path: Path) -> None:
    write_scale_by_scalar(tmp_path)
    gpu = load_session(ModelRepository(tmp_path).resolve("scale-by-scalar"), CUDA)
    assert gpu._bind  # the I/O-binding path
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = gpu.run({"x": x, "scale": np.array(2.0, np.float32)})
    np.testing.assert_allclose(out["y"], x * 2)  # type: ignore[arg-type]
    assert out["total"].shape == ()  # type: ignore[union-attr]


def test_warmup_reaches_the_largest_batch_and_is_charged(zoo: ModelRepository) -> None:
    options = RuntimeOptions(device="cuda:0", warmup_max_rows=1024)
    small = load_session(zoo.resolve("small-cnn"), options)
    assert small.warmup_rows == [1, 1024]
    assert small.nbytes > 0


def test_arena_limit_is_enforced(tmp_path: Path) -> None:
    write_big_model(tmp_path, "big", 256)
    ref = ModelRepository(tmp_path).resolve("big")
    with pytest.raises(ModelLoadError):
        load_session(ref, RuntimeOptions(device="cuda:0", cuda_mem_limit=64 << 20))
    assert load_session(ref, RuntimeOptions(device="cuda:0", cuda_mem_limit=1 << 30)).warmed_up


def test_cuda_cached_graphs_hold_no_memcpy(zoo: ModelRepository, tmp_path: Path) -> None:
    # string-labels and iris-logreg mix CPU-only nodes with CUDA ones: where ORT saves
    # Memcpy nodes, the graph must not be cached.
    options = RuntimeOptions(device="cuda:0", optimized_dir=tmp_path / "opt")
    for name in ("string-labels", "iris-logreg", "small-cnn", "two-io"):
        session = load_session(zoo.resolve(name), options)
        if session.optimized_path is not None:
            assert memcpy_nodes(session.optimized_path) == []
        again = load_session(zoo.resolve(name), options)
        assert again.warmed_up
