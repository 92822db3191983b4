"""The one settings definition of the worker.

Every field is a flag of ``inference-worker run`` and a ``WORKER_<FLAG>``
environment variable; its docstring is its ``--help`` line, its
``json_schema_extra`` names the help group (and, where they differ, the flag
and the metavar). :mod:`worker.cli` builds the parser from this class and
maps validation errors to flag names; nothing below the CLI knows a flag.

Where a value comes from, highest first (:func:`sources`): the flag, its
``WORKER_*`` variable, ``KAFKA_BOOTSTRAP_SERVERS`` (bootstrap servers only),
the ``--config`` TOML file (keys are flag names with ``_`` for ``-``), the
default. Each is a pydantic-settings source, so one validation covers all.

Kafka properties are the exception: ``--kafka-option`` / ``--kafka-config`` /
``KAFKA_*`` credentials are merged by the CLI into ``kafka_properties``, which
keeps Kafka's own names (:mod:`worker.kafka.options` routes them per client)
and stays out of ``repr`` because it may hold a password.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BeforeValidator, Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings.sources.utils import parse_env_vars

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the same parser, before it joined the standard library
    import tomli as tomllib

from worker.batching import ALONE_ROWS
from worker.errors import ConfigError
from worker.kafka import BACKENDS
from worker.observability import DEFAULT_METRICS_PORT

__all__ = [
    "GROUPS",
    "KAFKA_BOOTSTRAP_ENV",
    "MAX_MESSAGE_BYTES",
    "ConfigFile",
    "Environment",
    "KafkaBootstrapServers",
    "Settings",
    "env_name",
    "flags",
    "parse_size",
    "sources",
]

# Raised together on broker (scripts/kafka-local), producer and consumer: a
# 1024-row float32 batch of the demo MLP is 3 MiB; 16 MiB leaves room for
# wider models without tuning.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

GROUPS = {
    "config": "configuration file",
    "kafka": "Kafka",
    "models": "models and runtime",
    "batching": "batching",
    "delivery": "delivery",
    "observability": "observability",
}

# Kafka's tools and inference-producer read it; below WORKER_BOOTSTRAP_SERVERS.
KAFKA_BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*", re.IGNORECASE)


def parse_size(value: object) -> int | None:
    """Bytes from ``512M``, ``64Mi``, ``1.5G``, ``2KiB`` or a plain number (binary units)."""
    if value is None or isinstance(value, int):
        return value
    text = str(value)
    if text.strip().lower() in ("", "none"):
        return None
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"expected a size like 512M, 64Mi or 1.5G, got {text!r}")
    n = int(float(m.group(1)) * (1 << (10 * " kmgt".index(m.group(2).lower() or " "))))
    if n <= 0:
        raise ValueError(f"expected a positive size, got {text!r}")
    return n


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if isinstance(value, (list, tuple)):
        return tuple(p.strip() for item in value for p in str(item).split(",") if p.strip())
    return value


def _lines(value: object) -> object:
    # KEY=VALUE pairs: a value may hold commas, so the environment separates them by newlines.
    if isinstance(value, str):
        return tuple(line for line in value.splitlines() if line.strip())
    return value


def _preload(value: object) -> object:
    items = _comma_list(value)
    if not isinstance(items, tuple):
        return items
    out = []
    for item in items:
        if not isinstance(item, str):
            out.append(item)
            continue
        name, _, version = item.partition(":")
        if not name or (version and not (version.isdigit() and int(version) > 0)):
            raise ValueError(f"expected NAME[:VERSION] with a positive version, got {item!r}")
        out.append((name, int(version) if version else None))
    return tuple(out)


def _optional_path(value: object) -> object:
    return None if isinstance(value, str) and not value.strip() else value


Size = Annotated[int, BeforeValidator(parse_size), Field(gt=0)]
OptionalSize = Annotated[int | None, BeforeValidator(parse_size)]
TopicList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_comma_list)]


def _meta(group: str, **extra: Any) -> dict[str, Any]:
    """What the CLI needs beyond the type: the help group, and the flag and metavar
    where they differ from the field's name."""
    return {"group": group, **extra}


