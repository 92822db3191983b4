"""The one-command device check: ``make gpu-check`` on a fresh GPU machine.

Such a machine has an NVIDIA GPU and the CUDA 13 libraries (the ``nvidia-*``
wheels) but no package registry, and takes at most 64 MiB of files per call,
while the onnxruntime-gpu wheel is about 250 MB. So the wheel travels in
parts:

    # here, once (downloads the wheel, splits it into 50 MiB parts + MANIFEST.json,
    # and fetches the small wheels the machine's image lacks into extra/):
    .venv/bin/python bench/gpu_check.py pack
    # there, one call per part, back to back (the machine keeps /tmp while warm):
    make gpu-check        # carrying MANIFEST.json and the next part each time
                          # (and extra/ with the first: pack prints each call's carry)

The image (seen on an H100 on 2026-12-06) has numpy, pyarrow, msgpack, onnx
and scikit-learn but not ``orjson`` and ``pysimdjson`` (``worker.protocol``
imports both) nor ``skl2onnx`` (the scikit-learn test models): those are the
``EXTRA_WHEELS``, installed beside onnxruntime-gpu.

Each call copies the parts it carries into ``/tmp/gpu-check/parts`` (each
checked against the manifest's sha256) and says which are still missing
(exit 3). With all of them there it joins them, checks the wheel's sha256,
``pip install --no-deps --no-index --target`` it, and runs the check in a
child process that finds the CUDA libraries of the machine's ``nvidia-*``
wheels. Within 8 minutes it prints one JSON object:

- ``probe``: :func:`worker.runtime.cuda_probe` (a Conv and a MatMul on CUDA);
- ``zoo``: every test model (``tests/modelzoo.py``) on CUDA vs CPU at 64 rows,
  TF32 on (TF32-sized limit) and off (fp32 limit);
- ``compute_path``: the worker's decode -> batch -> run (I/O binding) ->
  encode vs raw ONNX Runtime CUDA on ResNet-50 at batch 1, 8 and 64;
- ``first_call``: cost of the first run at a new batch size per
  ``cudnn_conv_algo_search`` mode;
- ``eviction``: this process's device memory before/after evicting three
  large models through the real ``SessionCache``;
- ``goals``: worker/raw >= 0.8 at batch 64, eviction returns >= 90%;
- ``gpu_tests``: then ``pytest -m gpu`` in the same environment (``--no-tests``
  skips it): the tests that skip on a machine without a GPU.

Exit 0 when every correctness check passed (goals are reported, not
enforced), 1 when one failed or CUDA is unusable, 3 while parts are missing.
``--device cpu`` runs every section on the CPU with small sizes: a smoke test
of this script (tests/test_cuda_gpu_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import glob
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

__all__ = [
    "ORT_GPU_VERSION",
    "PART_BYTES",
    "assemble",
    "main",
    "measure",
    "pack",
    "stage",
]

ORT_GPU_VERSION = "1.31.1"
"""Same as the Dockerfile's ONNXRUNTIME_GPU_VERSION: built against CUDA 13 and cuDNN 9."""
PART_BYTES = 50 << 20
"""50 MiB: a part plus this repository (3.5 MiB tracked) stays under a call's 64 MiB;
61 MiB parts did not. The 1.31.1 wheel is five parts."""
PARTS_DIR = ROOT / ".wheels" / "onnxruntime-gpu"
STAGE_DIR = Path("/tmp/gpu-check")
EXTRA_WHEELS = ("orjson", "pysimdjson", "skl2onnx")
"""Installed beside the wheel, at this environment's versions (see above)."""
EXTRA = "extra"
MANIFEST = "MANIFEST.json"
BUDGET_S = 480.0
"""The whole check, install included: 8 minutes."""
WAITING = 3


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _part_names(wheel: str, count: int) -> list[str]:
    # split's own suffixes: aa, ab, ...
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [f"{wheel}.part-{letters[i // 26]}{letters[i % 26]}" for i in range(count)]


