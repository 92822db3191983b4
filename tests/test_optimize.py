"""``inference-worker optimize``: candidates, the accuracy gate, atomic versions, flags.

Every test builds its own repository under ``tmp_path``; nothing needs Kafka.
Timing is not what these tests check, so most pass ``--min-speedup 0`` (a
loaded CI machine must not turn a correct candidate into a refusal).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from tests.modelzoo import (
    sample_feeds,
    write_cnn,
    write_iris_logreg,
    write_mlp,
    write_string_labels,
    write_two_io,
)
from worker import optimize as opt
from worker.optimize import candidates, cli, gate
from worker.repository import ModelRepository
from worker.runtime import RuntimeOptions, load_session

CPU = RuntimeOptions(device="cpu", optimized_dir=None)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _run(repo: Path, *args: str) -> int:
    return opt.main(["--model-repository", str(repo), "--target", "cpu", *args])


def _outputs(repo: ModelRepository, name: str, version: int, rows: int = 32) -> dict[str, object]:
    session = load_session(repo.resolve(name, version), CPU)
    try:
        return session.run(sample_feeds(session.signature, rows=rows, seed=5))
    finally:
        session.close()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Image-like CNN inputs in [0, 1): random weights make near-ties rare on them."""
    path = tmp_path / "images.npy"
    rng = np.random.default_rng(1)
    np.save(path, rng.random((256, 1, 28, 28), dtype=np.float32))
    return path


# -- accepted candidates ---------------------------------------------------------


@pytest.mark.parametrize(
    ("writer", "name", "flags", "atol"),
    [
        (write_mlp, "mnist-mlp", [], 1e-4),
        (write_cnn, "small-cnn", [], 1e-4),
        (write_cnn, "small-cnn", ["--int8", "--sample", "IMAGES"], 0.3),
    ],
    ids=["mlp-plain", "cnn-plain", "cnn-int8"],
)
def test_candidate_is_written_as_next_version_and_serves(
    tmp_path: Path, images: Path, capsys: pytest.CaptureFixture[str],
    writer: object, name: str, flags: list[str], atol: float,
) -> None:
    repo_dir = tmp_path / "models"
    source = writer(repo_dir, name=name)  # type: ignore[operator]
    before = _sha(source)
    flags = [str(images) if f == "IMAGES" else f for f in flags]
    repo = ModelRepository(repo_dir, rescan_s=0)  # as a running worker holds it
    assert repo.resolve(name).version == 1

    assert _run(repo_dir, "--model", name, "--min-speedup", "0", *flags) == 0

    out = capsys.readouterr().out
    assert "ACCEPTED, written as version 2" in out and "speedup" in out and "max-abs-diff" in out
    assert repo.versions(name) == [1, 2]
    # The newest version is the candidate; naming version 1 still gets the original.
    assert repo.resolve(name).path == (repo_dir / name / "2" / "model.onnx").resolve()
    assert repo.resolve(name, 1).path == source.resolve()
    assert _sha(source) == before
    got, want = _outputs(repo, name, 2), _outputs(repo, name, 1)
    for key, value in want.items():
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(value), atol=atol)
    provenance = json.loads((repo_dir / name / "2" / "optimize.json").read_text())
    assert provenance["source"] == {
        "name": name, "version": 1, "file": f"{name}/1/model.onnx", "sha256": before,
    }
    assert provenance["sha256"] == _sha(repo_dir / name / "2" / "model.onnx")
    assert provenance["mode"] == ("int8" if "--int8" in flags else "plain")
    assert provenance["outputs"][0]["ok"] is True
    assert not list((repo_dir / name).glob(".*"))  # no work directory left behind


def test_int8_candidate_quantizes_matmuls_and_keeps_conv_float(tmp_path: Path) -> None:
    write_cnn(tmp_path)
    dest = tmp_path / "int8.onnx"
    stages = opt.build_candidate(tmp_path / "small-cnn" / "1" / "model.onnx", dest, "int8", "cpu")
    ops = {n.op_type for n in onnx.load(str(dest)).graph.node}
    assert ops & {"Conv", "FusedConv"} and "ConvInteger" not in ops
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}
    assert stages[-1].startswith("onnxruntime ORT_ENABLE_EXTENDED")
    assert not list(tmp_path.glob(".scratch-*"))