class Settings(BaseSettings):
    """Everything ``inference-worker run`` can be told; frozen once built."""

    model_config = SettingsConfigDict(
        env_prefix="WORKER_",
        frozen=True,
        extra="forbid",
        populate_by_name=True,
        use_attribute_docstrings=True,
        validate_default=False,
    )

    # -- configuration file ------------------------------------------------------
    config: Path | None = Field(None, json_schema_extra=_meta("config", metavar="FILE"))
    """TOML file of any of these settings under the flag's name with _ for -
    (max_batch_rows = 512); flags and variables win over it."""

    # -- Kafka -------------------------------------------------------------------
    bootstrap_servers: str = Field(
        "localhost:9092",
        json_schema_extra=_meta("kafka", metavar="HOST:PORT,...", also_env=KAFKA_BOOTSTRAP_ENV),
    )
    """Kafka bootstrap servers."""
    input_topics: TopicList = Field(
        validation_alias=AliasChoices("input_topics", "input_topic", "WORKER_INPUT_TOPIC"),
        min_length=1,
        json_schema_extra=_meta("kafka", flag="input-topic", metavar="TOPIC", repeat=True),
    )
    """Topics to consume, repeatable or comma-separated (required); all share one group."""
    output_topic: str = Field(min_length=1, json_schema_extra=_meta("kafka", metavar="TOPIC"))
    """Where responses go (required)."""
    dlq_topic: str | None = Field(None, json_schema_extra=_meta("kafka", metavar="TOPIC"))
    """Dead-letter topic (default <first input topic>.dlq)."""
    group_id: str = Field("inference-worker", json_schema_extra=_meta("kafka", metavar="GROUP"))
    """Consumer group; workers of one group share the input partitions."""
    kafka_client: Literal["confluent", "kafka-python"] = Field(
        "confluent", json_schema_extra=_meta("kafka", metavar="|".join(BACKENDS))
    )
    """Kafka client: confluent (librdkafka, fast) or kafka-python (pure Python)."""
    kafka_option: Annotated[tuple[str, ...], NoDecode, BeforeValidator(_lines)] = Field(
        (), json_schema_extra=_meta("kafka", metavar="KEY=VALUE", repeat=True, split=False)
    )
    """Kafka property by its Kafka name, e.g. fetch.max.bytes=1048576 (repeatable)."""
    kafka_config: Path | None = Field(None, json_schema_extra=_meta("kafka", metavar="FILE"))
    """Java-style .properties file of Kafka properties (--kafka-option wins)."""
    kafka_properties: dict[str, str] = Field(default_factory=dict, repr=False, exclude=True)
    """Merged by the CLI from the file, KAFKA_* credentials and --kafka-option (not a flag)."""
    max_message_bytes: Size = Field(
        MAX_MESSAGE_BYTES, json_schema_extra=_meta("kafka", metavar="SIZE")
    )
    """Largest Kafka record the clients accept (match the broker's message.max.bytes)."""

    # -- models and runtime ----------------------------------------------------
    model_repository: Path = Field(json_schema_extra=_meta("models", metavar="DIR"))
    """Model repository directory: DIR/<name>/<version>/model.onnx or DIR/<name>.onnx (required)."""
    default_model: str | None = Field(None, json_schema_extra=_meta("models", metavar="NAME"))
    """Model for requests that name none."""
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", json_schema_extra=_meta("models")
    )
    """auto | cpu | cuda[:N]: auto takes CUDA when it is usable, else the CPU (logged)."""
    cache_max_models: int = Field(4, gt=0, json_schema_extra=_meta("models", metavar="N"))
    """Sessions kept loaded (least recently used evicted first)."""
    cache_max_bytes: OptionalSize = Field(
        None, gt=0, json_schema_extra=_meta("models", metavar="SIZE")
    )
    """Byte budget of loaded sessions (K/M/G suffix)."""
    preload: Annotated[tuple[tuple[str, int | None], ...], NoDecode, BeforeValidator(_preload)] = (
        Field((), json_schema_extra=_meta("models", metavar="NAME[:VERSION]", repeat=True))
    )
    """Loaded at start and never evicted (repeatable or comma-separated)."""
    intra_op_threads: int = Field(1, gt=0, json_schema_extra=_meta("models", metavar="N"))
    """ONNX Runtime threads per run; the Kafka client needs a core too."""
    inference_threads: int = Field(1, gt=0, json_schema_extra=_meta("models", metavar="N"))
    """Runs in parallel, each on its own thread (ONNX Runtime releases the GIL)."""
    inline_below_ms: float = Field(1.0, ge=0, json_schema_extra=_meta("models", metavar="MS"))
    """A model whose runs average less than this runs on the polling thread: handing
    a short run to an inference thread costs more than it overlaps (the GIL and the
    caches go back and forth between two threads: a quarter more CPU per message on
    16-row requests); 0, never."""
    optimized_dir: Annotated[Path | None, BeforeValidator(_optional_path)] = Field(
        Path(tempfile.gettempdir()) / "inference-worker-optimized",
        json_schema_extra=_meta("models", metavar="DIR"),
    )
    """Cache of ONNX Runtime's optimized graphs, so a reload skips optimizing ('' turns it off)."""
    response_cache_size: int = Field(0, ge=0, json_schema_extra=_meta("models", metavar="N"))
    """Answer identical requests (same bytes, same model version) from memory (0: off)."""
    cuda_mem_limit: OptionalSize = Field(
        None, gt=0, json_schema_extra=_meta("models", metavar="SIZE")
    )
    """The CUDA arena's limit per session (K/M/G suffix; none: no limit)."""
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] | None = Field(
        None, json_schema_extra=_meta("models", metavar="EXHAUSTIVE|HEURISTIC|DEFAULT")
    )
    """cuDNN convolution algorithm search (default HEURISTIC: batch sizes vary)."""

    # -- batching ------------------------------------------------------------------
    max_batch_rows: int = Field(1024, gt=0, json_schema_extra=_meta("batching", metavar="N"))
    """Rows per coalesced run; larger requests are sliced."""
    max_batch_delay_ms: float = Field(5.0, ge=0, json_schema_extra=_meta("batching", metavar="MS"))
    """The longest a request waits for company while every run slot is busy (one that
    finds a slot free runs at once)."""
    coalesce_below_rows: int = Field(
        ALONE_ROWS, gt=0, json_schema_extra=_meta("batching", metavar="N")
    )
    """Requests with at least this many rows run alone on their zero-copy view. Below
    it, requests that arrive together share a run: 64-row ones in runs of up to 1,024
    rows cost a quarter less CPU per message than alone, the copy included; from 256
    rows the copy costs more than the runs it saves."""
    max_request_bytes: OptionalSize = Field(
        None, gt=0, json_schema_extra=_meta("batching", metavar="SIZE")
    )
    """Largest request value decoded (default: --max-message-bytes); larger: too-large."""
    max_request_rows: int = Field(1_000_000, gt=0, json_schema_extra=_meta("batching", metavar="N"))
    """Most rows in one request; more: too-large."""

    # -- delivery --------------------------------------------------------------
    output_format: Literal["same", "arrow", "msgpack", "json"] = Field(
        "same", json_schema_extra=_meta("delivery", metavar="same|arrow|msgpack|json")
    )
    """Format of the answers: the request's own, or one forced."""
    exactly_once: bool = Field(False, json_schema_extra=_meta("delivery", switch=True))
    """Transactions: answers, dead letters and offsets commit together."""
    transactional_id: str | None = Field(None, json_schema_extra=_meta("delivery", metavar="ID"))
    """With --exactly-once (default <group-id>-<hostname>-<pid>)."""
    retry_attempts: int = Field(3, ge=0, json_schema_extra=_meta("delivery", metavar="N"))
    """Retries of a transient failure (out of memory, a model still being written)."""
    retry_backoff_ms: float = Field(100.0, ge=0, json_schema_extra=_meta("delivery", metavar="MS"))
    """Wait before the first retry; doubles each time, capped at 5 s."""
    commit_interval_ms: float = Field(
        200.0, ge=0, json_schema_extra=_meta("delivery", metavar="MS")
    )
    """How often acknowledged progress is committed."""
    max_inflight_bytes: Size = Field(
        64 * 1024 * 1024, json_schema_extra=_meta("delivery", metavar="SIZE")
    )
    """Bytes polled but not yet committed; at it the loop stops polling, and after a
    second the fullest partitions pause."""
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        validation_alias=AliasChoices("drain_timeout_s", "drain_timeout", "WORKER_DRAIN_TIMEOUT"),
        json_schema_extra=_meta("delivery", flag="drain-timeout", metavar="SECONDS"),
    )
    """Upper bound on the drain after SIGTERM; keep it below Kubernetes'
    terminationGracePeriodSeconds (the manifests use 45 s)."""

    # -- observability ---------------------------------------------------------
    metrics_port: int = Field(
        DEFAULT_METRICS_PORT,
        ge=0,
        le=65535,
        json_schema_extra=_meta("observability", metavar="PORT"),
    )
    """Port of /metrics, /healthz, /readyz (0: any free port)."""
    metrics_bind: str = Field(
        "0.0.0.0", json_schema_extra=_meta("observability", metavar="ADDRESS")
    )
    """Address the metrics and health server listens on."""
    log_format: Literal["text", "json"] = Field("text", json_schema_extra=_meta("observability"))
    """text | json (one object per line, ISO-8601 UTC timestamps)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", json_schema_extra=_meta("observability")
    )
    """DEBUG | INFO | WARNING | ERROR."""

    @field_validator("model_repository")
    @classmethod
    def _a_directory(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"{str(value)!r} is not a directory")
        return value

    @field_validator("kafka_config")
    @classmethod
    def _a_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {str(value)!r}")
        return value

    @field_validator("kafka_option")
    @classmethod
    def _pairs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pair in value:
            key, sep, _ = pair.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"expected KEY=VALUE with a Kafka property name, got {pair!r}")
        return value

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or f"{self.input_topics[0]}.dlq"

    @property
    def txn_id(self) -> str:
        # Stable across restarts of one pod (its hostname; the pid is 1 in a
        # container), never shared by two workers on one host.
        return self.transactional_id or f"{self.group_id}-{socket.gethostname()}-{os.getpid()}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Settings(...) in code reads the process environment; the CLI builds the same
        # chain over the environment it was given (sources()).
        given = init_settings.init_kwargs if isinstance(init_settings, InitSettingsSource) else {}
        return (init_settings, *sources(given, os.environ)[1:])


def flags() -> dict[str, str]:
    """Field name -> flag name (without ``--``) of every field that is a flag."""
    out = {}
    for name, info in Settings.model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and "group" in extra:
            out[name] = str(extra.get("flag", name.replace("_", "-")))
    return out


def env_name(flag: str) -> str:
    """The variable a flag also reads: ``max-batch-rows`` -> ``WORKER_MAX_BATCH_ROWS``."""
    return "WORKER_" + flag.upper().replace("-", "_")


class Environment(EnvSettingsSource):
    """``WORKER_*`` variables, read from the mapping given (the process environment
    for the CLI, a plain dict in tests)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(
            self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )


