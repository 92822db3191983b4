"""``inference-worker``: flags <-> ``WORKER_*`` environment, exit codes; nothing else.

Exit status: 0 after SIGTERM/SIGINT with everything drained; 2 for a
configuration error (one line naming the flag); 1 for a fatal runtime error.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from worker.config import Settings
from worker.errors import ConfigError, FatalError
from worker.kafka import BACKENDS, DEFAULT_BACKEND
from worker.kafka.options import (
    check_properties,
    credentials_from_env,
    parse_kafka_options,
    read_properties_file,
)
from worker.observability import DEFAULT_METRICS_PORT

__all__ = ["entry", "main", "parse_settings", "version"]

PROG = "inference-worker"
log = logging.getLogger("worker")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as every configuration error: the flag and why.
        self.exit(2, f"{self.prog}: {message}\n")


@dataclass(frozen=True)
class _Flag:
    name: str
    help: str
    default: Any = None
    convert: Callable[[str], Any] = str
    repeat: bool = False
    switch: bool = False
    split: bool = True  # a repeated flag's value may hold several, comma-separated

    @property
    def env(self) -> str:
        return "WORKER_" + self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


def _positive_int(v: str) -> int:
    n = int(v)
    if n <= 0:
        raise ValueError(f"must be a positive integer, got {v!r}")
    return n


def _non_negative_int(v: str) -> int:
    n = int(v)
    if n < 0:
        raise ValueError(f"must be >= 0, got {v!r}")
    return n


def _non_negative_float(v: str) -> float:
    x = float(v)
    if x < 0:
        raise ValueError(f"must be >= 0, got {v!r}")
    return x


def _size(v: str) -> int:
    """Bytes, with an optional K/M/G/T suffix (binary; ``Ki``/``KiB``/``KB`` spellings
    too) and a fraction: ``512M``, ``64Mi``, ``1.5G``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*", v, re.IGNORECASE)
    if not m:
        raise ValueError(f"expected a size like 512M, 64Mi or 1.5G, got {v!r}")
    scale = 1 << (10 * " kmgt".index(m.group(2).lower() or " "))
    n = int(float(m.group(1)) * scale)
    if n <= 0:
        raise ValueError(f"must be a positive size, got {v!r}")
    return n


def _choice(*choices: str) -> Callable[[str], str]:
    def convert(v: str) -> str:
        if v not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {v!r}")
        return v

    return convert