def test_fp16_candidate_keeps_float32_io(tmp_path: Path) -> None:
    """The conversion itself; serving it on CUDA is test_fp16_on_cuda."""
    source = write_mlp(tmp_path)
    dest = tmp_path / "fp16.onnx"
    stages = opt.build_candidate(source, dest, "fp16", "cpu")
    model = onnx.load(str(dest))
    f32 = onnx.TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [f32]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [f32]
    types = {t.data_type for t in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types and f32 not in types
    assert stages[0] == "float16 (keep_io_types)"


def test_flat_layout_model_gets_a_version_directory(tmp_path: Path) -> None:
    write_mlp(tmp_path / "src")
    flat = tmp_path / "models" / "flat.onnx"
    flat.parent.mkdir()
    shutil.copy(tmp_path / "src" / "mnist-mlp" / "1" / "model.onnx", flat)
    before = _sha(flat)

    assert _run(flat.parent, "--model", "flat", "--min-speedup", "0") == 0

    repo = ModelRepository(flat.parent, rescan_s=0)
    assert repo.resolve("flat").path == (flat.parent / "flat" / "2" / "model.onnx").resolve()
    assert repo.resolve("flat", 1).path == flat.resolve()
    assert _sha(flat) == before


def test_zipmap_outputs_are_compared_as_scores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_iris_logreg(tmp_path)
    assert _run(tmp_path, "--model", "iris-logreg", "--min-speedup", "0", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    by_name = {o["name"]: o for o in report["outputs"]}
    assert by_name["output_probability"]["max_abs_diff"] is not None
    assert by_name["output_label"]["agreement"] == 1.0


def test_an_empty_version_directory_is_never_replaced(tmp_path: Path) -> None:
    write_mlp(tmp_path)
    (tmp_path / "mnist-mlp" / "2").mkdir()  # someone's half-made version
    assert _run(tmp_path, "--model", "mnist-mlp", "--min-speedup", "0") == 0
    assert ModelRepository(tmp_path, rescan_s=0).versions("mnist-mlp") == [1, 3]
    assert list((tmp_path / "mnist-mlp" / "2").iterdir()) == []


def test_json_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_two_io(tmp_path)
    assert _run(tmp_path, "--model", "two-io", "--min-speedup", "0", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accepted"] is True and report["version"] == 2
    assert report["source_version"] == 1 and report["mode"] == "plain"
    assert {o["name"] for o in report["outputs"]} == {"sum", "prod"}
    assert report["timing"]["speedup"] > 0 and report["timing"]["threads"] == 1


# -- refusals ----------------------------------------------------------------------


def test_gate_refuses_a_candidate_that_disagrees(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_mlp(tmp_path)
    before, tree = _sha(source), _tree(tmp_path)

    assert _run(tmp_path, "--model", "mnist-mlp", "--int8", "--tolerance", "0") == 1

    out = capsys.readouterr().out
    assert "REFUSED" in out and "refused: output probs: max abs diff" in out
    assert "speedup" in out  # the figures are printed either way
    assert _tree(tmp_path) == tree and _sha(source) == before


def test_gate_refuses_a_slower_candidate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_mlp(tmp_path)
    tree = _tree(tmp_path)
    assert _run(tmp_path, "--model", "mnist-mlp", "--min-speedup", "1000", "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["accepted"] is False and report["version"] is None
    assert report["reasons"][0].startswith("speedup")
    assert _tree(tmp_path) == tree


def test_compare_applies_tolerance_scale_and_argmax_rule() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(200, 5)) * 10
    check = gate.compare("s", scores, scores + 0.4, 0.05)  # limit 0.05 * max|scores|
    assert check.ok and check.limit == pytest.approx(0.05 * np.abs(scores).max())
    flipped = scores.copy()
    rows = np.arange(3)  # 3 of 200 rows change class: 98.5% < 99%
    top, bottom = np.argmax(scores[:3], 1), np.argmin(scores[:3], 1)
    flipped[rows, top], flipped[rows, bottom] = scores[rows, bottom], scores[rows, top]
    check = gate.compare("s", scores, flipped, 1e9)
    assert check.agreement == pytest.approx(0.985) and not check.ok
    nan = np.array([[np.nan, 1.0]])
    assert gate.compare("n", nan, nan.copy(), 0.0).ok
    assert not gate.compare("n", nan, np.array([[0.0, 1.0]]), 1.0).ok
    labels = np.arange(100)
    assert gate.compare("l", labels, labels, 0.0).agreement == 1.0
    assert not gate.compare("l", labels, np.where(labels < 2, 7, labels), 0.0).ok


# -- flags and exit codes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--model", "mnist-mlp", "--bogus"], "--bogus"),
        (["--model", "mnist-mlp", "--tolerance", "-1"], "--tolerance"),
        (["--model", "mnist-mlp", "--tolerance", "nan"], "--tolerance"),
        (["--model", "mnist-mlp", "--version", "0"], "--version"),
        (["--model", "mnist-mlp", "--rows", "x"], "--rows"),
        (["--model", "mnist-mlp", "--fp16", "--int8"], "--fp16"),
        (["--model", "mnist-mlp", "--fp16"], "--fp16"),
        (["--model", "mnist-mlp", "--target", "tpu"], "--target"),
        (["--model", "mnist-mlp", "--int8", "--target", "cuda"], "--int8"),
        (["--model", "nope"], "--model"),
        (["--model", "../etc/passwd"], "--model"),
        (["--model", "mnist-mlp", "--version", "9"], "--version"),
        (["--model", "mnist-mlp", "--sample", "missing.npy"], "--sample"),
        (["--model", "mnist-mlp", "--sample", "BAD"], "--sample"),
        (["--target", "cpu"], "--model"),
    ],
)
def test_bad_request_exits_2_with_one_line_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], flag: str
) -> None:
    write_mlp(tmp_path)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 784), dtype=np.int32))  # wrong dtype kind
    args = [str(bad) if a == "BAD" else a for a in args]
    if "--target" not in args:
        args = ["--target", "cpu", *args]
    tree = _tree(tmp_path)

    assert opt.main(["--model-repository", str(tmp_path), *args]) == 2

    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("inference-worker optimize: ")
    assert flag in err
    assert _tree(tmp_path) == tree


