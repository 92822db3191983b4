#!/usr/bin/env python3
"""The dependency locks in requirements/: made from pyproject.toml, checked by ``make install``.

    scripts/lock.py compile [--upgrade]   rewrite every lock (``make lock``; needs uv and PyPI)
    scripts/lock.py check LOCK            exit 0 if LOCK was made from today's pyproject.toml
    scripts/lock.py extras LOCK           the extras LOCK holds, comma-separated

Each lock is a plain pip requirements file with a hash for every file, so
``pip install -r requirements/<lock>`` installs it on a fresh machine with no
other tool (hash-checking mode). uv compiles them (``uv pip compile --universal``:
one file for every Python the lock supports; the markers pick the versions).

    cpu.lock       the worker's dependencies + onnxruntime        (CPU image)
    gpu.lock       the worker's dependencies + onnxruntime-gpu    (GPU image)
    dev-cpu.lock   cpu.lock's pins + the test, dev, plot and otel extras (make install, CI)
    dev-gpu.lock   gpu.lock's pins + the test, dev, plot and otel extras (make install on a GPU)

The dev locks are compiled under the image locks as constraints, so the tests
run the versions the images ship. Every lock also pins pyproject.toml's build
requirements, so the project itself installs with ``--no-build-isolation``.
onnxruntime-gpu is pinned to the Dockerfile's ``ONNXRUNTIME_GPU_VERSION``: the
CUDA base image is chosen for that version, and the GPU build checks the pair.

A lock's second line is a digest of what it was made from (requires-python, the
dependencies, its extras, the build requirements, the onnxruntime-gpu pin): when
pyproject.toml changes them, ``check`` fails and ``make install`` says to run
``make lock`` (and installs from pyproject.toml meanwhile).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LOCKS", "Lock", "check", "compile_all", "digest", "main"]

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
DOCKERFILE = ROOT / "Dockerfile"
REQUIREMENTS = ROOT / "requirements"
DIGEST_PREFIX = "# inputs-sha256: "
DEV_EXTRAS = ("test", "dev", "plot", "otel")
# Both wheels install the module `onnxruntime` and overwrite each other's files.
ORT = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}


@dataclass(frozen=True)
class Lock:
    name: str
    device: str  # "cpu" or "gpu": which onnxruntime wheel it holds
    extras: tuple[str, ...]
    python: str  # the oldest Python it resolves for
    constraints: str | None = None  # another lock whose pins it keeps

    @property
    def path(self) -> Path:
        return REQUIREMENTS / f"{self.name}.lock"


LOCKS = (
    Lock("cpu", "cpu", ("cpu",), "3.10"),
    # onnxruntime-gpu 1.31 needs Python 3.11+.
    Lock("gpu", "gpu", ("gpu",), "3.11"),
    Lock("dev-cpu", "cpu", ("cpu", *DEV_EXTRAS), "3.10", constraints="cpu"),
    Lock("dev-gpu", "gpu", ("gpu", *DEV_EXTRAS), "3.11", constraints="gpu"),
)


def _pyproject() -> dict[str, Any]:
    import tomllib  # Python 3.11+; `check` on 3.10 is handled in main()

    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)


def _ort_gpu_version() -> str:
    match = re.search(r"^ARG ONNXRUNTIME_GPU_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M)
    if match is None:
        raise SystemExit("lock: no `ARG ONNXRUNTIME_GPU_VERSION=` in the Dockerfile")
    return match.group(1)


def digest(lock: Lock) -> str:
    """sha256 of everything in pyproject.toml (and the Dockerfile) that ``lock`` is made from."""
    data = _pyproject()
    project = data["project"]
    optional = project.get("optional-dependencies", {})
    missing = [e for e in lock.extras if e not in optional]
    if missing:
        raise SystemExit(f"lock: pyproject.toml has no extra {missing} ({lock.name}.lock)")
    inputs = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "extras": {e: optional[e] for e in lock.extras},
        "build": data.get("build-system", {}).get("requires", []),
        "onnxruntime-gpu": _ort_gpu_version() if lock.device == "gpu" else None,
        "python": lock.python,
        "constraints": lock.constraints,
    }
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _pinned(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==", line)
        if match:
            names.add(re.sub(r"[-_.]+", "-", match.group(1)).lower())
    return names


def _recorded_digest(path: Path) -> str | None:
    for line in path.read_text().splitlines()[:5]:
        if line.startswith(DIGEST_PREFIX):
            return line[len(DIGEST_PREFIX) :].split()[0]
    return None


def _wrong_onnxruntime(lock: Lock, path: Path) -> str | None:
    """Why ``path`` would put the other onnxruntime wheel in the venv, or None."""
    pinned = _pinned(path)
    other = ORT["gpu" if lock.device == "cpu" else "cpu"]
    if other in pinned:
        return f"{path.name} pins {other}: a {lock.device} venv must hold only {ORT[lock.device]}"
    if ORT[lock.device] not in pinned:
        return f"{path.name} does not pin {ORT[lock.device]}"
    return None


def check(lock: Lock) -> str | None:
    """Why ``lock`` cannot be installed as it is, or None when it is current."""
    shown = lock.path.relative_to(ROOT) if lock.path.is_relative_to(ROOT) else lock.path
    if not lock.path.exists():
        return f"{shown} is missing"
    if _recorded_digest(lock.path) != digest(lock):
        return f"{shown} was made from other dependencies than pyproject.toml's"
    return _wrong_onnxruntime(lock, lock.path)


def _uv() -> str:
    found = shutil.which("uv") or shutil.which("uv", path=str(Path(sys.executable).parent))
    if found is None:
        raise SystemExit("lock: uv not found (pip install uv)")
    return found


def _compile(lock: Lock, uv: str, upgrade: bool) -> None:
    data = _pyproject()
    with tempfile.TemporaryDirectory() as tmp:
        build = Path(tmp) / "pyproject-build-system-requires.txt"
        build.write_text("\n".join(data.get("build-system", {}).get("requires", [])) + "\n")
        command = [
            uv, "pip", "compile", "--quiet", "--universal", "--generate-hashes",
            "--python-version", lock.python,
            "--custom-compile-command", "make lock",
            "--output-file", str(lock.path),
            str(PYPROJECT), str(build),
        ]  # fmt: skip
        for extra in lock.extras:
            command += ["--extra", extra]
        if lock.device == "gpu":
            pin = Path(tmp) / "dockerfile-onnxruntime-gpu-version.txt"
            pin.write_text(f"onnxruntime-gpu=={_ort_gpu_version()}\n")
            command += ["--constraint", str(pin)]
        if lock.constraints is not None:
            command += ["--constraint", str(REQUIREMENTS / f"{lock.constraints}.lock")]
        if upgrade:
            command.append("--upgrade")
        # Paths in uv's header relative to the repository, whoever runs it.
        subprocess.run(command, check=True, cwd=ROOT)
    text = lock.path.read_text()
    text = text.replace(str(ROOT) + "/", "").replace(tmp + "/", "")
    # After uv's two-line header ("autogenerated by uv via: make lock").
    lines = text.splitlines(keepends=True)
    lines.insert(2, f"{DIGEST_PREFIX}{digest(lock)} (scripts/lock.py check compares it)\n")
    lock.path.write_text("".join(lines))
    problem = _wrong_onnxruntime(lock, lock.path)
    if problem:
        raise SystemExit(f"lock: {problem}")


def compile_all(upgrade: bool = False) -> None:
    """Rewrite every lock; existing pins are kept where still allowed unless ``upgrade``."""
    uv = _uv()
    REQUIREMENTS.mkdir(exist_ok=True)
    for lock in LOCKS:  # image locks first: the dev locks are constrained by them
        _compile(lock, uv, upgrade)
        print(f"lock: wrote {lock.path.relative_to(ROOT)}", file=sys.stderr)


def _lock_named(arg: str) -> Lock:
    name = Path(arg).name.removesuffix(".lock")
    for lock in LOCKS:
        if lock.name == name:
            return lock
    raise SystemExit(f"lock: no lock named {arg!r} (one of {', '.join(x.name for x in LOCKS)})")


def main(argv: list[str]) -> int:
    usage = "usage: scripts/lock.py compile [--upgrade] | check LOCK | extras LOCK"
    if argv[:1] == ["compile"] and set(argv[1:]) <= {"--upgrade"}:
        compile_all(upgrade="--upgrade" in argv)
        return 0
    if len(argv) != 2 or argv[0] not in ("check", "extras"):
        print(usage, file=sys.stderr)
        return 2
    lock = _lock_named(argv[1])
    if argv[0] == "extras":
        print(",".join(lock.extras))
        return 0
    if sys.version_info < (3, 11):  # no tomllib to read pyproject.toml: trust the lock
        return 0
    problem = check(lock)
    if problem:
        print(f"lock: {problem}; run `make lock`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
