"""bench/gpu_check.py off the GPU: the wheel's parts (split, staged across calls,
joined, checked) and a CPU smoke run of every section of the report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def packed(tmp_path: Path) -> tuple[Path, bytes, dict]:
    wheel = tmp_path / "onnxruntime_gpu-9.9.9-cp312-cp312-manylinux_2_28_x86_64.whl"
    data = os.urandom(1000)
    wheel.write_bytes(data)
    manifest = gpu_check.pack(wheel, tmp_path / "parts", part_bytes=300)
    return tmp_path / "parts", data, manifest


def test_pack_splits_like_split_b(packed: tuple[Path, bytes, dict]) -> None:
    parts, data, manifest = packed
    names = [p["name"] for p in manifest["parts"]]
    assert [n.rsplit(".part-", 1)[1] for n in names] == ["aa", "ab", "ac", "ad"]
    assert [p["bytes"] for p in manifest["parts"]] == [300, 300, 300, 100]
    assert b"".join((parts / n).read_bytes() for n in names) == data
    assert json.loads((parts / gpu_check.MANIFEST).read_text()) == manifest


def test_a_part_and_the_repository_fit_one_device_call() -> None:
    """A device call carries at most 64 MiB: the tracked tree plus one part (and, with
    the first part, the extra wheels: about 3 MiB). 61 MiB parts did not fit."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")  # fmt: skip
    tracked = sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file())
    assert gpu_check.PART_BYTES + tracked + (4 << 20) <= 64 << 20, tracked


def _carry(parts: Path, dest: Path, name: str) -> Path:
    """What one device call sees: the manifest and one part."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    shutil.copy(parts / gpu_check.MANIFEST, dest)
    shutil.copy(parts / name, dest)
    return dest


def test_parts_gather_across_calls_then_join(
    tmp_path: Path, packed: tuple[Path, bytes, dict]
) -> None:
    parts, data, manifest = packed
    names = [p["name"] for p in manifest["parts"]]
    stage = tmp_path / "stage"
    for i, name in enumerate(names):
        report = gpu_check.stage(_carry(parts, tmp_path / "call", name), stage)
        assert report["staged"] == names[: i + 1] and report["missing"] == names[i + 1 :]
    wheel = gpu_check.assemble(stage)
    assert wheel.read_bytes() == data and wheel.name == manifest["wheel"]
    assert gpu_check.assemble(stage) == wheel  # already joined: kept


def test_a_damaged_part_is_refused(tmp_path: Path, packed: tuple[Path, bytes, dict]) -> None:
    parts, _, manifest = packed
    name = manifest["parts"][1]["name"]
    call = _carry(parts, tmp_path / "call", name)
    (call / name).write_bytes(b"x" * 300)
    with pytest.raises(RuntimeError, match=r"sha256 differs"):
        gpu_check.stage(call, tmp_path / "stage")
    assert not (tmp_path / "stage" / "parts" / name).exists()


def test_a_wrong_join_is_refused(tmp_path: Path, packed: tuple[Path, bytes, dict]) -> None:
    parts, _, manifest = packed
    stage = tmp_path / "stage"
    gpu_check.stage(parts, stage)
    m = json.loads((stage / gpu_check.MANIFEST).read_text())
    m["sha256"] = "0" * 64
    (stage / gpu_check.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(RuntimeError, match=r"do not match"):
        gpu_check.assemble(stage)
    assert not (stage / manifest["wheel"]).exists()


def test_check_waits_for_missing_parts(
    tmp_path: Path, packed: tuple[Path, bytes, dict], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parts, _, manifest = packed
    monkeypatch.setattr(gpu_check, "_cuda_ort_ready", lambda: False)
    call = _carry(parts, tmp_path / "call", manifest["parts"][0]["name"])
    rc = gpu_check.main(["--parts", str(call), "--stage", str(tmp_path / "stage")])
    out = json.loads(capsys.readouterr().out)
    assert rc == gpu_check.WAITING and out["status"] == "waiting-for-parts"
    assert len(out["missing"]) == 3


def test_cpu_smoke_run_fills_every_section(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu",
         "--budget", "240", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["ok"] and json.loads(run.stdout) == report
    for section in ("environment", "probe", "zoo", "compute_path", "first_call", "eviction"):
        assert "error" not in report[section] and "skipped" not in report[section], section
    assert report["zoo"]["checked"] >= 12 and report["zoo"]["rows"] == 8
    assert [r["rows"] for r in report["compute_path"]["results"]] == [1, 2]
    assert [s["loaded"] for s in report["eviction"]["steps"]] == list("abca")
    assert [g["goal"][:6] for g in report["goals"]] == ["worker", "evicti"]


def test_carried_extra_wheels_are_staged_for_the_install(
    tmp_path: Path, packed: tuple[Path, bytes, dict]
) -> None:
    parts, _, manifest = packed
    call = _carry(parts, tmp_path / "call", manifest["parts"][0]["name"])
    (call / gpu_check.EXTRA).mkdir()
    (call / gpu_check.EXTRA / "orjson-1-cp312-none-any.whl").write_bytes(b"wheel")
    stage = tmp_path / "stage"
    gpu_check.stage(call, stage)
    gpu_check.stage(_carry(parts, call, manifest["parts"][1]["name"]), stage)  # without it
    assert [p.name for p in (stage / gpu_check.EXTRA).iterdir()] == ["orjson-1-cp312-none-any.whl"]
