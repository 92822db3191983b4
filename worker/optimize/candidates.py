"""Building the candidate: a new model file from the source, by mode and target device.

``plain`` graph optimization, ``fp16`` conversion or ``int8`` dynamic
quantization, each ending in ONNX Runtime's offline graph optimization
(:func:`optimize_graph`). Touches only the source (read) and the destination
(written); scratch files go next to the destination and are removed.

Why EXTENDED and not ALL for the saved graph: ORT_ENABLE_ALL adds layout
transforms (NCHWc blocking) tuned to the CPU that ran the optimizer, so a
saved ALL-level model may be slower or wrong elsewhere. The worker applies
ALL at load anyway, on the machine that serves (and caches that graph per
device), so the repository keeps the portable EXTENDED-level graph, built
with the target's execution provider so its fusions are the ones that
provider runs.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnxruntime as ort

from worker.optimize.errors import CandidateError, ModeTargetError, one_line
from worker.runtime import memcpy_nodes, provider_names

__all__ = ["MODES", "TARGETS", "build_candidate", "check_mode", "optimize_graph"]

MODES = ("plain", "fp16", "int8")
TARGETS = ("cpu", "cuda")

_MODE_TARGET: dict[str, tuple[str, str]] = {
    # ORT's CPU kernels mostly lack float16: casts around them make it slower.
    "fp16": ("cuda", "float16 does not speed up CPU kernels"),
    # MatMulInteger/ConvInteger have no fast CUDA kernels; they would fall back to the CPU.
    "int8": ("cpu", "dynamic int8 kernels are CPU kernels"),
}


def check_mode(mode: str, target: str) -> None:
    """Raise :class:`ModeTargetError` when ``mode`` gains nothing on ``target``."""
    needed = _MODE_TARGET.get(mode)
    if needed is not None and target != needed[0]:
        raise ModeTargetError(mode, *needed)


def optimize_graph(source: Path, dest: Path, target: str) -> None:
    """ONNX Runtime's EXTENDED-level graph, saved (see the module docstring for why not ALL)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dest)
    opts.log_severity_level = 3
    ort.InferenceSession(str(source), opts, providers=provider_names(target))


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Silence the converters' own chatter (INFO logs, DeprecationWarnings from their deps)."""
    saved = [(lg, lg.level) for lg in (logging.getLogger(n) for n in loggers)]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"onnx.*")
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def build_candidate(source: Path, dest: Path, mode: str, target: str) -> list[str]:
    """Write the candidate for ``source`` to ``dest``; returns the stages applied, in order.

    Scratch files go next to ``dest`` and are removed. Raises
    :class:`CandidateError` when a converter or ONNX Runtime refuses the model.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    scratch = dest.parent / f".scratch-{uuid.uuid4().hex}"
    scratch.mkdir()
    stages: list[str] = []
    try:
        current = source
        if mode == "fp16":
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            with _quiet("onnxruntime.transformers.float16"):
                model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
            current = scratch / "fp16.onnx"
            onnx.save(model, str(current))
            stages.append("float16 (keep_io_types)")
        elif mode == "int8":
            import onnx
            from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic
            from onnxruntime.quantization.registry import IntegerOpsRegistry

            pre, quantized = scratch / "pre.onnx", scratch / "int8.onnx"
            with _quiet("onnxruntime.quantization", "root"):
                # Shape inference + BASIC-level folding first, as ORT recommends;
                # symbolic shape inference needs sympy, which onnx shape inference
                # replaces well enough for dynamic quantization.
                quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
                stages.append("quant_pre_process")
                quantize_dynamic(
                    str(pre),
                    str(quantized),
                    weight_type=QuantType.QInt8,
                    # Conv stays float: ConvInteger is slower than float Conv on
                    # CPU (0.3x on tests.modelzoo's CNN); CNNs want static,
                    # calibrated quantization, which needs data we do not have.
                    op_types_to_quantize=sorted(set(IntegerOpsRegistry) - {"Conv"}),
                    # Tensors typed only by contrib ops (an already optimized
                    # version as the source) are float in every model we serve.
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                )
            current = quantized
            stages.append("quantize_dynamic (int8 weights, uint8 activations; Conv kept float)")
        optimize_graph(current, dest, target)
        stages.append(f"onnxruntime ORT_ENABLE_EXTENDED ({provider_names(target)[0]})")
        if target != "cpu" and memcpy_nodes(dest):
            # A CUDA session saves Memcpy nodes where its partition crosses to CPU;
            # they tie the graph to that partition. The CPU provider's graph is
            # portable, and the worker applies CUDA's own fusions at load anyway.
            optimize_graph(current, dest, "cpu")
            stages.append("rebuilt with CPUExecutionProvider: the CUDA graph held Memcpy nodes")
    except Exception as exc:  # converters raise anything from ValueError to ORT's types
        raise CandidateError(f"{mode} candidate could not be built: {one_line(exc)}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    found = memcpy_nodes(dest)
    if found:  # never published: see worker.runtime.memcpy_nodes
        raise CandidateError(
            f"{mode} candidate holds {len(found)} Memcpy node(s) ({', '.join(found[:3])}): "
            "a graph tied to one CUDA/CPU partition is not published"
        )
    return stages
