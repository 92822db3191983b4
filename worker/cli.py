"""``inference-worker``: flags <-> ``WORKER_*`` environment, exit codes; nothing else.

The ``run`` flags are generated from :class:`worker.settings.Settings` (one
definition: name, type, range, default, help); this module maps a validation
error to the flag or variable that caused it.

Exit status: 0 after SIGTERM/SIGINT with everything drained; 2 for a
configuration error (one line naming the flag); 1 for a fatal runtime error.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn
from unittest import mock

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from worker.errors import ConfigError, FatalError
from worker.kafka.options import (
    check_properties,
    credentials_from_env,
    parse_kafka_options,
    read_properties_file,
)
from worker.settings import GROUPS, Settings

__all__ = ["entry", "main", "parse_settings", "version"]

PROG = "inference-worker"
log = logging.getLogger("worker")

# Spelled as Kafka's own tools spell them, next to the canonical flag.
_ALIASES = {"bootstrap-servers": ["--bootstrap-server"]}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as every configuration error: the flag and why.
        self.exit(2, f"{self.prog}: {message}\n")


def _extra(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _flags() -> Iterator[tuple[str, str, FieldInfo]]:
    """(field, flag, info) for every field that is a flag."""
    for name, info in Settings.model_fields.items():
        if "group" in _extra(info):
            yield name, str(_extra(info).get("flag", name.replace("_", "-"))), info


def _env_name(flag: str) -> str:
    return "WORKER_" + flag.upper().replace("-", "_")


def _help(info: FieldInfo, flag: str) -> str:
    text = " ".join((info.description or "").split())
    if not info.is_required() and info.default not in (None, (), False):
        text += f" (default {info.default})"
    return f"{text} [{_env_name(flag)}]".replace("%", "%%")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Streaming ONNX inference on Kafka.")
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser(
        "run",
        help="consume requests, run models, produce responses",
        description="Every flag also reads the environment variable shown in brackets; "
        "a flag wins over its variable.",
        argument_default=argparse.SUPPRESS,
    )
    run.add_argument("--version", action="version", version=f"{PROG} {version()}")
    groups = {key: run.add_argument_group(title) for key, title in GROUPS.items()}
    for name, flag, info in _flags():
        extra = _extra(info)
        group = groups[extra["group"]]
        names = [f"--{flag}", *_ALIASES.get(flag, [])]
        kwargs: dict[str, Any] = {"dest": name, "help": _help(info, flag)}
        if extra.get("switch"):
            group.add_argument(*names, action="store_true", **kwargs)
            continue
        kwargs["metavar"] = extra.get("metavar", flag.split("-")[-1].upper())
        if extra.get("repeat"):
            group.add_argument(*names, action="append", **kwargs)
        else:
            group.add_argument(*names, **kwargs)
    sub.add_parser(
        "optimize",
        help="write a faster version of a model, behind an accuracy gate (optimize --help)",
        add_help=False,
    )
    return parser


@contextmanager
def _environment(env: Mapping[str, str] | None) -> Iterator[Mapping[str, str]]:
    """``env`` in place of the process environment while settings are read (tests)."""
    if env is None:
        yield os.environ
        return
    with mock.patch.dict(os.environ, env, clear=True):
        yield env


def _config_error(exc: ValidationError, given: set[str]) -> ConfigError:
    """The first validation error as one line naming the flag (or the variable)."""
    error = exc.errors()[0]
    field = str(error["loc"][0]) if error["loc"] else ""
    flags = {name: flag for name, flag, _ in _flags()}
    # An alias (input_topic, WORKER_INPUT_TOPIC) names its field.
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        choices = getattr(alias, "choices", [alias]) if alias is not None else []
        if field in choices:
            field = name
    flag = flags.get(field, field.replace("_", "-"))
    where = f"--{flag}" if field in given else _env_name(flag)
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "missing":
        return ConfigError(f"--{flag}", f"required (or set {_env_name(flag)})")
    value = error.get("input")
    scalar = isinstance(value, (str, int, float)) and not isinstance(value, bool)
    if scalar and repr(value) not in message:
        message += f", got {value!r}"
    return ConfigError(where, message)


def parse_settings(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Settings:
    """Parse ``run`` flags over the environment; raises :class:`ConfigError` naming the flag."""
    args = vars(_build_parser().parse_args(["run", *argv]))
    args.pop("command", None)
    with _environment(env) as environ:
        try:
            settings = Settings(**args)
        except ValidationError as exc:
            raise _config_error(exc, set(args)) from None
        properties = {
            # the file, then the environment's credentials, then flags: the last wins
            **(read_properties_file(settings.kafka_config) if settings.kafka_config else {}),
            **credentials_from_env(environ),
            **parse_kafka_options(settings.kafka_option),
        }
    check_properties(properties, settings.kafka_client)
    return settings.model_copy(update={"kafka_properties": properties})


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
    if command == "optimize":  # its own flags and parser: worker/optimize/cli.py
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
