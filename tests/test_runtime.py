"""ONNX Runtime sessions: device choice, options, warm-up, optimized-graph reuse, errors."""

from __future__ import annotations

import gc
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tests.modelzoo import ZOO, sample_feeds, write_corrupt, write_mlp
from worker.errors import InferenceError, ModelLoadError
from worker.repository import ModelRepository
from worker.runtime import (
    TF32_TOLERANCE,
    RuntimeOptions,
    cuda_probe,
    load_session,
    optimized_cache_key,
    resolve_device,
    warmup_feeds,
)

CPU = RuntimeOptions(device="cpu")
CUDA_USABLE = cuda_probe(0) is None


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    root = tmp_path_factory.mktemp("zoo")
    for builder in ZOO.values():
        builder(root)
    return ModelRepository(root)


def _assert_same(got: Any, want: Any) -> None:
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    else:  # seq(map): a list of dicts
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.keys() == w.keys()
            np.testing.assert_allclose(list(g.values()), list(w.values()), rtol=1e-5)


# -- device ------------------------------------------------------------------


def test_resolve_device_cpu_and_auto() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(" CPU ") == "cpu"
    assert resolve_device("auto") == ("cuda:0" if CUDA_USABLE else "cpu")


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "cpu:0", "auto:1", "cuda:-1", "", "cuda0"])
def test_resolve_device_malformed(spec: str) -> None:
    with pytest.raises(ValueError, match=r"^--device: expected auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


@pytest.mark.skipif(CUDA_USABLE, reason="CUDA is usable here")
def test_explicit_cuda_without_cuda_is_a_config_error() -> None:
    with pytest.raises(ValueError, match=r"^--device: cuda:1: .*CUDA"):
        resolve_device("cuda:1")


def test_auto_choice_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    import worker.runtime as rt

    rt._logged_choice.discard("auto")
    with caplog.at_level(logging.INFO, logger="worker.runtime"):
        for _ in range(3):
            resolve_device("auto")
    assert sum("device:" in r.getMessage() for r in caplog.records) == 1


# -- loading and running -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_matches_plain_onnxruntime(zoo: ModelRepository, name: str) -> None:
    ref = zoo.resolve(name)
    session = load_session(ref, CPU)
    direct = ort.InferenceSession(str(ref.path), providers=["CPUExecutionProvider"])
    feeds = sample_feeds(session.signature, rows=3, seed=1)
    got = session.run(feeds)
    want = dict(zip([o.name for o in direct.get_outputs()], direct.run(None, feeds), strict=True))
    assert list(got) == list(want)
    for key in want:
        _assert_same(got[key], want[key])
    assert session.nbytes == ref.path.stat().st_size
    assert session.device == "cpu"
    assert session.warmed_up
    session.close()


def test_zipmap_output_is_a_list_of_dicts(zoo: ModelRepository) -> None:
    session = load_session(zoo.resolve("iris-logreg"), CPU)
    out = session.run({"float_input": np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)})
    assert out["output_label"].tolist() == [0]
    probs = out["output_probability"]
    assert isinstance(probs, list) and set(probs[0]) == {0, 1, 2}
    assert probs[0][0] > 0.9


def test_session_options_suit_a_shared_worker(tmp_path: Path) -> None:
    write_mlp(tmp_path)
    session = load_session(
        ModelRepository(tmp_path).resolve("mnist-mlp"),
        RuntimeOptions(device="cpu", intra_op_threads=2),
    )
    opts = session._inner.get_session_options()  # type: ignore[union-attr]
    assert opts.intra_op_num_threads == 2
    assert opts.inter_op_num_threads == 1
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_warmup_runs_at_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mlp(tmp_path)
    ref = ModelRepository(tmp_path).resolve("mnist-mlp")
    from worker.runtime import Session

    seen: list[dict[str, np.ndarray]] = []
    real_run = Session.run

    def spy(self: Session, feeds: dict[str, np.ndarray]) -> dict[str, object]:
        seen.append(feeds)
        return real_run(self, feeds)

    monkeypatch.setattr(Session, "run", spy)
    session = load_session(ref, CPU)
    assert session.warmed_up and session.warmup_seconds > 0
    assert len(seen) == 1 and seen[0]["x"].shape == (1, 784) and not seen[0]["x"].any()
    session = load_session(ref, RuntimeOptions(device="cpu", warmup=False))
    assert not session.warmed_up and len(seen) == 1