class KafkaBootstrapServers(PydanticBaseSettingsSource):
    """``KAFKA_BOOTSTRAP_SERVERS``, as Kafka's tools read it: the bootstrap servers only."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.value = environ.get(KAFKA_BOOTSTRAP_ENV, "").strip()

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if field_name == "bootstrap_servers" and self.value:
            return self.value, KAFKA_BOOTSTRAP_ENV, False
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return {"bootstrap_servers": self.value} if self.value else {}


class ConfigFile(TomlConfigSettingsSource):
    """The ``--config`` TOML file: run settings under their flag names, ``_`` for ``-``.

    A missing file, bad TOML or a key that is no flag raises :class:`ConfigError`
    naming the file (and the key); ``keys`` maps each field read back to the
    file's spelling, so a bad value is reported as the file's line would say it.
    """

    def __init__(self, settings_cls: type[BaseSettings], path: Path, named_by: str) -> None:
        self.path = path
        self.named_by = named_by
        self.keys: dict[str, str] = {}
        if not path.is_file():
            raise ConfigError(named_by, f"no such file: {str(path)!r}")
        super().__init__(settings_cls, toml_file=path)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            with open(file_path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(self.named_by, f"cannot read {file_path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(file_path), f"not valid TOML: {exc}") from None
        fields = {flag.replace("-", "_"): name for name, flag in flags().items()}
        del fields["config"]
        out = {}
        for key, value in data.items():
            if key == "config":
                raise ConfigError(f"{file_path}: {key}", "a config file cannot name another")
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(
                    f"{file_path}: {key}",
                    f"unknown key: not a flag of inference-worker run{hint}",
                )
            self.keys[fields[key]] = key
            out[fields[key]] = value
        return out


def sources(
    given: Mapping[str, Any], environ: Mapping[str, str]
) -> tuple[PydanticBaseSettingsSource, ...]:
    """The sources of a run's settings, highest first: ``given`` (flags, by field
    name), ``WORKER_*`` variables, ``KAFKA_BOOTSTRAP_SERVERS``, the ``--config`` file.

    The file is the ``config`` flag's, else ``WORKER_CONFIG``'s.
    """
    chain: list[PydanticBaseSettingsSource] = [
        InitSettingsSource(Settings, init_kwargs=dict(given)),
        Environment(Settings, environ),
        KafkaBootstrapServers(Settings, environ),
    ]
    if given.get("config"):
        chain.append(ConfigFile(Settings, Path(given["config"]), "--config"))
    elif environ.get(env_name("config"), "").strip():
        chain.append(ConfigFile(Settings, Path(environ[env_name("config")]), env_name("config")))
    return tuple(chain)
