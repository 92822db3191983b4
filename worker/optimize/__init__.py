"""``inference-worker optimize``: write a faster version of a model, behind an accuracy gate.

An offline tool beside the worker, never imported by it. One pass, top to
bottom (:func:`~worker.optimize.pipeline.optimize`):

1. resolve the source version in the model repository;
2. build the candidate in a hidden staging directory next to the versions
   (``DIR/NAME/.optimize-<hex>/``, ignored by the repository's scan):
   ``plain`` graph optimization, ``fp16`` conversion or ``int8`` dynamic
   quantization, each ending in ONNX Runtime's offline graph optimization;
3. run source and candidate on the same sample through the worker's own
   :func:`~worker.runtime.load_session` and compare every output (the gate);
4. time both side by side, alternating, same inputs and threads;
5. accepted: write ``optimize.json`` (provenance) and publish the staging
   directory as ``DIR/NAME/<max+1>`` in one rename
   (:meth:`~worker.repository.ModelRepository.publish_version`), so a running
   worker never sees a half-written version; refused: delete it, write nothing.

The source file is only ever read. A flat ``DIR/NAME.onnx`` (version 1) gets
its next version as ``DIR/NAME/2/model.onnx``.

Modules, each named for what it may touch:

- :mod:`~worker.optimize.candidates`: source file in, candidate file out;
- :mod:`~worker.optimize.sources`: what ``--sample`` names, read or decoded (reads);
- :mod:`~worker.optimize.gate`: the sample, the comparison, the timing (reads, runs);
- :mod:`~worker.optimize.report`: the report and the provenance record (pure data);
- :mod:`~worker.optimize.pipeline`: the pass above; the only one that touches the repository;
- :mod:`~worker.optimize.cli`: flags and exit status; the only one that knows flag names;
- :mod:`~worker.optimize.errors`: :class:`CandidateError` (exit 1), :class:`RequestError` (exit 2).
"""

from __future__ import annotations

from worker.optimize.candidates import MODES, build_candidate
from worker.optimize.cli import main
from worker.optimize.errors import CandidateError, ModeTargetError, RequestError
from worker.optimize.gate import (
    DEFAULT_TOLERANCE,
    MIN_ARGMAX_AGREEMENT,
    OutputCheck,
    gate_tolerance,
)
from worker.optimize.pipeline import OptimizeRequest, optimize
from worker.optimize.report import OptimizeReport, Timing

__all__ = [
    "DEFAULT_TOLERANCE",
    "MIN_ARGMAX_AGREEMENT",
    "MODES",
    "CandidateError",
    "ModeTargetError",
    "OptimizeReport",
    "OptimizeRequest",
    "OutputCheck",
    "RequestError",
    "Timing",
    "build_candidate",
    "gate_tolerance",
    "main",
    "optimize",
]