def test_warmup_feeds_follow_the_signature(zoo: ModelRepository) -> None:
    two = load_session(zoo.resolve("two-io"), CPU)
    feeds = warmup_feeds(two.signature)
    assert feeds is not None and set(feeds) == {"a", "b"} and feeds["a"].shape == (1, 3)
    fixed = load_session(zoo.resolve("fixed-batch4"), CPU)
    assert warmup_feeds(fixed.signature)["x"].shape == (4, 4)  # type: ignore[index]
    words = load_session(zoo.resolve("string-labels"), CPU)
    assert warmup_feeds(words.signature)["word"].tolist() == [[""]]  # type: ignore[index]


def test_failed_warmup_does_not_fail_the_load(tmp_path: Path) -> None:
    # Reshape to [3, -1] cannot take one row of 4 values, but three rows work.
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "picky",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, None])],
        initializer=[onnx.numpy_helper.from_array(np.array([3, -1], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "picky" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))
    session = load_session(ModelRepository(tmp_path).resolve("picky"), CPU)
    assert not session.warmed_up
    assert session.run({"x": np.ones((3, 4), np.float32)})["y"].shape == (3, 4)


def test_corrupt_and_missing_files_are_load_errors(tmp_path: Path) -> None:
    write_corrupt(tmp_path, "broken")
    repo = ModelRepository(tmp_path)
    ref = repo.resolve("broken")
    with pytest.raises(ModelLoadError, match=r"broken:1: model.onnx could not be loaded"):
        load_session(ref, CPU)
    with pytest.raises(ModelLoadError, match=r"broken:1: model.onnx could not be loaded"):
        load_session(ref, RuntimeOptions(device="cpu", optimized_dir=tmp_path / "opt"))
    assert not any((tmp_path / "opt").glob("*")) if (tmp_path / "opt").exists() else True
    ref.path.unlink()
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_session(ref, CPU)


def test_run_errors_carry_the_ort_message(zoo: ModelRepository) -> None:
    session = load_session(zoo.resolve("mnist-mlp"), CPU)
    with pytest.raises(InferenceError, match=r"mnist-mlp:1: .*(dimension|Got invalid dimensions)"):
        session.run({"x": np.zeros((2, 5), np.float32)})
    with pytest.raises(InferenceError, match=r"mnist-mlp:1: .*(type|double)"):
        session.run({"x": np.zeros((2, 784), np.float64)})
    with pytest.raises(InferenceError, match=r"missing") as info:
        session.run({"y": np.zeros((2, 784), np.float32)})
    assert "[ONNXRuntimeError]" not in str(info.value)  # ORT's code prefix is stripped


def test_closed_session_refuses_to_run(zoo: ModelRepository) -> None:
    session = load_session(zoo.resolve("mnist-mlp"), CPU)
    session.close()
    with pytest.raises(InferenceError, match="closed"):
        session.run({"x": np.zeros((1, 784), np.float32)})


def test_runs_are_thread_safe(zoo: ModelRepository) -> None:
    session = load_session(zoo.resolve("small-cnn"), RuntimeOptions(device="cpu"))
    feeds = [sample_feeds(session.signature, rows=4, seed=i) for i in range(8)]
    want = [session.run(f)["logits"] for f in feeds]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                np.testing.assert_array_equal(session.run(feeds[i])["logits"], want[i])
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# -- optimized graph on disk ---------------------------------------------------


def test_optimized_graph_written_then_reused(tmp_path: Path) -> None:
    write_mlp(tmp_path / "repo")
    write_mlp(tmp_path / "repo", version=2, seed=8)
    repo = ModelRepository(tmp_path / "repo")
    options = RuntimeOptions(device="cpu", optimized_dir=tmp_path / "opt")
    ref = repo.resolve("mnist-mlp", 1)
    first = load_session(ref, options)
    key = optimized_cache_key(ref.path, "cpu")
    assert first.optimized_path == tmp_path / "opt" / f"{key}.onnx"
    assert first.optimized_path.is_file() and not first.loaded_optimized
    assert [p.name for p in (tmp_path / "opt").iterdir()] == [f"{key}.onnx"]  # no temp left
    second = load_session(ref, options)
    assert second.loaded_optimized and second.optimized_path == first.optimized_path
    x = sample_feeds(first.signature, rows=5)
    np.testing.assert_array_equal(first.run(x)["probs"], second.run(x)["probs"])
    other = load_session(repo.resolve("mnist-mlp", 2), options)  # other bytes, other key
    assert other.optimized_path != first.optimized_path and not other.loaded_optimized


def test_optimized_key_covers_bytes_device_and_version(tmp_path: Path) -> None:
    a = write_mlp(tmp_path, "a")
    b = write_mlp(tmp_path, "b")
    c = write_mlp(tmp_path, "c", seed=9)
    assert optimized_cache_key(a, "cpu") == optimized_cache_key(b, "cpu")  # same bytes
    assert optimized_cache_key(a, "cpu") != optimized_cache_key(c, "cpu")
    assert optimized_cache_key(a, "cpu") != optimized_cache_key(a, "cuda:0")


def test_unusable_optimized_file_is_rebuilt(tmp_path: Path) -> None:
    write_mlp(tmp_path / "repo")
    ref = ModelRepository(tmp_path / "repo").resolve("mnist-mlp")
    options = RuntimeOptions(device="cpu", optimized_dir=tmp_path / "opt")
    path = load_session(ref, options).optimized_path
    assert path is not None
    path.write_bytes(b"garbage")
    again = load_session(ref, options)
    assert not again.loaded_optimized and again.warmed_up
    assert load_session(ref, options).loaded_optimized  # rewritten


def test_optimized_dir_problems_never_block_a_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.runtime as rt

    write_mlp(tmp_path / "repo")
    ref = ModelRepository(tmp_path / "repo").resolve("mnist-mlp")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    session = load_session(ref, RuntimeOptions(device="cpu", optimized_dir=not_a_dir / "opt"))
    assert session.warmed_up and session.optimized_path is None

    real_create = rt._create

    def refuse_to_save(source: str, opts: ort.SessionOptions, providers: list[Any]) -> Any:
        if opts.optimized_model_filepath:
            raise RuntimeError("cannot serialize a model over 2 GiB")
        return real_create(source, opts, providers)

    monkeypatch.setattr(rt, "_create", refuse_to_save)
    session = load_session(ref, RuntimeOptions(device="cpu", optimized_dir=tmp_path / "opt"))
    assert session.warmed_up and session.optimized_path is None
    assert not list((tmp_path / "opt").iterdir())  # no temp file left behind


# -- CUDA (skipped without a usable GPU) ----------------------------------------


@pytest.mark.gpu
def test_cuda_session_matches_cpu(zoo: ModelRepository) -> None:
    for name in ("mnist-mlp", "small-cnn", "two-io", "iris-logreg", "string-labels"):
        ref = zoo.resolve(name)
        gpu = load_session(ref, RuntimeOptions(device="cuda:0"))
        cpu = load_session(ref, CPU)
        assert gpu.device == "cuda:0" and gpu.nbytes > 0
        feeds = sample_feeds(cpu.signature, rows=4, seed=3)
        got, want = gpu.run(feeds), cpu.run(feeds)
        for key in want:
            if isinstance(want[key], np.ndarray):
                np.testing.assert_allclose(  # TF32 is on by default in the CUDA provider
                    got[key], want[key], rtol=TF32_TOLERANCE, atol=TF32_TOLERANCE  # type: ignore[arg-type]
                )
        gpu.close()


@pytest.mark.gpu
def test_cuda_io_binding_path_used(zoo: ModelRepository) -> None:
    gpu = load_session(zoo.resolve("mnist-mlp"), RuntimeOptions(device="cuda:0"))
    assert gpu._bind
    assert gpu._inner.get_providers()[0] == "CUDAExecutionProvider"  # type: ignore[union-attr]
    out = gpu.run({"x": np.ones((3, 784), np.float32)})["probs"]
    assert isinstance(out, np.ndarray) and out.shape == (3, 10)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_close_gives_memory_back(tmp_path: Path) -> None:
    from worker.runtime import device_memory

    write_mlp(tmp_path, "big", seed=1)
    ref = ModelRepository(tmp_path).resolve("big")
    load_session(ref, RuntimeOptions(device="cuda:0")).close()  # CUDA context, once
    gc.collect()
    before, _ = device_memory("cuda:0")
    if before is None:
        pytest.skip("device memory not measurable")
    sessions = [load_session(ref, RuntimeOptions(device="cuda:0")) for _ in range(4)]
    for s in sessions:
        s.close()
    del sessions
    gc.collect()
    after, _ = device_memory("cuda:0")
    assert after is not None and after - before < 64 * 1024 * 1024