@pytest.mark.parametrize(
    ("changes", "field", "error"),
    [
        ({"target": "tpu"}, "target", opt.RequestError),
        ({"mode": "fp16"}, "mode", opt.ModeTargetError),
        ({"mode": "int8", "target": "cuda"}, "mode", opt.ModeTargetError),
        ({"tolerance": -1.0}, "tolerance", opt.RequestError),
        ({"model": "nope"}, "model", opt.RequestError),
        ({"version": 9}, "version", opt.RequestError),
        ({"model": "string-labels"}, "sample", opt.RequestError),
        ({"repository": Path("/nonexistent")}, "repository", opt.RequestError),
    ],
)
def test_the_api_reports_request_fields_not_flags(
    tmp_path: Path, changes: dict[str, object], field: str, error: type[Exception]
) -> None:
    """Below the CLI, a bad request names the OptimizeRequest field; only the CLI knows flags."""
    write_mlp(tmp_path)
    write_string_labels(tmp_path)
    fields: dict[str, Any] = {"repository": tmp_path, "model": "mnist-mlp", "target": "cpu"}
    request = opt.OptimizeRequest(**{**fields, **changes})
    with pytest.raises(error) as info:
        opt.optimize(request)
    assert isinstance(info.value, opt.RequestError) and info.value.field == field
    assert "--" not in str(info.value)
    assert not list((tmp_path / "mnist-mlp").glob(".*"))


def test_only_the_cli_module_raises_config_errors() -> None:
    package = Path(opt.__file__).parent
    users = sorted(p.name for p in package.glob("*.py") if "raise ConfigError" in p.read_text())
    assert users == ["cli.py"]
    assert opt.main is cli.main


def test_model_path_that_is_a_file_exits_1_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_mlp(tmp_path / "src")
    shutil.copy(source, tmp_path / "m.onnx")
    (tmp_path / "m").write_text("not a directory")
    assert _run(tmp_path, "--model", "m", "--min-speedup", "0") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("m exists and is not a directory\n")