def _device(v: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
        raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {v!r}")
    return v


def _preload(v: str) -> tuple[str, int | None]:
    name, _, version = v.partition(":")
    if not name:
        raise ValueError(f"expected NAME[:VERSION], got {v!r}")
    return name, (_positive_int(version) if version else None)


def _port(v: str) -> int:
    n = int(v)
    if not 0 <= n <= 65535:
        raise ValueError(f"expected a TCP port 0-65535, got {v!r}")
    return n


def _file(v: str) -> Path:
    p = Path(v)
    if not p.is_file():
        raise ValueError(f"no such file: {v!r}")
    return p


def _existing_dir(v: str) -> Path:
    p = Path(v)
    if not p.is_dir():
        raise ValueError(f"{v!r} is not a directory")
    return p


_RUN_FLAGS: tuple[_Flag, ...] = (
    _Flag("bootstrap-servers", "Kafka bootstrap servers", "localhost:9092"),
    _Flag("input-topic", "input topic(s), repeatable or comma-separated (required)", repeat=True),
    _Flag("output-topic", "topic for responses (required)"),
    _Flag("dlq-topic", "dead-letter topic (default <first input topic>.dlq)"),
    _Flag("group-id", "consumer group", "inference-worker"),
    _Flag("model-repository", "model repository directory (required)", convert=_existing_dir),
    _Flag("default-model", "model for requests that name none"),
    _Flag("device", "auto | cpu | cuda[:N]", "auto", _device),
    _Flag("cache-max-models", "sessions kept loaded", "4", _positive_int),
    _Flag("cache-max-bytes", "byte budget of loaded sessions (K/M/G suffix)", None, _size),
    _Flag(
        "preload",
        "NAME[:VERSION] loaded at start, never evicted (repeatable)",
        repeat=True,
        convert=_preload,
    ),
    _Flag("max-batch-rows", "rows per coalesced run", "1024", _positive_int),
    _Flag("max-batch-delay-ms", "how long a request waits for company", "5", _non_negative_float),
    _Flag(
        "coalesce-below-rows",
        "requests with at least this many rows run alone, uncopied",
        "64",
        _positive_int,
    ),
    _Flag(
        "output-format",
        "same | arrow | msgpack | json",
        "same",
        _choice("same", "arrow", "msgpack", "json"),
    ),
    _Flag(
        "exactly-once",
        "transactions: outputs, dead letters and offsets commit together",
        switch=True,
    ),
    _Flag("transactional-id", "with --exactly-once (default <group-id>-<hostname>)"),
    _Flag(
        "metrics-port",
        "port for /metrics, /healthz, /readyz (0: any free port)",
        str(DEFAULT_METRICS_PORT),
        _port,
    ),
    _Flag("metrics-bind", "address the metrics/health server listens on", "0.0.0.0"),
    _Flag(
        "kafka-client",
        "confluent (librdkafka) | kafka-python (pure Python)",
        DEFAULT_BACKEND,
        _choice(*BACKENDS),
    ),
    _Flag(
        "kafka-option",
        "KEY=VALUE Kafka property, e.g. fetch.max.bytes=1048576 (repeatable)",
        repeat=True,
        split=False,
    ),
    _Flag("kafka-config", "Java-style .properties file of Kafka properties", convert=_file),
    _Flag("cuda-mem-limit", "CUDA arena limit per session (K/M/G suffix)", None, _size),
    _Flag(
        "cudnn-conv-algo-search",
        "EXHAUSTIVE | HEURISTIC | DEFAULT (cuDNN convolution algorithm search)",
        None,
        _choice("EXHAUSTIVE", "HEURISTIC", "DEFAULT"),
    ),
    _Flag(
        "retry-attempts",
        "runs of a transiently failing record before it is dead-lettered",
        "3",
        _positive_int,
    ),
    _Flag(
        "retry-backoff-ms",
        "first wait before a retry (doubles, capped at 5 s)",
        "100",
        _non_negative_float,
    ),
    _Flag(
        "commit-interval-ms",
        "how often acknowledged progress is committed",
        "200",
        _non_negative_float,
    ),
    _Flag("log-format", "text | json", "text", _choice("text", "json")),
    _Flag(
        "log-level",
        "DEBUG | INFO | WARNING | ERROR",
        "INFO",
        _choice("DEBUG", "INFO", "WARNING", "ERROR"),
    ),
    _Flag(
        "drain-timeout", "seconds to drain in-flight work after SIGTERM", "30", _non_negative_float
    ),
    _Flag("intra-op-threads", "ONNX Runtime threads per run", "1", _positive_int),
    _Flag("inference-threads", "runs in parallel", "1", _positive_int),
    _Flag("max-inflight-bytes", "request bytes in flight before partitions pause", "64M", _size),
    _Flag("max-message-bytes", "largest Kafka record the clients accept", "16M", _size),
    _Flag(
        "max-request-bytes", "largest request decoded (default: --max-message-bytes)", None, _size
    ),
    _Flag("max-request-rows", "most rows in one request", "1000000", _positive_int),
    _Flag(
        "optimized-dir",
        "cache of ONNX Runtime's optimized graphs ('' turns it off)",
        str(Path(tempfile.gettempdir()) / "inference-worker-optimized"),
        lambda v: Path(v) if v else None,
    ),
    _Flag(
        "response-cache-size",
        "answer identical requests from memory (0: off)",
        "0",
        _non_negative_int,
    ),
)


def _env_switch(name: str, v: str) -> bool:
    low = v.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(name, f"expected true or false (1/0, yes/no, on/off), got {v!r}")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Streaming ONNX inference on Kafka.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser(
        "run",
        help="consume requests, run models, produce responses",
        description="Every flag also reads the environment variable shown in brackets.",
    )
    for flag in _RUN_FLAGS:
        default = "" if flag.default is None else f" (default {flag.default})"
        helptext = f"{flag.help}{default} [{flag.env}]"
        if flag.switch:
            run.add_argument(f"--{flag.name}", action="store_true", default=None, help=helptext)
        elif flag.repeat:
            run.add_argument(f"--{flag.name}", action="append", metavar="VALUE", help=helptext)
        else:
            run.add_argument(f"--{flag.name}", metavar="VALUE", help=helptext)
    sub.add_parser(
        "optimize",
        help="write a faster version of a model, behind an accuracy gate (optimize --help)",
        add_help=False,
    )
    return parser


def _value(flag: _Flag, raw: Any, env: dict[str, str]) -> Any:
    """Flag value, else environment, else default; converted and validated."""
    if flag.switch:
        return bool(raw) if raw is not None else _env_switch(flag.env, env.get(flag.env, ""))
    if flag.repeat:
        items = raw if raw is not None else ([env[flag.env]] if env.get(flag.env) else [])
        if flag.split:
            parts = [p.strip() for item in items for p in item.split(",") if p.strip()]
        else:
            parts = [item for item in items if item.strip()]
        try:
            return tuple(flag.convert(p) for p in parts)
        except ValueError as exc:
            raise ConfigError(f"--{flag.name}", str(exc)) from None
    text = raw if raw is not None else env.get(flag.env, flag.default)
    if text is None:
        return None
    try:
        return flag.convert(text)
    except ValueError as exc:
        reason = str(exc) if "got" in str(exc) else f"invalid value {text!r} ({exc})"
        raise ConfigError(f"--{flag.name}", reason) from None


def parse_settings(argv: Sequence[str], env: dict[str, str] | None = None) -> Settings:
    """Parse ``run`` flags; raises :class:`ConfigError` naming the flag."""
    env = dict(os.environ) if env is None else env
    args = _build_parser().parse_args(["run", *argv])
    v = {f.dest: _value(f, getattr(args, f.dest), env) for f in _RUN_FLAGS}
    for required in ("input_topic", "output_topic", "model_repository"):
        if not v[required]:
            flag = "--" + required.replace("_", "-")
            raise ConfigError(flag, f"required (or set WORKER_{required.upper()})")
    kafka_properties = {
        # the file, then the environment's credentials, then flags: the last wins
        **(read_properties_file(v["kafka_config"]) if v["kafka_config"] else {}),
        **credentials_from_env(env),
        **parse_kafka_options(v["kafka_option"]),
    }
    check_properties(kafka_properties, v["kafka_client"])
    return Settings(
        input_topics=v["input_topic"],
        output_topic=v["output_topic"],
        model_repository=v["model_repository"],
        bootstrap_servers=v["bootstrap_servers"],
        dlq_topic=v["dlq_topic"],
        group_id=v["group_id"],
        default_model=v["default_model"],
        device=v["device"],
        cache_max_models=v["cache_max_models"],
        cache_max_bytes=v["cache_max_bytes"],
        preload=v["preload"],
        max_batch_rows=v["max_batch_rows"],
        max_batch_delay_ms=v["max_batch_delay_ms"],
        coalesce_below_rows=v["coalesce_below_rows"],
        output_format=v["output_format"],
        exactly_once=v["exactly_once"],
        transactional_id=v["transactional_id"],
        metrics_port=v["metrics_port"],
        metrics_bind=v["metrics_bind"],
        kafka_client=v["kafka_client"],
        kafka_properties=kafka_properties,
        cuda_mem_limit=v["cuda_mem_limit"],
        cudnn_conv_algo_search=v["cudnn_conv_algo_search"],
        retry_attempts=v["retry_attempts"],
        retry_backoff_ms=v["retry_backoff_ms"],
        commit_interval_ms=v["commit_interval_ms"],
        log_format=v["log_format"],
        log_level=v["log_level"],
        drain_timeout_s=v["drain_timeout"],
        intra_op_threads=v["intra_op_threads"],
        inference_threads=v["inference_threads"],
        max_inflight_bytes=v["max_inflight_bytes"],
        max_message_bytes=v["max_message_bytes"],
        max_request_bytes=v["max_request_bytes"],
        max_request_rows=v["max_request_rows"],
        response_cache_size=v["response_cache_size"],
        optimized_dir=v["optimized_dir"],
    )


def version() -> str:
    try:
        return importlib.metadata.version("inference-worker")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"] or (argv[:1] == ["run"] and "--version" in argv):
        print(f"{PROG} {version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        _build_parser().print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "optimize":  # its own flags and parser: worker/optimize.py
        from worker.optimize import main as optimize_main

        return optimize_main(rest)
    if command != "run":
        _build_parser().parse_args(argv)  # prints the one-line error, exits 2
        return 2
    try:
        settings = parse_settings(rest)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2

    from worker.loop import run_worker
    from worker.observability import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    try:
        rc = run_worker(settings)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        rc = 2
    except FatalError as exc:  # refused login, untrusted certificate, refused answer: one line
        log.error("%s", exc)
        rc = 1
    except Exception:
        log.exception("fatal error; offsets of unanswered records were not committed")
        rc = 1
    return rc


def entry() -> None:
    """The console script: ``main``, then leave even if a model run is stuck."""
    sys.exit(_exit_now_if_stuck(main()))


def _exit_now_if_stuck(rc: int) -> int:
    """A model run that never returns holds a non-daemon thread, which the interpreter
    would wait for at exit: leave at once instead (everything that matters is flushed)."""
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if any(t.is_alive() and not t.daemon for t in others):
        log.error("a model run is still busy; exiting without waiting for it")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    entry()
