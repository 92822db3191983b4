"""``inference-worker optimize``: flags in, report out, one exit status.

The only module of the package that knows flag names: argparse converts and
checks each value (a bad one is one line naming the flag), and the request's
own faults, which the lower layers report by
:class:`~worker.optimize.errors.RequestError` field, are mapped to flags here.

Exit status of :func:`main`: 0 written; 1 refused by the gate or the
candidate could not be built; 2 bad flags, unknown model or version,
unusable sample or target (one line naming the flag).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from worker.errors import ConfigError
from worker.optimize.candidates import TARGETS
from worker.optimize.errors import CandidateError, ModeTargetError, RequestError
from worker.optimize.gate import DEFAULT_TOLERANCE
from worker.optimize.pipeline import OptimizeRequest, optimize
from worker.runtime import TF32_TOLERANCE

__all__ = ["PROG", "main"]

PROG = "inference-worker optimize"

# OptimizeRequest field -> flag, where the flag is not simply "--" + the field.
_FLAGS = {"repository": "--model-repository", "mode": "--fp16/--int8"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as every configuration error: the flag and why. argparse says
        # "argument --rows: ..." for a value its type refused; the flag is enough.
        self.exit(2, f"{self.prog}: {message.removeprefix('argument ')}\n")


# Value types: a ValueError's message is what argparse prints after the flag.


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return n


def _non_negative_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = -1.0
    if not 0 <= x < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return x


def _target(text: str) -> str:
    if text not in TARGETS:
        raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text!r}")
    return text


def _directory(text: str) -> Path:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return Path(text)


def _file(text: str) -> Path:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    return Path(text)


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Write a faster version of a model as the next version, "
        "only if its outputs agree with the original.",
    )
    p.add_argument(
        "--model-repository",
        metavar="DIR",
        type=_directory,
        required=True,
        help="model repository",
    )
    p.add_argument("--model", metavar="NAME", required=True, help="model name")
    p.add_argument(
        "--version", metavar="V", type=_positive_int, help="source version (default: newest)"
    )
    p.add_argument(
        "--target",
        metavar="cpu|cuda",
        type=_target,
        required=True,
        help="device the candidate is built, checked and timed on",
    )
    p.add_argument("--fp16", action="store_true", help="float16 weights, float32 I/O (cuda)")
    p.add_argument("--int8", action="store_true", help="dynamic int8 quantization (cpu)")
    p.add_argument(
        "--sample",
        metavar="FILE",
        type=_file,
        help=".npy (one input), .npz (by input name), an `inference-producer record` "
        "file (decoded as the worker decodes it) or a publish source (.parquet, .arrow, "
        ".feather, .csv); default: generated",
    )
    p.add_argument(
        "--tolerance",
        metavar="T",
        type=_non_negative_float,
        help="allowed max abs diff x max(1, max|original|) (default: "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_TOLERANCE.items())
        + f"; cuda at least {TF32_TOLERANCE:g}, TF32; below that TF32 is off)",
    )
    p.add_argument(
        "--rows",
        metavar="N",
        type=_positive_int,
        default="256",
        help="generated rows (default 256)",
    )
    p.add_argument(
        "--threads",
        metavar="N",
        type=_positive_int,
        default="1",
        help="intra-op threads, both sides (default 1, as the worker)",
    )
    p.add_argument(
        "--repeats",
        metavar="N",
        type=_positive_int,
        default="20",
        help="timed runs per side (default 20)",
    )
    p.add_argument(
        "--min-speedup",
        metavar="S",
        type=_non_negative_float,
        default="0.9",
        help="refuse a candidate whose median run is slower than S x the "
        "original's (default 0.9; 0: off)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _request(argv: Sequence[str]) -> tuple[OptimizeRequest, bool]:
    args = _build_parser().parse_args(list(argv))
    if args.fp16 and args.int8:
        raise ConfigError("--fp16", "and --int8 exclude each other")
    request = OptimizeRequest(
        repository=args.model_repository,
        model=args.model,
        target=args.target,
        mode="fp16" if args.fp16 else "int8" if args.int8 else "plain",
        version=args.version,
        sample=args.sample,
        tolerance=args.tolerance,
        rows=args.rows,
        threads=args.threads,
        repeats=args.repeats,
        min_speedup=args.min_speedup,
    )
    return request, bool(args.json)


def _as_config_error(exc: RequestError) -> ConfigError:
    """The flag behind a request field; the reason in the flags' own words."""
    if isinstance(exc, ModeTargetError):
        return ConfigError(f"--{exc.mode}", f"needs --target {exc.target} ({exc.why})")
    return ConfigError(_FLAGS.get(exc.field, "--" + exc.field.replace("_", "-")), exc.reason)


def main(argv: Sequence[str] | None = None) -> int:
    """``inference-worker optimize ...``: 0 written, 1 refused or failed, 2 bad request."""
    try:
        request, as_json = _request(sys.argv[1:] if argv is None else argv)
        try:
            report = optimize(request)
        except RequestError as exc:
            raise _as_config_error(exc) from exc
    except SystemExit as exc:  # argparse: --help (0) or a bad flag (2, already printed)
        return exc.code if isinstance(exc.code, int) else 2
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except CandidateError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict(), indent=2) if as_json else report.table())
    return 0 if report.accepted else 1
