"""The CUDA path's logic, run on any machine: probe choice, no silent CPU fallback,
provider options and flags, Memcpy refusal, scalar inputs through I/O binding,
warm-up sizes and device-failure classification.

Where CUDA itself is needed the test stands in for it the way it fails in the
field: onnxruntime is made to *list* CUDAExecutionProvider while it cannot
create it, which is exactly when the Python API used to retry on CPU.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import worker.runtime as rt
from tests.modelzoo import write_fixed_batch4, write_mlp
from worker.errors import ConfigError, InferenceError, ModelLoadError
from worker.optimize import pipeline
from worker.optimize.errors import RequestError
from worker.repository import ModelRef, ModelRepository
from worker.runtime import (
    CUDNN_CONV_ALGO_SEARCH,
    DEFAULT_CUDNN_CONV_ALGO_SEARCH,
    RuntimeOptions,
    Session,
    create_session,
    cuda_probe,
    device_memory,
    load_session,
    memcpy_nodes,
    parse_cuda_mem_limit,
    parse_cudnn_conv_algo_search,
    resolve_device,
    warmup_feeds,
)

CUDA_LISTED = "CUDAExecutionProvider" in ort.get_available_providers()
needs_cpu_only_ort = pytest.mark.skipif(CUDA_LISTED, reason="this onnxruntime lists CUDA")


@pytest.fixture()
def cuda_listed_but_broken(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """ORT lists CUDA (as onnxruntime-gpu does with no usable driver) but cannot make it."""
    if CUDA_LISTED:
        pytest.skip("this onnxruntime really has CUDA")
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    monkeypatch.setattr(rt, "_preloaded", [""])  # nothing to preload in a CPU wheel
    cuda_probe.cache_clear()
    with warnings.catch_warnings():
        # ORT's own "not in available provider names" UserWarning: the check under
        # test is ours, after the session exists.
        warnings.simplefilter("ignore", UserWarning)
        yield
    cuda_probe.cache_clear()


# -- probe ----------------------------------------------------------------------


def test_probe_model_exercises_cudnn_and_cublas() -> None:
    model = onnx.load_from_string(rt._probe_model())
    ops = [n.op_type for n in model.graph.node]
    assert "Conv" in ops and "MatMul" in ops  # Identity would never load cuDNN
    (y,) = ort.InferenceSession(rt._probe_model(), providers=["CPUExecutionProvider"]).run(
        None, {"x": rt._probe_input()}
    )
    assert y.shape == (2, 8) and np.abs(y).max() > 0.1  # not an all-zero, pass-anything check


@needs_cpu_only_ort
def test_probe_without_cuda_provider_says_so() -> None:
    cuda_probe.cache_clear()
    assert "no CUDAExecutionProvider" in (cuda_probe(0) or "")


def test_probe_refuses_a_session_that_fell_back_to_cpu(cuda_listed_but_broken: None) -> None:
    reason = cuda_probe(0)
    assert reason is not None
    assert "asked for CUDAExecutionProvider" in reason and "CPUExecutionProvider" in reason


def test_auto_follows_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rt, "cuda_probe", lambda device_id=0: None)
    assert resolve_device("auto") == "cuda:0"
    assert resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(rt, "cuda_probe", lambda device_id=0: "cuDNN missing")
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match=r"^--device: cuda: cuDNN missing"):
        resolve_device("cuda")


def test_an_unusable_device_is_a_config_error_naming_the_flag_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rt, "cuda_probe", lambda device_id=0: "cuDNN missing")
    with pytest.raises(ConfigError) as got:
        resolve_device("cuda:1")
    assert (got.value.flag, got.value.reason) == ("--device", "cuda:1: cuDNN missing")
    with pytest.raises(ConfigError) as bad:
        resolve_device("tpu")
    assert str(bad.value) == "--device: expected auto, cpu, cuda or cuda:N, got 'tpu'"


def test_the_optimizer_reports_why_its_cuda_target_is_unusable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(rt, "cuda_probe", lambda device_id=0: "cuDNN missing")
    request = pipeline.OptimizeRequest(repository=tmp_path, model="m", target="cuda")
    with pytest.raises(RequestError) as got:
        pipeline._check_request(request)
    assert (got.value.field, got.value.reason) == ("target", "cuDNN missing")


def test_auto_picks_cpu_when_cuda_is_listed_but_broken(cuda_listed_but_broken: None) -> None:
    rt._logged_choice.discard("auto")
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match=r"^--device: cuda:0: CUDA device 0 unusable"):
        resolve_device("cuda:0")


# -- no silent fallback ---------------------------------------------------------


def test_create_session_refuses_a_missing_provider() -> None:
    with pytest.raises(RuntimeError, match=r"NoSuchExecutionProvider is not available"):
        create_session(rt._probe_model(), ort.SessionOptions(), ["NoSuchExecutionProvider"])


def test_create_session_refuses_a_cpu_fallback(cuda_listed_but_broken: None) -> None:
    with pytest.raises(RuntimeError, match=r"asked for CUDAExecutionProvider, .* on CPU"):
        create_session(
            rt._probe_model(), ort.SessionOptions(),
            [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"],
        )


def test_create_session_disables_the_run_fallback() -> None:
    session = create_session(rt._probe_model(), ort.SessionOptions(), ["CPUExecutionProvider"])
    assert session.get_providers()[0] == "CPUExecutionProvider"
    assert session._enable_fallback is False  # a failed run is an error, not a CPU retry


def test_cuda_load_that_lands_on_cpu_is_a_load_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cuda_listed_but_broken: None
) -> None:
    write_mlp(tmp_path)
    ref = ModelRepository(tmp_path).resolve("mnist-mlp")
    monkeypatch.setattr(rt, "resolve_device", lambda device: "cuda:0")
    for opt_dir in (None, tmp_path / "opt"):
        with pytest.raises(ModelLoadError, match=r"asked for CUDAExecutionProvider"):
            load_session(ref, RuntimeOptions(device="cuda:0", optimized_dir=opt_dir))


# -- options and flags ------------------------------------------------------------


def test_cuda_provider_options_follow_runtime_options() -> None:
    ((name, cuda), cpu) = rt._providers(
        "cuda:1",
        RuntimeOptions(
            cuda_mem_limit=2 << 30, cudnn_conv_algo_search="exhaustive", cuda_tf32=False
        ),
    )
    assert (name, cpu) == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert cuda == {
        "device_id": 1,
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "use_tf32": "0",
        "gpu_mem_limit": 2 << 30,
    }
    defaults = rt._providers("cuda:0", RuntimeOptions())[0][1]
    assert defaults["cudnn_conv_algo_search"] == DEFAULT_CUDNN_CONV_ALGO_SEARCH == "HEURISTIC"
    assert defaults["use_tf32"] == "1" and "gpu_mem_limit" not in defaults
    assert rt._providers("cpu", RuntimeOptions()) == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("text", "want"),
    [("heuristic", "HEURISTIC"), (" EXHAUSTIVE ", "EXHAUSTIVE"), ("Default", "DEFAULT")],
)
def test_cudnn_conv_algo_search_flag(text: str, want: str) -> None:
    assert parse_cudnn_conv_algo_search(text) == want
    assert want in CUDNN_CONV_ALGO_SEARCH


@pytest.mark.parametrize("text", ["", "fast", "HEURISTICS", "1"])
def test_cudnn_conv_algo_search_flag_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"^--cudnn-conv-algo-search: expected one of HEURISTIC"):
        parse_cudnn_conv_algo_search(text)
    with pytest.raises(ValueError, match=r"^--cudnn-conv-algo-search"):
        RuntimeOptions(cudnn_conv_algo_search=text)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("8GiB", 8 << 30),
        ("512MiB", 512 << 20),
        ("512 mib", 512 << 20),
        ("1.5GiB", 3 << 29),
        ("8GB", 8_000_000_000),
        ("2g", 2_000_000_000),
        ("8589934592", 8 << 30),
        ("none", None),
        ("0", None),
    ],
)
def test_cuda_mem_limit_flag(text: str, want: int | None) -> None:
    assert parse_cuda_mem_limit(text) == want


@pytest.mark.parametrize("text", ["", "lots", "-1GiB", "8 XB", "iB", "1024", "GiB"])
def test_cuda_mem_limit_flag_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"^--cuda-mem-limit: "):
        parse_cuda_mem_limit(text)


def test_runtime_options_validate() -> None:
    with pytest.raises(ValueError, match=r"^--cuda-mem-limit: must be positive"):
        RuntimeOptions(cuda_mem_limit=0)
    with pytest.raises(ValueError, match=r"^--max-batch-rows: must be positive"):
        RuntimeOptions(warmup_max_rows=0)
    assert RuntimeOptions(cudnn_conv_algo_search="default").cudnn_conv_algo_search == "DEFAULT"


# -- Memcpy nodes -------------------------------------------------------------------


def _vec(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [2])


def _with_memcpy(inner: bool = False) -> onnx.ModelProto:
    """x -> MemcpyToHost -> Relu: what a CUDA session saves where CPU nodes follow CUDA ones."""
    copy = helper.make_node("MemcpyToHost", ["x"], ["h"], name="Memcpy_token_1")
    relu = helper.make_node("Relu", ["h"], ["y"])
    if not inner:
        nodes = [copy, relu]
    else:  # hidden in an If branch
        branch = helper.make_graph([copy, relu], "then", [], [_vec("y")])
        relu2 = helper.make_node("Relu", ["x"], ["y2"])
        other = helper.make_graph([relu2], "else", [], [_vec("y2")])
        nodes = [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)]
    inputs = [_vec("x")]
    if inner:
        inputs.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    graph = helper.make_graph(nodes, "g", inputs, [_vec("y")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_memcpy_nodes_found_in_graphs_and_subgraphs(tmp_path: Path) -> None:
    assert memcpy_nodes(_with_memcpy()) == ["MemcpyToHost(Memcpy_token_1)"]
    assert memcpy_nodes(_with_memcpy(inner=True)) == ["MemcpyToHost(Memcpy_token_1)"]
    path = tmp_path / "m.onnx"
    onnx.save(_with_memcpy(), str(path))
    assert memcpy_nodes(path) == ["MemcpyToHost(Memcpy_token_1)"]
    clean = write_mlp(tmp_path / "repo")
    assert memcpy_nodes(clean) == []


def test_optimized_graph_with_memcpy_is_never_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write_mlp(tmp_path / "repo")
    ref = ModelRepository(tmp_path / "repo").resolve("mnist-mlp")
    real_create = rt._create

    def cuda_like_save(source: str, opts: ort.SessionOptions, providers: list[Any]) -> Any:
        session = real_create(source, opts, providers)
        if opts.optimized_model_filepath:  # as a CUDA session does: Memcpy in the saved graph
            saved = onnx.load(opts.optimized_model_filepath)
            first = saved.graph.node[0]
            copied = f"{first.input[0]}_host"
            copy = helper.make_node("MemcpyToHost", [first.input[0]], [copied], name="Memcpy")
            saved.graph.node.insert(0, copy)
            first.input[0] = copied
            onnx.save(saved, opts.optimized_model_filepath)
        return session

    monkeypatch.setattr(rt, "_create", cuda_like_save)
    options = RuntimeOptions(device="cpu", optimized_dir=tmp_path / "opt")
    with caplog.at_level(logging.WARNING, logger="worker.runtime"):
        session = load_session(ref, options)
    assert session.optimized_path is None and session.warmed_up
    assert list((tmp_path / "opt").iterdir()) == []  # neither the graph nor a temp file
    assert "Memcpy" in caplog.text
    monkeypatch.setattr(rt, "_create", real_create)
    assert load_session(ref, options).optimized_path is not None  # a clean graph is cached


def test_unusable_cached_graph_is_deleted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mlp(tmp_path / "repo")
    ref = ModelRepository(tmp_path / "repo").resolve("mnist-mlp")
    options = RuntimeOptions(device="cpu", optimized_dir=tmp_path / "opt")
    path = load_session(ref, options).optimized_path
    assert path is not None
    path.write_bytes(b"not a graph")  # e.g. a graph this ORT no longer loads
    monkeypatch.setattr(rt, "_refuse_memcpy", lambda ref, path: True)  # and not re-cacheable
    again = load_session(ref, options)
    assert not again.loaded_optimized and again.warmed_up
    assert not path.exists()  # not tried again by every later load


# -- scalar inputs through I/O binding -----------------------------------------------


def _write_scaled(repo: Path) -> ModelRef:
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["y"])],
        "scaled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = repo / "scaled" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))
    return ModelRepository(repo).resolve("scaled")


def test_host_array_keeps_scalars_0d() -> None:
    assert np.ascontiguousarray(np.float32(2)).shape == (1,)  # the trap
    assert rt._host_array(np.array(2.0, np.float32)).shape == ()
    strided = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    out = rt._host_array(strided)
    assert out.flags.c_contiguous and out.shape == (3, 2)
    np.testing.assert_array_equal(out, strided)


def test_scalar_input_through_the_io_binding_path(tmp_path: Path) -> None:
    session = load_session(_write_scaled(tmp_path), RuntimeOptions(device="cpu"))
    scale = session.signature.inputs[1]
    assert scale.name == "scale" and scale.shape == ()
    assert warmup_feeds(session.signature)["scale"].shape == ()  # type: ignore[index]
    session._bind = True  # the CUDA path's code, with outputs bound to host memory
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y = session.run({"x": x, "scale": np.array(2.5, np.float32)})["y"]
    assert isinstance(y, np.ndarray) and y.shape == (2, 3)
    np.testing.assert_array_equal(y, x * 2.5)
    session.warmup()
    assert session.warmed_up


# -- warm-up ---------------------------------------------------------------------------


def test_warmup_runs_the_largest_batch_too(tmp_path: Path) -> None:
    write_mlp(tmp_path)
    write_fixed_batch4(tmp_path)
    repo = ModelRepository(tmp_path)
    session = load_session(repo.resolve("mnist-mlp"), RuntimeOptions(device="cpu", warmup=False))
    session.warmup(rows=64)
    assert session.warmup_rows == [1, 64] and session.warmed_up
    assert warmup_feeds(session.signature, 64)["x"].shape == (64, 784)  # type: ignore[index]
    fixed = load_session(repo.resolve("fixed-batch4"), RuntimeOptions(device="cpu", warmup=False))
    fixed.warmup(rows=64)
    assert fixed.warmup_rows == [1]  # a fixed batch axis has one size
    # On CPU the worker warms at batch 1 only: the largest batch matters for device memory.
    cpu = load_session(repo.resolve("mnist-mlp"), RuntimeOptions(device="cpu", warmup_max_rows=64))
    assert cpu.warmup_rows == [1]


class _FailingInner:
    """Stands in for an ORT session whose runs fail with ``message``."""

    def __init__(self, real: ort.InferenceSession, message: str) -> None:
        self._real = real
        self.message = message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(self.message)


def _session_on(tmp_path: Path, device: str, message: str) -> Session:
    path = write_mlp(tmp_path, seed=3)
    real = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    session = Session(ModelRef("mnist-mlp", 1, path), real, device, 1)
    session._bind = False
    session._inner = _FailingInner(real, message)  # type: ignore[assignment]
    return session


@pytest.mark.parametrize(
    "message",
    [
        "CUDA failure 2: out of memory ; GPU=0 ; hostname=x ; expr=cudaMalloc(&p, size);",
        "CUDNN failure 4: CUDNN_STATUS_INTERNAL_ERROR ; GPU=0",
        "CUBLAS failure 3: CUBLAS_STATUS_ALLOC_FAILED",
        "Failed to allocate memory for requested buffer of size 123456",
    ],
)
def test_cuda_warmup_failure_of_the_device_is_a_load_error(tmp_path: Path, message: str) -> None:
    session = _session_on(tmp_path, "cuda:0", message)
    with pytest.raises(ModelLoadError, match=r"mnist-mlp:1: warm-up at 1 row\(s\) failed on cuda"):
        session.warmup()
    assert not session.warmed_up


def test_warmup_rejected_inputs_are_served_anyway(tmp_path: Path) -> None:
    shape_error = (
        "Non-zero status code returned while running Reshape node. Status Message: "
        "/src/onnxruntime/core/providers/cuda/tensor/reshape.cc: cannot reshape"
    )
    _session_on(tmp_path, "cuda:0", shape_error).warmup()  # no raise: the inputs were the problem
    (tmp_path / "cpu").mkdir()
    cpu = _session_on(tmp_path / "cpu", "cpu", "CUDA failure 2: out of memory")
    cpu.warmup()  # on CPU nothing in the message can be a device failure
    assert not cpu.warmed_up


def test_device_failure_classification() -> None:
    assert rt._device_failure(InferenceError("m:1: CUDA error cudaErrorNoKernelImageForDevice"))
    assert not rt._device_failure(InferenceError("m:1: Got invalid dimensions for input: x"))
    assert not rt._device_failure(InferenceError("m:1: CUDAExecutionProvider node placement"))


# -- device memory ----------------------------------------------------------------------


def test_device_memory_on_cpu_is_not_measured() -> None:
    assert device_memory("cpu") == (None, "cpu")


def test_nvml_selector_follows_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rt._GpuMemory, "bus_id", staticmethod(lambda device_id: None))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert rt._GpuMemory.nvml_selector(0) == "3" and rt._GpuMemory.nvml_selector(1) == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8a1b")
    assert rt._GpuMemory.nvml_selector(0) == "GPU-8a1b"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert rt._GpuMemory.nvml_selector(2) == "2"
    monkeypatch.setattr(rt._GpuMemory, "bus_id", staticmethod(lambda device_id: "0000:3B:00.0"))
    assert rt._GpuMemory.nvml_selector(0) == "0000:3B:00.0"  # CUDA's own answer wins