# -- here: pack ----------------------------------------------------------------


def pack(wheel: Path, dest: Path = PARTS_DIR, part_bytes: int = PART_BYTES) -> dict[str, Any]:
    """Split ``wheel`` into ``dest/<wheel>.part-aa...`` and write ``dest/MANIFEST.json``."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.part-*"):
        old.unlink()
    size = wheel.stat().st_size
    names = _part_names(wheel.name, -(-size // part_bytes))
    parts = []
    with open(wheel, "rb") as f:
        for name in names:
            data = f.read(part_bytes)
            (dest / name).write_bytes(data)
            parts.append({"name": name, "bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
    manifest = {"wheel": wheel.name, "bytes": size, "sha256": _sha256(wheel),
                "part_bytes": part_bytes, "parts": parts}  # fmt: skip
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _pip_download(requirement: str, into: Path) -> None:
    """One wheel, no dependencies, for the GPU machine's Python (cp312 manylinux x86_64)."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.12", "--implementation", "cp",
        "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
        "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
        "-q", "-d", str(into), requirement,
    ]  # fmt: skip
    subprocess.run(cmd, check=True)


def _download(version: str, into: Path) -> Path:
    """The onnxruntime-gpu wheel for the GPU machine's Python, by pip download."""
    _pip_download(f"onnxruntime-gpu=={version}", into)
    (wheel,) = into.glob(f"onnxruntime_gpu-{version}-*.whl")
    return wheel


# -- there: stage, assemble, install -----------------------------------------------


def _download_extras(into: Path) -> list[Path]:
    """:data:`EXTRA_WHEELS` at the versions installed here, for the machine's Python."""
    from importlib.metadata import version

    into.mkdir(parents=True, exist_ok=True)
    for old in into.glob("*.whl"):
        old.unlink()
    for name in EXTRA_WHEELS:
        _pip_download(f"{name}=={version(name)}", into)
    return sorted(into.glob("*.whl"))


def stage(src: Path = PARTS_DIR, stage_dir: Path = STAGE_DIR) -> dict[str, Any]:
    """Copy the carried parts into ``stage_dir/parts``; report what is there and missing.

    Carried extra wheels (``src/extra/*.whl``) are staged in ``stage_dir/extra``.

    A carried part whose sha256 is not the manifest's is an error (a broken
    transfer), never staged.
    """
    manifest_path = src / MANIFEST
    parts_dir = stage_dir / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    if manifest_path.is_file():
        shutil.copyfile(manifest_path, stage_dir / MANIFEST)
    if not (stage_dir / MANIFEST).is_file():
        raise RuntimeError(f"no {MANIFEST} in {src} or {stage_dir}: run bench/gpu_check.py pack")
    manifest = json.loads((stage_dir / MANIFEST).read_text())
    for part in manifest["parts"]:
        carried = src / part["name"]
        if carried.is_file() and not (parts_dir / part["name"]).is_file():
            if _sha256(carried) != part["sha256"]:
                raise RuntimeError(f"{part['name']}: sha256 differs from {MANIFEST}")
            tmp = parts_dir / f".{part['name']}.tmp"
            shutil.copyfile(carried, tmp)
            os.replace(tmp, parts_dir / part["name"])
    for extra in sorted((src / EXTRA).glob("*.whl")):
        (stage_dir / EXTRA).mkdir(exist_ok=True)
        shutil.copyfile(extra, stage_dir / EXTRA / extra.name)
    have = [p["name"] for p in manifest["parts"] if (parts_dir / p["name"]).is_file()]
    missing = [p["name"] for p in manifest["parts"] if p["name"] not in have]
    return {"wheel": manifest["wheel"], "staged": have, "missing": missing}


