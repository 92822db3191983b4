"""The dependency locks (requirements/*.lock) and the one Kafka version, offline.

CI installs from requirements/dev-cpu.lock and the images from cpu.lock/gpu.lock,
so a lock that pyproject.toml has outgrown fails here, naming `make lock`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _lock_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lock_script", ROOT / "scripts" / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


lock = _lock_module()
LOCK_PARAMS = [pytest.param(x, id=x.name) for x in lock.LOCKS]


def _pins(path: Path) -> dict[str, set[str]]:
    """``{name: {version, ...}}``: a universal lock pins one version per Python range."""
    pins: dict[str, set[str]] = defaultdict(set)
    for line in path.read_text().splitlines():
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()].add(match.group(2))
    return pins


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib reads pyproject.toml")
@pytest.mark.parametrize("entry", LOCK_PARAMS)
def test_lock_was_made_from_todays_pyproject(entry: Any) -> None:
    problem = lock.check(entry)
    assert problem is None, f"{problem}; run `make lock` and commit requirements/"


@pytest.mark.parametrize("entry", LOCK_PARAMS)
def test_a_venv_gets_one_onnxruntime(entry: Any) -> None:
    pins = _pins(entry.path)
    if entry.device == "cpu":
        assert "onnxruntime" in pins and "onnxruntime-gpu" not in pins
    else:
        assert "onnxruntime-gpu" in pins and "onnxruntime" not in pins


@pytest.mark.parametrize("entry", LOCK_PARAMS)
def test_every_file_is_hashed(entry: Any) -> None:
    # pip checks hashes only when every requirement has one (hash-checking mode).
    text = entry.path.read_text()
    requirements = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 3)[3])
    unhashed = [r.split()[0] for r in requirements if r.strip() and "--hash=sha256:" not in r]
    assert not unhashed


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_tests_run_the_versions_the_image_ships(device: str) -> None:
    image = _pins(ROOT / "requirements" / f"{device}.lock")
    dev = _pins(ROOT / "requirements" / f"dev-{device}.lock")
    differ = {
        name: (versions, dev.get(name))
        for name, versions in image.items()
        if dev.get(name) != versions
    }
    assert not differ


def test_gpu_lock_pins_the_dockerfiles_onnxruntime_gpu() -> None:
    wanted = re.search(
        r"^ARG ONNXRUNTIME_GPU_VERSION=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M
    )
    assert wanted
    for name in ("gpu", "dev-gpu"):
        assert _pins(ROOT / "requirements" / f"{name}.lock")["onnxruntime-gpu"] == {wanted[1]}


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib reads pyproject.toml")
def test_a_stale_lock_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "requirements" / "cpu.lock").read_text()
    monkeypatch.setattr(lock, "REQUIREMENTS", tmp_path)
    (tmp_path / "cpu.lock").write_text(text)
    assert lock.check(lock.LOCKS[0]) is None
    (tmp_path / "cpu.lock").write_text(re.sub(r"(# inputs-sha256: )\w+", r"\g<1>" + "0" * 64, text))
    problem = lock.check(lock.LOCKS[0])
    assert problem is not None and "other dependencies than pyproject.toml's" in problem


# ---------------------------------------------------------------- the Kafka version


def _compose() -> dict[str, object]:
    loaded = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_compose_names_the_kafka_image_once() -> None:
    compose = _compose()
    image = compose["x-kafka-image"]
    assert isinstance(image, str) and re.fullmatch(r"apache/kafka:4\.\d+\.\d+", image)
    services = compose["services"]
    assert isinstance(services, dict)
    assert services["kafka"]["image"] == services["topics"]["image"] == image
    # No other tracked file pins an apache/kafka image tag.
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    others = [
        f
        for f in tracked
        if f not in ("docker-compose.yml", "scripts/kafka-local", "tests/test_locks.py")
        and (ROOT / f).is_file()
        and re.search(r"apache/kafka:\d", (ROOT / f).read_text(errors="replace"))
    ]
    assert not others


def test_kafka_local_takes_its_version_from_compose(tmp_path: Path) -> None:
    # A copy of the script beside a compose file naming another version, its jars
    # "cached": the script must find them, and with no mvn, curl or wget on PATH
    # it fails at once if it looks for any other version.
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "kafka-local"
    shutil.copy2(ROOT / "scripts" / "kafka-local", script)
    (tmp_path / "docker-compose.yml").write_text(
        "x-kafka-image: &kafka-image apache/kafka:9.8.7\nservices: {}\n"
    )
    jars = tmp_path / "state" / "jars" / "9.8.7"
    jars.mkdir(parents=True)
    (jars / "kafka_2.13-9.8.7.jar").write_bytes(b"")
    (jars / ".complete").write_bytes(b"")
    tools = tmp_path / "bin"
    tools.mkdir()
    for directory in ("/usr/bin", "/bin"):
        for tool in Path(directory).iterdir():
            if tool.name not in ("mvn", "curl", "wget") and not (tools / tool.name).exists():
                (tools / tool.name).symlink_to(tool)
    env = {**os.environ, "PATH": str(tools), "KAFKA_LOCAL_DIR": str(tmp_path / "state")}
    env.pop("KAFKA_HOME", None)
    out = subprocess.run(
        [str(script), "fetch"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert f"jars ready in {jars}" in out.stderr

    (tmp_path / "docker-compose.yml").write_text("services: {}\n")
    out = subprocess.run(
        [str(script), "fetch"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 2 and "x-kafka-image" in out.stderr
