"""``inference-producer``: flags -> the tool functions, errors -> exit status.

Exit status: 0 done; 1 a runtime failure (or ``collect --expect`` timed out);
2 a bad argument or an unreadable input, always with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from producers.clients import BACKENDS, DEFAULT_BACKEND, KafkaSettings, kafka_properties
from producers.errors import ProducerError, UsageError
from producers.redrive import MAX_REDRIVES, REDRIVE_GROUP

__all__ = ["REQUEST_FORMATS", "build_parser", "main"]

PROG = "inference-producer"
# worker.protocol's codecs, named here so --help needs no numpy or pyarrow import
REQUEST_FORMATS = ["arrow", "msgpack", "json"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2), not the usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _version() -> str:
    from producers import __version__

    return f"{PROG} {__version__}"


def _hidden_alias(parser: argparse.ArgumentParser, flag: str, dest: str, **kwargs: Any) -> None:
    """An old spelling that still works but no longer shows in --help."""
    parser.add_argument(flag, dest=dest, help=argparse.SUPPRESS, **kwargs)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=_version())
    kafka = parser.add_argument_group("Kafka")
    kafka.add_argument(
        "--bootstrap-servers",
        "--bootstrap-server",
        dest="bootstrap_servers",
        default=None,
        metavar="HOST:PORT[,...]",
        help="broker list (env KAFKA_BOOTSTRAP_SERVERS, then --kafka-config's "
        "bootstrap.servers; default localhost:9092)",
    )
    kafka.add_argument(
        "--kafka-client",
        choices=BACKENDS,
        default=DEFAULT_BACKEND,
        help=f"confluent (librdkafka) | kafka-python (pure Python); default {DEFAULT_BACKEND}",
    )
    kafka.add_argument(
        "--kafka-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Kafka property, e.g. security.protocol=SSL (repeatable; wins over the file)",
    )
    kafka.add_argument(
        "--kafka-config",
        type=Path,
        metavar="FILE",
        help="Java-style .properties file of Kafka properties (as --command-config)",
    )


def _sending(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=None,
        metavar="N",
        help="message size limit (default: the topic's max.message.bytes)",
    )
    parser.add_argument(
        "--compression",
        choices=["none", "lz4", "zstd", "gzip"],
        default="none",
        help="producer compression (default none)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Feed, record, replay, collect, compare and redrive inference-worker traffic.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("publish", help="publish rows from a file or synthetic data")
    p.add_argument("--topic", required=True, metavar="TOPIC", help="request topic")
    p.add_argument("--format", choices=REQUEST_FORMATS, required=True,
                   help="request encoding; json is the Open Inference Protocol (V2) of "
                   "KServe, MLServer and Triton")
    p.add_argument("--model", metavar="NAME",
                   help="model header (default: the worker's --default-model)")
    p.add_argument("--model-version", type=int, metavar="N",
                   help="model-version header (default: newest)")
    p.add_argument(
        "--model-repository",
        type=Path,
        metavar="DIR",
        help="check --model exists and take the input's name, dtype and shape from it",
    )
    p.add_argument("--input", metavar="NAME",
                   help="input name (default: the model's only input, else x)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--from",
        dest="source",
        type=Path,
        metavar="FILE",
        help=".npy, .parquet, .arrow/.feather or .csv",
    )
    src.add_argument(
        "--synthetic",
        metavar="SHAPE",
        help="random rows of this per-row shape (784, 1,28,28; auto: the model's)",
    )
    p.add_argument("--rows", type=int, metavar="N", help="row count for --synthetic")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed for --synthetic (default 0)")
    p.add_argument(
        "--batch-rows",
        type=int,
        default=256,
        metavar="N",
        help="rows per message at most (default 256; fewer when the size limit requires)",
    )
    p.add_argument("--rate", type=float, metavar="ROWS_PER_S", help="pace to this many rows/s")
    p.add_argument("--key-column", metavar="C", help="table column whose value keys each row")
    p.add_argument("--trace", action="store_true",
                   help="start a trace per message (a fresh W3C traceparent header)")
    _progress(p)
    _sending(p)
    _common(p)

    p = sub.add_parser("record", help="capture a topic into an Arrow IPC file")
    p.add_argument("--topic", required=True, metavar="TOPIC", help="topic to record")
    p.add_argument("--out", required=True, type=Path, metavar="FILE.arrow",
                   help="the recording to write")
    p.add_argument("--max-messages", type=int, metavar="N", help="stop after N records")
    p.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="stop after S seconds (default: run until Ctrl-C or --max-messages)",
    )
    p.add_argument(
        "--from-beginning",
        action="store_true",
        help="start at the earliest offset (default: only records produced after start)",
    )
    _hidden_alias(p, "--from-latest", "from_beginning", action="store_false")
    _common(p)

    p = sub.add_parser("replay", help="re-publish a recording with its original pacing")
    p.add_argument("--in", dest="recording", required=True, type=Path, metavar="FILE.arrow",
                   help="a recording made by record")
    p.add_argument("--topic", required=True, metavar="TOPIC", help="topic to send to")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed",
        type=float,
        default=1.0,
        metavar="X",
        help="divide inter-arrival times by X (default 1)",
    )
    pace.add_argument("--max-speed", action="store_true", help="send as fast as possible")
    p.add_argument(
        "--set-header",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="replace this header on every record, repeatable (e.g. model-version=2)",
    )
    _sending(p)
    _common(p)

    p = sub.add_parser("collect", help="read responses into Arrow, Parquet or .npy")
    p.add_argument("--topic", required=True, metavar="TOPIC", help="response topic")
    p.add_argument("--out", required=True, type=Path, metavar="FILE",
                   help="collection to write: .arrow, .parquet or .npy")
    p.add_argument(
        "--expect",
        type=int,
        metavar="N",
        help="stop once N rows (samples) arrived; exit 1 if the timeout comes first",
    )
    p.add_argument(
        "--match-header",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep only responses with this header value, repeatable (e.g. model-version=2)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="give up after S seconds (default 60)",
    )
    p.add_argument(
        "--idle",
        type=float,
        default=5.0,
        metavar="S",
        help="without --expect: stop S seconds after the last response (default 5)",
    )
    p.add_argument(
        "--requests",
        type=Path,
        metavar="FILE.arrow",
        help="recording of the requests: latency from their timestamps",
    )
    p.add_argument("--output-name", metavar="NAME",
                   help="model output written to .npy (default: the first)")
    _hidden_alias(p, "--output", "output_name")
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--from-beginning",
        dest="from_beginning",
        action="store_true",
        default=True,
        help="read the topic from its earliest offset (default)",
    )
    start.add_argument(
        "--from-latest",
        dest="from_beginning",
        action="store_false",
        help="only responses produced after start",
    )
    _common(p)

    p = sub.add_parser("compare", help="compare two collections of the same requests")
    p.add_argument("a", type=Path, metavar="A", help="collection (.arrow, .parquet or .npy)")
    p.add_argument("b", type=Path, metavar="B", help="collection to compare with A")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="histogram of differences (needs the plot extra)")
    p.add_argument(
        "--top",
        type=int,
        default=10,
        metavar="K",
        help="list the K requests that disagree most (default 10)",
    )
    _common(p)

    p = sub.add_parser("redrive", help="send dead letters back to their topic")
    p.add_argument("--dlq-topic", required=True, metavar="TOPIC",
                   help="dead-letter topic to read (the worker's <input-topic>.dlq)")
    p.add_argument("--to", metavar="TOPIC",
                   help="send every record here (default: its source-topic header)")
    p.add_argument("--error-type", action="append", default=[], metavar="TYPE",
                   help="only dead letters of this error-type, repeatable")
    p.add_argument("--model", metavar="NAME", help="only dead letters for this model")
    p.add_argument("--since", metavar="TIME",
                   help="only dead letters written at or after TIME (ISO-8601 or epoch ms)")
    p.add_argument("--until", metavar="TIME",
                   help="only dead letters written before TIME (ISO-8601 or epoch ms)")
    p.add_argument("--max", type=int, metavar="N", help="send at most N records, then stop")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be sent (count per error type and model); send nothing")
    p.add_argument("--force", action="store_true",
                   help=f"also send records already redriven {MAX_REDRIVES} times")
    p.add_argument("--exactly-once", action="store_true",
                   help="send and commit in one transaction per batch: read_committed "
                   "consumers (the worker) never see a record twice, even after kill -9")
    p.add_argument("--group-id", default=REDRIVE_GROUP, metavar="GROUP",
                   help=f"consumer group on the dead-letter topic (default {REDRIVE_GROUP})")
    p.add_argument("--rate", type=float, metavar="RECORDS_PER_S",
                   help="pace to this many records/s (each record acknowledged and "
                   "committed before the next)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="give up when nothing can be read for S seconds before the end "
                   "(default 30)")
    _progress(p)
    _common(p)
    return parser


def _progress(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: only when stderr is a terminal)",
    )


def _settings(args: argparse.Namespace) -> KafkaSettings:
    # credentials from KAFKA_* variables or files, never flags
    properties = kafka_properties(args.kafka_option, args.kafka_config, os.environ,
                                  args.kafka_client)
    # the flag, the variable, then a Java client file's own bootstrap.servers
    servers = (args.bootstrap_servers or os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
               or properties.pop("bootstrap.servers", "").strip() or "localhost:9092")
    properties.pop("bootstrap.servers", None)
    return KafkaSettings(servers, properties, args.kafka_client)


def _compression(args: argparse.Namespace) -> str | None:
    return None if args.compression == "none" else str(args.compression)


def _publish(args: argparse.Namespace) -> int:
    from producers.publish import make_encoder, publish
    from producers.sources import InputSpec, model_input, read_file, synthetic

    if args.model_repository is not None:
        if args.model is None:
            raise UsageError("--model-repository needs --model")
        spec = model_input(args.model_repository, args.model, args.model_version, args.input)
    else:
        spec = InputSpec(name=args.input or "x")
    if args.synthetic is not None:
        if args.rows is None:
            raise UsageError("--synthetic needs --rows")
        if args.key_column is not None:
            raise UsageError("--key-column needs a table file (--from)")
        source = synthetic(args.synthetic, args.rows, args.seed, spec)
    else:
        if args.rows is not None:
            raise UsageError("--rows goes with --synthetic")
        source = read_file(args.source, spec, args.key_column)
    encode = make_encoder(
        fmt=args.format, input_name=spec.name, model=args.model, model_version=args.model_version
    )
    publish(
        _settings(args),
        source,
        args.topic,
        encode=encode,
        batch_rows=args.batch_rows,
        rate=args.rate,
        max_message_bytes=args.max_message_bytes,
        compression=_compression(args),
        progress=args.progress,
        trace=args.trace,
    )
    return 0


def _record(args: argparse.Namespace) -> int:
    from producers.record import record

    if args.out.suffix.lower() != ".arrow":
        raise UsageError(f"--out {str(args.out)!r}: a recording is an .arrow file")
    record(
        _settings(args),
        args.topic,
        args.out,
        max_messages=args.max_messages,
        timeout_s=args.timeout,
        from_beginning=args.from_beginning,
    )
    return 0


def _replay(args: argparse.Namespace) -> int:
    from producers.replay import parse_headers, replay

    headers = parse_headers(args.set_header)
    replay(
        _settings(args),
        args.recording,
        args.topic,
        speed=None if args.max_speed else args.speed,
        set_headers=headers,
        max_message_bytes=args.max_message_bytes,
        compression=_compression(args),
    )
    return 0


def _collect(args: argparse.Namespace) -> int:
    from producers.collect import collect
    from producers.replay import parse_headers

    match = parse_headers(args.match_header, flag="--match-header")
    result = collect(
        _settings(args),
        args.topic,
        args.out,
        expect=args.expect,
        timeout_s=args.timeout,
        idle_s=args.idle,
        requests=args.requests,
        output=args.output_name,
        from_beginning=args.from_beginning,
        match_headers=match,
    )
    return 0 if result.complete else 1


def _compare(args: argparse.Namespace) -> int:
    from producers.compare import compare, format_table, plot

    report = compare(args.a, args.b, top=args.top)
    if args.plot is not None:
        plot(report, args.plot)
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    print(json.dumps(public, indent=2) if args.json else format_table(public))
    return 0


def _redrive(args: argparse.Namespace) -> int:
    from producers.redrive import format_table, parse_time, redrive

    if args.timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout}")
    stats = redrive(
        _settings(args),
        args.dlq_topic,
        to=args.to,
        error_types=args.error_type,
        model=args.model,
        since_ms=None if args.since is None else parse_time(args.since, "--since"),
        until_ms=None if args.until is None else parse_time(args.until, "--until"),
        max_records=args.max,
        dry_run=args.dry_run,
        force=args.force,
        exactly_once=args.exactly_once,
        group_id=args.group_id,
        rate=args.rate,
        stall_s=args.timeout,
        progress=args.progress,
    )
    print(format_table(stats, dry_run=args.dry_run))
    return 0


_COMMANDS = {
    "publish": _publish,
    "record": _record,
    "replay": _replay,
    "collect": _collect,
    "compare": _compare,
    "redrive": _redrive,
}


def _quiet_clients() -> None:
    """The Kafka clients log every failed connection attempt; a tool reports the
    outcome in its one error line instead (a refused login or an unreachable
    broker is detected and named by the Kafka layer)."""
    for name in ("worker.kafka.librdkafka", "kafka"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one line (or --help)
        return int(exc.code) if isinstance(exc.code, int) else 2
    _quiet_clients()
    try:
        return _COMMANDS[args.command](args)
    except ProducerError as exc:
        print(f"{PROG} {args.command}: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