def test_python_dash_m_runs_the_command(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "worker.optimize", "--model-repository", str(tmp_path),
         "--model", "x", "--target", "cpu", "--rows", "0"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 2
    assert done.stderr == "inference-worker optimize: --rows: must be a positive integer, got '0'\n"


def test_sample_files_npy_and_npz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_two_io(tmp_path)
    npz = tmp_path / "s.npz"
    np.savez(npz, a=np.ones((5, 3)), b=np.ones((5, 3)))  # float64: cast to the model's float32
    assert _run(tmp_path, "--model", "two-io", "--sample", str(npz), "--min-speedup", "0") == 0
    assert "s.npz, 5 rows" in capsys.readouterr().out
    npy = tmp_path / "s.npy"
    np.save(npy, np.ones((5, 3), np.float32))
    assert _run(tmp_path, "--model", "two-io", "--sample", str(npy)) == 2
    assert "use .npz" in capsys.readouterr().err


def test_cli_dispatches_optimize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from worker.cli import main

    write_mlp(tmp_path)
    argv = ["optimize", "--model-repository", str(tmp_path), "--model", "mnist-mlp"]
    assert main([*argv, "--target", "cpu", "--min-speedup", "0"]) == 0
    assert main([*argv, "--target", "cpu", "--nope"]) == 2
    assert "--nope" in capsys.readouterr().err


# -- CUDA (skipped without a usable GPU) ----------------------------------------


@pytest.mark.gpu
def test_fp16_on_cuda(tmp_path: Path, images: Path) -> None:
    write_cnn(tmp_path)
    assert opt.main([
        "--model-repository", str(tmp_path), "--model", "small-cnn", "--target", "cuda",
        "--fp16", "--sample", str(images), "--min-speedup", "0",
    ]) == 0
    session = load_session(
        ModelRepository(tmp_path).resolve("small-cnn", 2), RuntimeOptions(device="cuda:0")
    )
    assert session.signature.inputs[0].dtype == np.float32
    session.close()


# -- Memcpy nodes and TF32 (the CUDA target) --------------------------------------


def _fake_ort_optimize(memcpy_for: set[str], calls: list[str]) -> object:
    """Stands in for ONNX Runtime's offline optimizer; for targets in ``memcpy_for`` the saved
    graph gets a MemcpyToHost node, as a CUDA session writes where its partition meets CPU."""

    def fake(source: Path, dest: Path, target: str) -> None:
        calls.append(target)
        model = onnx.load(str(source))
        if target in memcpy_for:
            first = model.graph.node[0]
            copy = onnx.helper.make_node("MemcpyToHost", [first.input[0]], ["host"], name="m")
            first.input[0] = "host"
            model.graph.node.insert(0, copy)
        onnx.save(model, str(dest))

    return fake


def test_cuda_graph_with_memcpy_is_rebuilt_portable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(candidates, "optimize_graph", _fake_ort_optimize({"cuda"}, calls))
    dest = tmp_path / "c.onnx"
    stages = opt.build_candidate(write_mlp(tmp_path), dest, "plain", "cuda")
    assert calls == ["cuda", "cpu"]
    assert stages[-1].startswith("rebuilt with CPUExecutionProvider")
    assert not [n for n in onnx.load(str(dest)).graph.node if n.op_type.startswith("Memcpy")]


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_candidate_with_memcpy_is_never_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    monkeypatch.setattr(candidates, "optimize_graph", _fake_ort_optimize({"cpu", "cuda"}, []))
    with pytest.raises(opt.CandidateError, match=r"holds 1 Memcpy node\(s\) \(MemcpyToHost\(m\)\)"):
        opt.build_candidate(write_mlp(tmp_path), tmp_path / "c.onnx", "plain", target)
    # and through the command: exit 1, no version written
    monkeypatch.setattr(candidates, "optimize_graph", _fake_ort_optimize({"cpu"}, []))
    assert _run(tmp_path, "--model", "mnist-mlp", "--min-speedup", "0") == 1
    assert ModelRepository(tmp_path).versions("mnist-mlp") == [1]


def test_gate_tolerance_is_tf32_sized_on_cuda_unless_exactness_is_asked() -> None:
    from worker.runtime import TF32_TOLERANCE

    assert opt.gate_tolerance("plain", "cpu", None) == (opt.DEFAULT_TOLERANCE["plain"], True)
    assert opt.gate_tolerance("plain", "cuda", None) == (TF32_TOLERANCE, True)
    assert opt.gate_tolerance("fp16", "cuda", None) == (opt.DEFAULT_TOLERANCE["fp16"], True)
    # An explicit tolerance below TF32's error: the check runs in full fp32.
    assert opt.gate_tolerance("plain", "cuda", 1e-4) == (1e-4, False)
    assert opt.gate_tolerance("plain", "cuda", 1e-2) == (1e-2, True)
    assert opt.gate_tolerance("int8", "cpu", 1e-6) == (1e-6, True)


def test_cpu_report_has_no_tf32(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_mlp(tmp_path)
    assert _run(tmp_path, "--model", "mnist-mlp", "--min-speedup", "0", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tf32"] is None and report["tolerance"] == opt.DEFAULT_TOLERANCE["plain"]