def assemble(stage_dir: Path = STAGE_DIR) -> Path:
    """Join the staged parts into the wheel and check its sha256; the wheel's path."""
    manifest = json.loads((stage_dir / MANIFEST).read_text())
    wheel = stage_dir / manifest["wheel"]
    if wheel.is_file() and _sha256(wheel) == manifest["sha256"]:
        return wheel
    tmp = stage_dir / f".{manifest['wheel']}.tmp"
    with open(tmp, "wb") as out:
        for part in manifest["parts"]:
            with open(stage_dir / "parts" / part["name"], "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    if tmp.stat().st_size != manifest["bytes"] or _sha256(tmp) != manifest["sha256"]:
        tmp.unlink()
        raise RuntimeError(f"{manifest['wheel']}: joined parts do not match {MANIFEST}'s sha256")
    os.replace(tmp, wheel)
    return wheel


def _install(wheel: Path, site: Path, extras: list[Path]) -> list[str]:
    """The wheel and the staged extras into ``site``; the extras' file names."""
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
           "--no-compile", "--disable-pip-version-check", "--upgrade",
           "--target", str(site)]  # fmt: skip
    if not (site.is_dir() and list(site.glob("onnxruntime_gpu-*.dist-info"))):
        subprocess.run([*pip, str(wheel)], check=True)
    if extras:
        subprocess.run([*pip, *map(str, extras)], check=True)
    return [e.name for e in extras]


