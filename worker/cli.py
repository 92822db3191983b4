"""``inference-worker``: flags, ``WORKER_*`` environment, ``--config`` file; exit codes.

The ``run`` flags are generated from :class:`worker.settings.Settings` (one
definition: name, type, range, default, help); this module maps a validation
error to the flag, variable or config file key that caused it.

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
from typing import Any, NoReturn

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from worker.errors import ConfigError, FatalError
from worker.kafka.options import kafka_properties
from worker.settings import GROUPS, ConfigFile, Settings, env_name, flags, sources

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
    for name, flag in flags().items():
        yield name, flag, Settings.model_fields[name]


def _help(info: FieldInfo, flag: str) -> str:
    text = " ".join((info.description or "").split())
    if not info.is_required() and info.default not in (None, (), False):
        text += f" (default {info.default})"
    also = _extra(info).get("also_env")
    if also:
        text += f" (also {also}, below {env_name(flag)})"
    return f"{text} [{env_name(flag)}]".replace("%", "%%")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Streaming ONNX inference on Kafka.")
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser(
        "run",
        help="consume requests, run models, produce responses",
        description="Every flag also reads the environment variable shown in brackets, "
        "and --config FILE (TOML) holds any of them under the flag's name with _ for -; "
        "a flag wins over its variable, a variable over the file.",
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


def _origin(
    field: str, flag: str, given: set[str], environ: Mapping[str, str], file: ConfigFile | None
) -> str:
    """Which flag, variable or config file key gave ``field`` its (bad) value."""
    info = Settings.model_fields.get(field)
    also = _extra(info).get("also_env") if info is not None else None
    if field in given:
        return f"--{flag}"
    if env_name(flag) in environ or (also and also in environ):
        return env_name(flag) if env_name(flag) in environ else str(also)
    if file is not None and field in file.keys:
        return f"{file.path}: {file.keys[field]}"
    return env_name(flag)


def _config_error(
    exc: ValidationError,
    given: set[str],
    environ: Mapping[str, str],
    file: ConfigFile | None,
) -> ConfigError:
    """The first validation error as one line naming the flag, variable or file key."""
    # a value given wrong says more than one not given at all
    errors = exc.errors()
    error = next((e for e in errors if e["type"] != "missing"), errors[0])
    field = str(error["loc"][0]) if error["loc"] else ""
    names = flags()
    # An alias (input_topic, WORKER_INPUT_TOPIC) names its field.
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        choices = getattr(alias, "choices", [alias]) if alias is not None else []
        if field in choices:
            field = name
    flag = names.get(field, field.replace("_", "-"))
    where = _origin(field, flag, given, environ, file)
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "missing":
        key = flag.replace("-", "_")
        return ConfigError(f"--{flag}", f"required (or set {env_name(flag)}, or {key} in --config)")
    value = error.get("input")
    scalar = isinstance(value, (str, int, float)) and not isinstance(value, bool)
    if scalar and repr(value) not in message:
        message += f", got {value!r}"
    return ConfigError(where, message)


def parse_settings(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Settings:
    """Parse ``run`` flags over the environment (``env``, else the process's) and the
    ``--config`` file; raises :class:`ConfigError` naming the flag, variable or key."""
    args = vars(_build_parser().parse_args(["run", *argv]))
    args.pop("command", None)
    environ = os.environ if env is None else env
    chain = sources(args, environ)  # raises ConfigError for a missing or malformed file
    file = next((s for s in chain if isinstance(s, ConfigFile)), None)
    try:
        # pydantic-settings' own hook for a prepared chain; its mypy plugin omits it
        settings = Settings(_build_sources=(chain, args))  # type: ignore[call-arg]
    except ValidationError as exc:
        raise _config_error(exc, set(args), environ, file) from None
    # the file, then the environment's credentials, then flags: the last wins
    properties = kafka_properties(
        settings.kafka_config, environ, settings.kafka_option, settings.kafka_client
    )
    update: dict[str, Any] = {"kafka_properties": properties}
    # A Java client file names its cluster (bootstrap.servers): it is used unless a
    # flag, variable or --config file named one, as Kafka's tools' flag wins over it.
    servers = properties.pop("bootstrap.servers", "").strip()
    if servers and "bootstrap_servers" not in settings.model_fields_set:
        update["bootstrap_servers"] = servers
    return settings.model_copy(update=update)


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

    from worker.loop import Worker
    from worker.malloc import keep_freed_memory
    from worker.observability import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    keep_freed_memory()  # before the clients' threads allocate their first buffers
    try:
        rc = Worker(settings).run()
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
