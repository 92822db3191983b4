"""Per-model settings: config.pbtxt and model.toml parsing, every refusal, version policies,
the repository re-reading them, the batcher and the session cache applying them."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.modelzoo import write_iris_logreg, write_mlp
from worker.batching import Batcher, Job, RunMode, run_batch
from worker.cache import SessionCache
from worker.errors import ModelLoadError, ModelNotFound
from worker.model_config import (
    ModelSettings,
    TensorDecl,
    VersionPolicy,
    check_signature,
    parse_config_pbtxt,
    parse_model_toml,
)
from worker.repository import ModelRepository
from worker.runtime import RuntimeOptions, load_session
from worker.signature import Signature, TensorSpec

FULL_PBTXT = """
name: "m"
platform: "onnxruntime_onnx"
max_batch_size: 32
input [ { name: "x" data_type: TYPE_FP32 dims: [ 784 ] } ]
output [ { name: "probs" data_type: TYPE_FP32 dims: [ 10 ] } ]
dynamic_batching {
  max_queue_delay_microseconds: 2500
  preferred_batch_size: [ 8, 16 ]
}
instance_group [ { count: 3 kind: KIND_GPU gpus: [ 1 ] } ]
version_policy: { latest: { num_versions: 2 } }
"""


def _pbtxt(text: str, name: str = "m") -> ModelSettings:
    return parse_config_pbtxt(text, name, f"{name}/config.pbtxt")


def test_config_pbtxt_every_key() -> None:
    s = _pbtxt(FULL_PBTXT)
    assert s.source == "m/config.pbtxt"
    assert s.max_batch_rows == 32
    assert s.max_batch_delay_s == pytest.approx(0.0025)
    assert s.batch_axis and s.coalesce
    assert s.preferred_batch_rows == (8, 16)
    assert s.instances == 3
    assert s.device == "cuda:1"
    assert s.versions == VersionPolicy("latest", 2)
    assert s.inputs == (TensorDecl("x", "FP32", (784,)),)
    assert s.outputs == (TensorDecl("probs", "FP32", (10,)),)


def test_config_pbtxt_defaults_as_triton() -> None:
    s = _pbtxt('backend: "onnxruntime"\nmax_batch_size: 4\n')
    assert s.max_batch_rows == 4
    assert not s.coalesce  # no dynamic_batching: Triton runs requests as they come
    assert s.versions == VersionPolicy("latest", 1)  # Triton's default policy
    assert s.instances is None and s.device is None
    cpu = _pbtxt('platform: "onnxruntime_onnx"\ninstance_group [{ count: 2 kind: KIND_CPU }]')
    assert (cpu.instances, cpu.device) == (2, "cpu")
    gpu = _pbtxt('platform: "onnxruntime_onnx"\ninstance_group [{ kind: KIND_GPU }]')
    assert (gpu.instances, gpu.device) == (None, "cuda")


def test_max_batch_size_zero_means_no_batch_axis() -> None:
    s = _pbtxt('platform: "onnxruntime_onnx"\nmax_batch_size: 0\ndynamic_batching { }')
    assert not s.batch_axis and not s.coalesce
    assert s.max_batch_rows is None


@pytest.mark.parametrize(
    ("policy", "want", "served"),
    [
        ("{ all: {} }", VersionPolicy("all"), {1, 2, 5}),
        ("{ latest: { num_versions: 2 } }", VersionPolicy("latest", 2), {2, 5}),
        ("{ specific: { versions: [1, 5, 9] } }", VersionPolicy("specific", 1, (1, 5, 9)), {1, 5}),
    ],
)
def test_version_policies(policy: str, want: VersionPolicy, served: set[int]) -> None:
    s = _pbtxt(f'platform: "onnxruntime_onnx"\nversion_policy: {policy}')
    assert s.versions == want
    assert s.versions.select([1, 2, 5]) == served


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('platform: "tensorflow_savedmodel"', "ONNX models only"),
        ('backend: "python"', "ONNX models only"),
        ('platform: "ensemble"\nensemble_scheduling { step [] }', "ONNX models only"),
        ("ensemble_scheduling { step [] }", "ensembles are not supported"),
        ("sequence_batching { }", "sequence_batching is not supported"),
        ("model_transaction_policy { decoupled: true }", "decoupled"),
        ('name: "other"', "differs from its directory"),
        ('default_model_filename: "net.onnx"', "default_model_filename"),
        ('batch_input [{ kind: BATCH_ELEMENT_COUNT target_name: "n" }]', "batch_input"),
        ('input [{ name: "x" allow_ragged_batch: true }]', "allow_ragged_batch"),
        ('input [{ name: "s" is_shape_tensor: true }]', "is_shape_tensor"),
        ("instance_group [{ count: 1 }, { count: 2 }]", "2 instance_group entries"),
        ("instance_group [{ kind: KIND_MODEL }]", "KIND_MODEL is not supported"),
        ("instance_group [{ kind: KIND_GPU gpus: [0, 1] }]", "one GPU per model"),
        ("max_batch_size: -1", "max_batch_size must be >= 0"),
        (
            "max_batch_size: 8\ndynamic_batching { preferred_batch_size: [16] }",
            r"16 is outside 1..max_batch_size \(8\)",
        ),
        ("version_policy: { specific: { versions: [0] } }", "positive versions"),
        ("version_policy: { latest: { num_versions: 0 } }", "at least 1"),
        ("max_batch_size: eight", "not a valid Triton model configuration"),
        ("no_such_field: 1", "not a valid Triton model configuration"),
    ],
)
def test_config_pbtxt_refusals(text: str, says: str) -> None:
    with pytest.raises(ModelLoadError, match=says) as info:
        _pbtxt(text)
    assert info.value.error_type == "model-load-error"
    assert "m/config.pbtxt" in info.value.message


def test_config_pbtxt_without_the_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tritonclient", None)  # as if not installed
    with pytest.raises(ModelLoadError, match=r"inference-worker\[triton\]"):
        _pbtxt("max_batch_size: 4")


def test_model_toml_every_key() -> None:
    s = parse_model_toml(
        'max_batch_rows = 64\nmax_batch_delay_ms = 2.5\ninstances = 2\ndevice = "cuda:1"\n'
        "versions = { latest = 2 }\n",
        "m/model.toml",
    )
    assert (s.max_batch_rows, s.max_batch_delay_s, s.instances, s.device) == (
        64, 0.0025, 2, "cuda:1"
    )  # fmt: skip
    assert s.batch_axis and s.coalesce
    assert s.versions == VersionPolicy("latest", 2)
    assert parse_model_toml("", "m/model.toml").versions == VersionPolicy("all")
    assert parse_model_toml("versions = [3, 1]", "w").versions == VersionPolicy(
        "specific", 1, (1, 3)
    )
    assert parse_model_toml('device = "auto"', "w").device is None
    alone = parse_model_toml("max_batch_rows = 0", "w")
    assert not alone.batch_axis and alone.max_batch_rows is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("max_batch_size = 4", "unknown key 'max_batch_size'"),
        ("max_batch_rows = -1", "max_batch_rows must be an integer >= 0"),
        ("max_batch_rows = true", "max_batch_rows must be an integer >= 0"),
        ('max_batch_delay_ms = "5"', "max_batch_delay_ms must be a number >= 0"),
        ("instances = 0", "instances must be an integer >= 1"),
        ('device = "tpu"', "device must be auto, cpu, cuda or cuda:N"),
        ('device = "cpu:1"', "device must be auto, cpu, cuda or cuda:N"),
        ('versions = "newest"', "versions must be"),
        ("versions = []", "versions must be"),
        ("versions = [0]", "versions must be"),
        ("versions = { latest = 0 }", "versions must be"),
        ("versions = { oldest = 1 }", "versions must be"),
        ("max_batch_rows = ", "not valid TOML"),
    ],
)
def test_model_toml_refusals(text: str, says: str) -> None:
    with pytest.raises(ModelLoadError, match=says) as info:
        parse_model_toml(text, "m/model.toml")
    assert "m/model.toml" in info.value.message


# -- declarations against the ONNX file ----------------------------------------------


def _sig(*inputs: TensorSpec) -> Signature:
    return Signature(inputs=inputs, outputs=())


def _spec(name: str, dtype: str, shape: tuple[int | None, ...] | None) -> TensorSpec:
    return TensorSpec(name, f"tensor({dtype})", np.dtype(dtype), shape)


def test_check_signature_accepts_what_matches() -> None:
    declared = ModelSettings(source="m/config.pbtxt", inputs=(TensorDecl("x", "FP32", (-1, 4)),))
    check_signature(declared, _sig(_spec("x", "float32", (None, 7, 4))), "m:1")
    check_signature(declared, _sig(_spec("x", "float32", (None, None, 4))), "m:1")
    no_axis = ModelSettings(
        source="m/config.pbtxt", batch_axis=False, inputs=(TensorDecl("x", "FP32", (2, 4)),)
    )
    check_signature(no_axis, _sig(_spec("x", "float32", (2, 4))), "m:1")


@pytest.mark.parametrize(
    ("decl", "spec", "says"),
    [
        (TensorDecl("x", "INT64", (4,)), _spec("x", "float32", (None, 4)), "data types differ"),
        (TensorDecl("x", "FP32", (4,)), _spec("x", "float32", (None, 2, 4)), "ranks differ"),
        (TensorDecl("x", "FP32", (5,)), _spec("x", "float32", (None, 4)), "dimensions differ"),
        (TensorDecl("x", "FP32", (4,)), _spec("x", "float32", (8, 4)), "not a batch axis"),
        (TensorDecl("y", "FP32", (4,)), _spec("x", "float32", (None, 4)), "inputs are x"),
    ],
)
def test_check_signature_names_both_sides(decl: TensorDecl, spec: TensorSpec, says: str) -> None:
    declared = ModelSettings(source="m/config.pbtxt", inputs=(decl,))
    with pytest.raises(ModelLoadError, match=says) as info:
        check_signature(declared, _sig(spec), "m:1")
    message = info.value.message
    assert "m/config.pbtxt" in message and "ONNX file" in message
    if "differ" in says or "axis" in says:
        assert f"{decl.data_type}{list(decl.dims)}" in message  # the config's side
        assert "FP32[" in message or "INT64[" in message  # the file's side


# -- the repository ------------------------------------------------------------------


def _versions(root: Path, name: str, *versions: int) -> None:
    for v in versions:
        (root / name / str(v)).mkdir(parents=True, exist_ok=True)
        (root / name / str(v) / "model.onnx").write_bytes(b"onnx?")


def test_repository_applies_the_version_policy(tmp_path: Path) -> None:
    _versions(tmp_path, "m", 1, 2, 3)
    (tmp_path / "m" / "config.pbtxt").write_text(
        'platform: "onnxruntime_onnx"\nversion_policy: { specific: { versions: [1, 2] } }\n'
    )
    repo = ModelRepository(tmp_path)
    assert repo.resolve("m").version == 2  # newest within the policy
    assert repo.resolve("m", 1).settings.versions.kind == "specific"
    with pytest.raises(ModelNotFound, match=r"version 3 is not served.*specific 1, 2"):
        repo.resolve("m", 3)
    with pytest.raises(ModelNotFound, match="no version 7"):
        repo.resolve("m", 7)
    assert repo.versions("m") == [1, 2, 3]
    assert repo.served_versions("m") == [1, 2]


def test_repository_without_a_file_serves_every_version(tmp_path: Path) -> None:
    _versions(tmp_path, "m", 1, 2)
    repo = ModelRepository(tmp_path)
    assert repo.resolve("m", 1).settings == ModelSettings()
    assert repo.served_versions("m") == [1, 2]


def test_repository_latest_policy_follows_new_versions(tmp_path: Path) -> None:
    _versions(tmp_path, "m", 1, 2)
    (tmp_path / "m" / "model.toml").write_text("versions = { latest = 1 }\n")
    repo = ModelRepository(tmp_path, rescan_s=0)
    with pytest.raises(ModelNotFound, match="not served"):
        repo.resolve("m", 1)
    _versions(tmp_path, "m", 3)
    assert repo.resolve("m").version == 3
    with pytest.raises(ModelNotFound, match="not served"):
        repo.resolve("m", 2)


def test_config_pbtxt_wins_over_model_toml_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _versions(tmp_path, "m", 1)
    (tmp_path / "m" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\nmax_batch_size: 8')
    (tmp_path / "m" / "model.toml").write_text("max_batch_rows = 99\n")
    with caplog.at_level(logging.INFO, logger="worker.repository"):
        s = ModelRepository(tmp_path).settings("m")
    assert s.max_batch_rows == 8 and s.source == "m/config.pbtxt"
    assert "config.pbtxt wins" in caplog.text


def test_settings_are_read_again_when_the_file_changes(tmp_path: Path) -> None:
    _versions(tmp_path, "m", 1)
    toml = tmp_path / "m" / "model.toml"
    toml.write_text("max_batch_rows = 4\n")
    repo = ModelRepository(tmp_path, rescan_s=0.2)
    assert repo.settings("m").max_batch_rows == 4
    toml.write_text("max_batch_rows = 512\n")
    assert repo.settings("m").max_batch_rows == 4  # until the next rescan
    time.sleep(0.25)
    assert repo.settings("m").max_batch_rows == 512
    toml.write_text("max_batch_rows = 'many'\n")
    time.sleep(0.25)
    with pytest.raises(ModelLoadError, match="max_batch_rows"):
        repo.resolve("m")
    toml.unlink()
    time.sleep(0.25)
    assert repo.settings("m") == ModelSettings()  # back to the flags


def test_a_bad_name_never_reads_a_settings_file(tmp_path: Path) -> None:
    (tmp_path / "config.pbtxt").write_text("max_batch_size: nonsense")
    repo = ModelRepository(tmp_path)
    for bad in ("..", "../x", "", "a/b"):
        with pytest.raises(ModelNotFound, match="invalid model name"):
            repo.settings(bad)


# -- the batcher ---------------------------------------------------------------------


def _job(model: str, rows: int = 1, arrived: float = 0.0) -> Job:
    x = np.zeros((rows, 3), np.float32)
    return Job(None, model, 1, RunMode.COALESCE, {"x": x}, rows, arrived=arrived)


def _batcher(per_model: dict[str, ModelSettings]) -> Batcher:
    return Batcher(100, 0.005, settings_for=lambda m: per_model.get(m, ModelSettings()))


def test_batcher_takes_each_models_rows_and_delay() -> None:
    b = _batcher({"small": ModelSettings(max_batch_rows=2, max_batch_delay_s=1.0)})
    assert b.add(_job("small")) == []
    full = b.add(_job("small"))
    assert [len(x.jobs) for x in full] == [2] and full[0].max_rows == 2
    for _ in range(5):
        assert b.add(_job("big")) == []  # the flags: 100 rows
    b.add(_job("small", arrived=0.0))
    # "big" waits the flags' 5 ms, "small" its own second
    assert [x.model for x in b.due(now=0.01)] == ["big"]
    assert b.next_deadline() == pytest.approx(1.0)
    assert [x.model for x in b.due(now=1.0)] == ["small"]


def test_batcher_runs_a_model_without_batch_axis_alone() -> None:
    b = _batcher({"m": ModelSettings(batch_axis=False)})
    jobs = [_job("m") for _ in range(3)]
    batches = [batch for j in jobs for batch in b.add(j)]
    assert [len(x.jobs) for x in batches] == [1, 1, 1]
    assert all(j.mode == RunMode.WHOLE for j in jobs)
    assert len(b) == 0


def test_batcher_without_coalescing_slices_at_the_models_rows() -> None:
    b = _batcher({"m": ModelSettings(max_batch_rows=4, coalesce=False)})
    (batch,) = b.add(_job("m", rows=10))
    assert batch.max_rows == 4
    assert b.add(_job("m")) != []  # never held back to wait for company
    runs: list[int] = []
    run_batch(lambda f: {"y": f["x"]}, batch, 1000, on_run=runs.append)
    assert runs == [4, 4, 2]


def test_batcher_runs_a_preferred_size_at_once() -> None:
    b = _batcher({"m": ModelSettings(max_batch_rows=16, preferred_batch_rows=(3,))})
    assert b.add(_job("m")) == [] and b.add(_job("m")) == []
    (batch,) = b.add(_job("m"))
    assert batch.rows == 3


# -- sessions: device, instances, declarations, reload on change ---------------------


def _options() -> RuntimeOptions:
    return RuntimeOptions(device="cpu", warmup=False)


def test_load_checks_the_declared_io(tmp_path: Path) -> None:
    write_mlp(tmp_path, "m")
    (tmp_path / "m" / "config.pbtxt").write_text(
        'platform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        'input [{ name: "x" data_type: TYPE_FP32 dims: [ 784 ] }]\n'
        'output [{ name: "probs" data_type: TYPE_INT64 dims: [ 10 ] }]\n'
    )
    ref = ModelRepository(tmp_path).resolve("m")
    with pytest.raises(ModelLoadError, match=r"output 'probs'.*INT64\[10\].*FP32\["):
        load_session(ref, _options())


def test_load_refuses_an_unusable_device(tmp_path: Path) -> None:
    write_mlp(tmp_path, "m")
    (tmp_path / "m" / "model.toml").write_text('device = "cuda:7"\n')
    ref = ModelRepository(tmp_path).resolve("m")
    with pytest.raises(ModelLoadError, match=r"m:1: device \(m/model.toml\)"):
        load_session(ref, _options())


def test_instances_bound_the_runs_at_once(tmp_path: Path) -> None:
    write_mlp(tmp_path, "m")
    (tmp_path / "m" / "model.toml").write_text('instances = 1\ndevice = "cpu"\n')
    session = load_session(ModelRepository(tmp_path).resolve("m"), _options())
    assert session.instances == 1
    feeds = {"x": np.zeros((1, 784), np.float32)}
    done = threading.Event()
    slot = session._instances
    assert slot is not None
    slot.acquire()  # the one instance is busy
    thread = threading.Thread(target=lambda: (session.run(feeds), done.set()))
    thread.start()
    assert not done.wait(0.3)  # a second run waits for it
    slot.release()
    assert done.wait(10)
    thread.join()


def test_cache_reloads_a_session_when_its_settings_change(tmp_path: Path) -> None:
    write_mlp(tmp_path, "m")
    toml = tmp_path / "m" / "model.toml"
    toml.write_text("instances = 1\n")
    cache = SessionCache(
        ModelRepository(tmp_path, rescan_s=0), lambda ref: load_session(ref, _options())
    )
    with cache.acquire("m") as first:
        assert first.instances == 1
    with cache.acquire("m") as same:
        assert same is first  # nothing changed: a hit
    toml.write_text("instances = 2\nmax_batch_rows = 8\n")
    with cache.acquire("m") as second:
        assert second is not first and second.instances == 2
    assert first.providers == []  # closed
    toml.write_text("instances = 2\nmax_batch_rows = 16\n")  # batching only: same session
    with cache.acquire("m") as third:
        assert third is second
    cache.close()


def test_iris_declared_as_triton_documents_it_loads(tmp_path: Path) -> None:
    write_iris_logreg(tmp_path, "iris")
    (tmp_path / "iris" / "config.pbtxt").write_text(
        'name: "iris"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 16\n'
        'input [{ name: "float_input" data_type: TYPE_FP32 dims: [ 4 ] }]\n'
        'output [{ name: "output_label" data_type: TYPE_INT64 dims: [ 1 ]\n'
        "          reshape: { shape: [ ] } }]\n"
    )
    session = load_session(ModelRepository(tmp_path).resolve("iris"), _options())
    assert session.ref.settings.max_batch_rows == 16


def test_cuda_warms_up_at_the_models_own_largest_batch() -> None:
    from worker.runtime import _warmup_rows

    flags = RuntimeOptions(device="cpu", warmup_max_rows=1024)
    assert _warmup_rows("cuda:0", ModelSettings(), flags) == 1024
    assert _warmup_rows("cuda:0", ModelSettings(max_batch_rows=32), flags) == 32
    assert _warmup_rows("cuda:0", ModelSettings(batch_axis=False), flags) is None
    assert _warmup_rows("cpu", ModelSettings(max_batch_rows=32), flags) is None