def _nvidia_lib_dirs() -> list[str]:
    """``.../site-packages/nvidia/*/lib`` of this interpreter: CUDA/cuDNN from the wheels."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return sorted({d for r in roots for d in glob.glob(os.path.join(r, "*", "lib"))})


def _cuda_ort_ready() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


# -- the measurements -----------------------------------------------------------------


class _Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _section(report: dict[str, Any], name: str, budget: _Budget, need_s: float,
             fn: Callable[[], Any]) -> None:  # fmt: skip
    if budget.left() < need_s:
        report[name] = {"skipped": f"under {need_s:.0f} s of the budget left"}
        return
    start = time.monotonic()
    try:
        report[name] = fn()
    except Exception as exc:  # one section's failure is reported, the others still run
        report[name] = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"}
    if isinstance(report[name], dict):
        report[name]["seconds"] = round(time.monotonic() - start, 2)


def _environment(device: str) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    from bench.gpu import device_name

    return {
        "device": device_name() if device != "cpu" else "CPU (smoke test)",
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_path": str(Path(ort.__file__).parent),
        "providers": ort.get_available_providers(),
        "numpy": np.__version__,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "ld_library_path_nvidia": len(_nvidia_lib_dirs()),
    }


def _probe(device: str) -> dict[str, Any]:
    from worker.runtime import cuda_probe, preload_cuda_libraries

    start = time.monotonic()
    problem = cuda_probe(0)
    return {
        "ok": problem is None,
        "problem": problem,
        "preload_dlls": preload_cuda_libraries(),
        "probe_s": round(time.monotonic() - start, 3),
        "device_asked": device,
    }


def _zoo(device: str, rows: int, tmp: Path) -> dict[str, Any]:
    import tests.modelzoo as mz
    from worker.repository import ModelRepository
    from worker.runtime import TF32_TOLERANCE, RuntimeOptions, load_session

    builders = {**mz.ZOO, **getattr(mz, "UNBATCHED_ZOO", {})}
    root = tmp / "zoo"
    models: dict[str, Any] = {}
    for name, builder in sorted(builders.items()):
        try:
            builder(root)
        except Exception as exc:  # skl2onnx may be missing on a bare machine
            models[name] = {"skipped": f"not built: {type(exc).__name__}: {exc}"[:200]}
    repo = ModelRepository(root)
    cpu_opts = RuntimeOptions(device="cpu")
    for name in sorted(builders):
        if name in models:
            continue
        entry: dict[str, Any] = {}
        try:
            ref = repo.resolve(name)
            cpu = load_session(ref, cpu_opts)
            feeds = mz.sample_feeds(cpu.signature, rows=rows, seed=5)
            want = cpu.run(feeds)
            for tf32, limit in ((True, TF32_TOLERANCE), (False, 1e-4)):
                gpu = load_session(ref, RuntimeOptions(device=device, cuda_tf32=tf32))
                got = gpu.run(feeds)
                diffs = {k: _max_rel_diff(got[k], want[k]) for k in want}
                key = "tf32_on" if tf32 else "tf32_off"
                ok = all(d is not None and d <= limit for d in diffs.values())
                entry[key] = {"max_rel_diff": diffs, "limit": limit, "ok": ok}
                entry["providers"] = gpu.providers
                gpu.close()
            entry["ok"] = entry["tf32_on"]["ok"] and entry["tf32_off"]["ok"] and (
                device == "cpu" or entry["providers"][:1] == ["CUDAExecutionProvider"]
            )
        except Exception as exc:
            entry = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        models[name] = entry
    checked = [m for m in models.values() if "skipped" not in m]
    return {"rows": rows, "ok": bool(checked) and all(m["ok"] for m in checked),
            "checked": len(checked), "models": models}  # fmt: skip


def _max_rel_diff(got: Any, want: Any) -> float | None:
    """max|got - want| / max(1, max|want|); exact types: 0 or inf. None if shapes differ."""
    import numpy as np

    if isinstance(want, list):  # seq(map): compare the scores
        want = np.array([[d[k] for k in sorted(d)] for d in want], np.float64)
        got = np.array([[d[k] for k in sorted(d)] for d in got], np.float64)
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return None
    if want.dtype.kind not in "fc":
        return 0.0 if np.array_equal(got, want) else float("inf")
    if want.size == 0:
        return 0.0
    scale = max(1.0, float(np.nanmax(np.abs(want.astype(np.float64)))))
    return float(np.nanmax(np.abs(got.astype(np.float64) - want))) / scale


def _compute_path(device: str, sizes: list[int], repeat: int, tmp: Path) -> dict[str, Any]:
    from bench.gpu import CudaUnusable, compare_paths, raw_session, write_resnet50
    from worker.repository import ModelRepository
    from worker.runtime import RuntimeOptions, load_session

    model = write_resnet50(tmp / "cnn")
    ref = ModelRepository(tmp / "cnn").resolve(model.name)
    options = RuntimeOptions(device=device, warmup_max_rows=max(sizes))
    session = load_session(ref, options)
    if device != "cpu" and session.providers[:1] != ["CUDAExecutionProvider"]:
        raise CudaUnusable(f"worker session on {session.providers}")
    raw = raw_session(ref.path, options, device)
    results = compare_paths(model, ref, session, raw, sizes, repeat)
    session.close()
    return {"model": model.source, "cudnn_conv_algo_search": options.cudnn_conv_algo_search,
            "repeat": repeat, "worker_providers": ["CUDAExecutionProvider"] if device != "cpu"
            else ["CPUExecutionProvider"], "raw_providers": raw.get_providers(),
            "results": results}  # fmt: skip


def _first_call(device: str, sizes: list[int], tmp: Path) -> dict[str, Any]:
    """Per search mode: first and second run at batch sizes the session has not seen."""
    import numpy as np

    from bench.gpu import write_resnet50
    from worker.repository import ModelRepository
    from worker.runtime import CUDNN_CONV_ALGO_SEARCH, RuntimeOptions, load_session

    model = write_resnet50(tmp / "first")
    ref = ModelRepository(tmp / "first").resolve(model.name)
    modes: dict[str, Any] = {}
    for mode in CUDNN_CONV_ALGO_SEARCH if device != "cpu" else ("HEURISTIC",):
        start = time.monotonic()
        session = load_session(ref, RuntimeOptions(device=device, cudnn_conv_algo_search=mode))
        load_s = time.monotonic() - start
        per_size = []
        for rows in sizes:
            x = np.zeros((rows, *model.row_shape), np.float32)
            times = []
            for _ in range(2):
                t = time.perf_counter()
                session.run({model.input: x})
                times.append((time.perf_counter() - t) * 1e3)
            per_size.append({"rows": rows, "first_ms": round(times[0], 2),
                             "second_ms": round(times[1], 2),
                             "first_call_extra_ms": round(times[0] - times[1], 2)})  # fmt: skip
        session.close()
        modes[mode] = {"load_and_warmup_s": round(load_s, 3), "sizes": per_size,
                       "mean_extra_ms": round(float(np.mean([p["first_call_extra_ms"]
                                                             for p in per_size])), 2)}  # fmt: skip
    return {"model": model.source, "modes": modes}


def _eviction(device: str, mib: int, tmp: Path) -> dict[str, Any]:
    """A, B, C (one allowed at a time) through SessionCache; memory after each, and after close."""
    from bench.gpu import write_big_model
    from worker.cache import SessionCache
    from worker.repository import ModelRepository
    from worker.runtime import RuntimeOptions, device_memory, load_session

    root = tmp / "big"
    for seed, name in enumerate("abc"):
        write_big_model(root, name, mib, seed)
    repo = ModelRepository(root)

    def used() -> tuple[int | None, str]:
        gc.collect()
        if device == "cpu":
            with open("/proc/self/status") as f:
                rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            return rss, "process RSS"
        return device_memory(device)

    options = RuntimeOptions(device=device, warmup_max_rows=64)
    released_seen: list[int | None] = []
    cache = SessionCache(
        repo, lambda ref: load_session(ref, options), max_models=1,
        on_evict=lambda sessions: released_seen.append(used()[0]),
    )  # fmt: skip
    base, scope = used()
    steps = []
    for name in "abca":
        with cache.acquire(name) as session:
            charged = session.nbytes
        value, _ = used()
        steps.append({"loaded": name, "used_mib": _mib(value), "charged_mib": _mib(charged)})
    cache.close()
    after_close, _ = used()
    model_bytes = mib << 20
    firsts = [s["used_mib"] for s in steps]
    release = None
    if base is not None and after_close is not None and firsts[0] is not None:
        peak = max(f for f in firsts if f is not None) * (1 << 20)
        one_model = firsts[0] * (1 << 20) - base
        # What stays after each eviction beyond one model's worth, as a share of a model.
        kept = max((f * (1 << 20) - firsts[0] * (1 << 20)) for f in firsts if f is not None)
        release = {
            "one_model_mib": _mib(one_model),
            "kept_per_eviction_share": round(max(0, kept) / model_bytes, 3),
            "released_share": round(1 - max(0, kept) / model_bytes, 3),
            "after_close_vs_base_mib": _mib(after_close - base),
            "peak_mib": _mib(peak),
        }
    return {"scope": scope, "model_mib": mib, "base_mib": _mib(base), "steps": steps,
            "after_close_mib": _mib(after_close), "on_evict_readings_mib":
            [_mib(v) for v in released_seen], "evicted_bytes": cache.evicted_bytes,
            "release": release,
            "ok": release is not None and release["released_share"] >= 0.9
            and release["one_model_mib"] >= 0.9 * mib}  # fmt: skip


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / (1 << 20), 1)


def measure(device: str = "cuda:0", *, budget_s: float = BUDGET_S, zoo_rows: int = 64,
            sizes: tuple[int, ...] = (1, 8, 64), repeat: int = 20,
            first_call_sizes: tuple[int, ...] = (3, 17, 48, 100),
            evict_mib: int = 512) -> dict[str, Any]:  # fmt: skip
    """Every section, each within what is left of ``budget_s``; the report as a dict."""
    budget = _Budget(budget_s)
    report: dict[str, Any] = {
        "check": "inference-worker gpu-check",
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _section(report, "environment", budget, 0, lambda: _environment(device))
    _section(report, "probe", budget, 0, lambda: _probe(device))
    cuda_ok = device == "cpu" or bool(report["probe"].get("ok"))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp_name:
        tmp = Path(tmp_name)
        if cuda_ok:
            _section(report, "zoo", budget, 30, lambda: _zoo(device, zoo_rows, tmp))
            _section(report, "compute_path", budget, 30,
                     lambda: _compute_path(device, list(sizes), repeat, tmp))  # fmt: skip
            _section(report, "first_call", budget, 60,
                     lambda: _first_call(device, list(first_call_sizes), tmp))  # fmt: skip
            _section(report, "eviction", budget, 30, lambda: _eviction(device, evict_mib, tmp))
    report["goals"] = _goals(report, max(sizes))
    # On CPU (the smoke test) host RSS also moves with what earlier sections freed:
    # the eviction figures are printed there, not judged.
    checks = [report.get(k, {}) for k in (("zoo",) if device == "cpu" else ("zoo", "eviction"))]
    report["ok"] = cuda_ok and all(c.get("ok") for c in checks) and all(
        "error" not in report.get(k, {}) for k in ("compute_path", "first_call")
    )
    report["seconds"] = round(budget_s - budget.left(), 1)
    return report


def _goals(report: dict[str, Any], rows: int) -> list[dict[str, Any]]:
    goals = []
    results = report.get("compute_path", {}).get("results", [])
    at = [r for r in results if r["rows"] == rows]
    ratio = at[0]["worker_over_raw"] if at else None
    goals.append({"goal": f"worker compute path >= 0.8 x raw ONNX Runtime at batch {rows}",
                  "value": ratio, "met": ratio is not None and ratio >= 0.8})  # fmt: skip
    release = (report.get("eviction", {}).get("release") or {}).get("released_share")
    goals.append({"goal": "eviction returns >= 90% of a model's device memory",
                  "value": release, "met": release is not None and release >= 0.9})  # fmt: skip
    return goals


# -- command line --------------------------------------------------------------------


def _run_check(args: argparse.Namespace) -> int:
    start = time.monotonic()
    env = dict(os.environ)
    install: dict[str, Any] = {}
    if not _cuda_ort_ready() and args.device != "cpu":
        try:
            staged = stage(Path(args.parts), Path(args.stage))
        except RuntimeError as exc:
            print(json.dumps({"check": "inference-worker gpu-check", "ok": False,
                              "install": {"error": str(exc)}}, indent=2))  # fmt: skip
            return 1
        if staged["missing"]:
            print(json.dumps({"check": "inference-worker gpu-check", "status":
                              "waiting-for-parts", **staged}, indent=2))  # fmt: skip
            return WAITING
        wheel = assemble(Path(args.stage))
        site = Path(args.stage) / "site"
        extras = _install(wheel, site, sorted((Path(args.stage) / EXTRA).glob("*.whl")))
        lib_dirs = _nvidia_lib_dirs()
        env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")])
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*lib_dirs, env.get("LD_LIBRARY_PATH", "")])
        install = {"wheel": wheel.name, "sha256_checked": True, "site": str(site),
                   "extras": extras, "nvidia_lib_dirs": lib_dirs}  # fmt: skip
    env["PYTHONUNBUFFERED"] = "1"
    left = args.budget - (time.monotonic() - start)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", "--device", args.device,
           "--budget", str(max(30.0, left - 15))]  # fmt: skip
    if args.device == "cpu":
        cmd += ["--smoke"]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(45, left),
                             check=False, cwd=ROOT)  # fmt: skip
    except subprocess.TimeoutExpired:
        print(json.dumps({"check": "inference-worker gpu-check", "ok": False, "install": install,
                          "error": "the check outlasted its budget"}, indent=2))  # fmt: skip
        return 1
    try:
        report = json.loads(out.stdout)
    except json.JSONDecodeError:
        print(json.dumps({"check": "inference-worker gpu-check", "ok": False, "install": install,
                          "error": f"the check exited {out.returncode} without a report",
                          "stderr_tail": out.stderr[-3000:]}, indent=2))  # fmt: skip
        return 1
    report = {"check": report.pop("check"), "ok": report.pop("ok"), "install": install, **report}
    if args.device != "cpu" and not args.no_tests:
        left = args.budget - (time.monotonic() - start)
        report["gpu_tests"] = _gpu_tests(env, left)
        report["ok"] = report["ok"] and report["gpu_tests"].get("rc") == 0
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report["ok"] else 1


def _gpu_tests(env: dict[str, str], left_s: float) -> dict[str, Any]:
    """``pytest -m gpu`` (the tests that skip without a GPU) in the check's environment."""
    if left_s < 30:
        return {"skipped": f"{left_s:.0f} s of the budget left"}
    # Only the files that hold such tests: the others import what the image lacks
    # (pydantic, the Kafka clients) at collection.
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text())  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           "-rfEs", *files]  # fmt: skip
    start = time.monotonic()
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=left_s,
                             check=False, cwd=ROOT)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"rc": None, "error": f"pytest -m gpu outlasted the {left_s:.0f} s left"}
    lines = out.stdout.strip().splitlines()
    return {"rc": out.returncode, "summary": lines[-1] if lines else out.stderr[-500:],
            "failures": [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:20],
            "seconds": round(time.monotonic() - start, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.py",
                                     description=(__doc__ or "").splitlines()[0])  # fmt: skip
    parser.add_argument("command", nargs="?", choices=["check", "pack"], default="check")
    parser.add_argument("--wheel", help="pack: this wheel instead of downloading it")
    parser.add_argument("--version", default=ORT_GPU_VERSION, help="pack: onnxruntime-gpu version")
    parser.add_argument("--parts", default=str(PARTS_DIR), help="where the parts are carried")
    parser.add_argument("--stage", default=str(STAGE_DIR), help="where they gather there")
    parser.add_argument("--part-bytes", type=int, default=PART_BYTES, help=argparse.SUPPRESS)
    parser.add_argument("--no-extras", action="store_true",
                        help="pack: skip the extra wheels (EXTRA_WHEELS)")  # fmt: skip
    parser.add_argument("--device", default="cuda:0", help="cpu: smoke test with small sizes")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds, install included")
    parser.add_argument("--out", help="also write the JSON report to this file")
    parser.add_argument("--no-tests", action="store_true",
                        help="check: skip pytest -m gpu after the measurements")  # fmt: skip
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure:
        kwargs: dict[str, Any] = {}
        if args.smoke:  # CPU: the same code, sizes a CPU runs in seconds
            kwargs = {"zoo_rows": 8, "sizes": (1, 2), "repeat": 1, "first_call_sizes": (2,),
                      "evict_mib": 32}  # fmt: skip
        with contextlib.redirect_stdout(sys.stderr):  # only the report on stdout
            report = measure(args.device, budget_s=args.budget, **kwargs)
        print(json.dumps(report))
        return 0
    if args.command == "pack":
        with tempfile.TemporaryDirectory(prefix="ort-gpu-wheel-") as tmp:
            wheel = Path(args.wheel) if args.wheel else _download(args.version, Path(tmp))
            manifest = pack(wheel, Path(args.parts), args.part_bytes)
        if not args.no_extras:
            manifest["extras"] = [w.name for w in _download_extras(Path(args.parts) / EXTRA)]
        rel = os.path.relpath(args.parts, ROOT)
        print(json.dumps(manifest, indent=2))
        for i, part in enumerate(manifest["parts"]):
            extra = f', "{rel}/{EXTRA}"' if i == 0 and manifest.get("extras") else ""
            print(f'carry: ["{rel}/{MANIFEST}", "{rel}/{part["name"]}"{extra}]', file=sys.stderr)
        return 0
    return _run_check(args)


if __name__ == "__main__":
    sys.exit(main())
