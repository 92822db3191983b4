"""Kafka properties: one vocabulary (Kafka's own names) for both backends.

Users write what Kafka's documentation, the Java tools and librdkafka use:
``--kafka-option security.protocol=SASL_SSL``, a ``--kafka-config`` file in
Java ``.properties`` form, ``KAFKA_*`` variables for credentials. librdkafka
takes the names as they are (it refuses an unknown one when the client is
built); kafka-python gets each name mapped to its keyword, and a name it has
no keyword for is refused here, before anything connects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from worker.errors import ConfigError

__all__ = [
    "CONSUMER_ONLY",
    "PRODUCER_ONLY",
    "check_properties",
    "credentials_from_env",
    "for_clients",
    "kafka_python_config",
    "parse_kafka_options",
    "read_properties_file",
]

# librdkafka properties that only one side accepts ("C"/"P" in its
# CONFIGURATION.md); everything else is global and goes to every client.
# A property given to the wrong side only earns a warning from librdkafka, but
# routing keeps the logs clean.
CONSUMER_ONLY = frozenset(
    [
        "group.id",
        "group.instance.id",
        "partition.assignment.strategy",
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "group.protocol.type",
        "group.protocol",
        "group.remote.assignor",
        "coordinator.query.interval.ms",
        "max.poll.interval.ms",
        "enable.auto.commit",
        "auto.commit.interval.ms",
        "enable.auto.offset.store",
        "queued.min.messages",
        "queued.max.messages.kbytes",
        "fetch.wait.max.ms",
        "fetch.queue.backoff.ms",
        "fetch.message.max.bytes",
        "max.partition.fetch.bytes",
        "fetch.max.bytes",
        "fetch.min.bytes",
        "fetch.error.backoff.ms",
        "isolation.level",
        "enable.partition.eof",
        "check.crcs",
        "auto.offset.reset",
        "consume.callback.max.messages",
    ]
)
PRODUCER_ONLY = frozenset(
    [
        "transactional.id",
        "transaction.timeout.ms",
        "enable.idempotence",
        "enable.gapless.guarantee",
        "queue.buffering.max.messages",
        "queue.buffering.max.kbytes",
        "queue.buffering.max.ms",
        "linger.ms",
        "message.send.max.retries",
        "retries",
        "retry.backoff.ms",
        "retry.backoff.max.ms",
        "queue.buffering.backpressure.threshold",
        "compression.codec",
        "compression.type",
        "batch.num.messages",
        "batch.size",
        "delivery.report.only.error",
        "sticky.partitioning.linger.ms",
        "request.required.acks",
        "acks",
        "request.timeout.ms",
        "message.timeout.ms",
        "delivery.timeout.ms",
        "partitioner",
        "compression.level",
    ]
)


def parse_kafka_options(pairs: Iterable[str], flag: str = "--kafka-option") -> dict[str, str]:
    """``["fetch.max.bytes=1048576", "security.protocol=SSL"]`` -> ``{name: value}``."""
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(flag, f"expected KEY=VALUE with a Kafka property name, got {pair!r}")
        options[key] = value.strip()
    return options


def read_properties_file(path: str | Path, flag: str = "--kafka-config") -> dict[str, str]:
    """A Java-style ``.properties`` file (``key=value`` or ``key: value``, ``#``/``!``
    comments), as Kafka's tools take with ``--command-config``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(flag, f"cannot read {path}: {exc}") from None
    options: dict[str, str] = {}
    lines = iter(text.splitlines())
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        while line.endswith("\\"):  # a continued line
            line = line[:-1] + next(lines, "").strip()
        if not line or line[0] in "#!":
            continue
        cut = min((i for i in (line.find("="), line.find(":")) if i >= 0), default=-1)
        if cut <= 0:
            raise ConfigError(flag, f"{path}:{number}: expected key=value, got {line!r}")
        options[line[:cut].strip()] = line[cut + 1 :].strip()
    return options


# Credentials come from the environment (a Kubernetes Secret) or files, never
# from flags, which show up in `ps` and shell history.
_CREDENTIAL_ENV = {
    "KAFKA_SECURITY_PROTOCOL": "security.protocol",
    "KAFKA_SASL_MECHANISM": "sasl.mechanism",
    "KAFKA_SASL_USERNAME": "sasl.username",
    "KAFKA_SASL_PASSWORD": "sasl.password",
    "KAFKA_SSL_CAFILE": "ssl.ca.location",
    "KAFKA_SSL_CERTFILE": "ssl.certificate.location",
    "KAFKA_SSL_KEYFILE": "ssl.key.location",
}


def credentials_from_env(env: Mapping[str, str]) -> dict[str, str]:
    """Security properties from ``KAFKA_*`` variables.

    ``KAFKA_SASL_PASSWORD_FILE`` (a mounted Secret) is read when
    ``KAFKA_SASL_PASSWORD`` is not set. Raises :class:`ConfigError` naming the
    variable, never the value.
    """
    options = {key: env[var] for var, key in _CREDENTIAL_ENV.items() if env.get(var)}
    path = env.get("KAFKA_SASL_PASSWORD_FILE")
    if path and "sasl.password" not in options:
        try:
            options["sasl.password"] = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                "KAFKA_SASL_PASSWORD_FILE", f"cannot read {path}: {exc.strerror}"
            ) from None
    for key in ("ssl.ca.location", "ssl.certificate.location", "ssl.key.location"):
        if key in options and not Path(options[key]).is_file():
            var = next(v for v, k in _CREDENTIAL_ENV.items() if k == key)
            raise ConfigError(var, f"no such file: {options[key]}")
    return options


def for_clients(properties: Mapping[str, str], role: str) -> dict[str, str]:
    """The librdkafka properties a ``role`` ("consumer", "producer", "admin") accepts."""
    skip = {
        "consumer": PRODUCER_ONLY,
        "producer": CONSUMER_ONLY,
        "admin": CONSUMER_ONLY | PRODUCER_ONLY,
    }[role]
    return {k: v for k, v in properties.items() if k not in skip}


# Kafka / librdkafka names whose kafka-python keyword is not the dotted name
# with underscores.
_KAFKA_PYTHON_ALIASES = {
    "sasl.username": "sasl_plain_username",
    "sasl.password": "sasl_plain_password",
    "ssl.ca.location": "ssl_cafile",
    "ssl.certificate.location": "ssl_certfile",
    "ssl.key.location": "ssl_keyfile",
    "ssl.key.password": "ssl_password",
    "ssl.crl.location": "ssl_crlfile",
    "message.max.bytes": "max_request_size",
    "fetch.message.max.bytes": "max_partition_fetch_bytes",
    "compression.codec": "compression_type",
    "request.required.acks": "acks",
    "message.timeout.ms": "delivery_timeout_ms",
    "socket.timeout.ms": "request_timeout_ms",
}


def _coerce(value: str) -> Any:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if value.lstrip("-").isdigit():
        return int(value)
    try:
        return float(value)
    except ValueError:
        return value


def kafka_python_config(properties: Mapping[str, str], role: str) -> dict[str, Any]:
    """kafka-python keywords for ``role`` from Kafka property names.

    Raises :class:`ConfigError` naming a property kafka-python cannot honour.
    """
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient

    defaults = {
        "consumer": KafkaConsumer.DEFAULT_CONFIG,
        "producer": KafkaProducer.DEFAULT_CONFIG,
        "admin": KafkaAdminClient.DEFAULT_CONFIG,
    }
    known = set().union(*(d for d in defaults.values()))
    out: dict[str, Any] = {}
    for name, value in properties.items():
        if name == "ssl.endpoint.identification.algorithm":
            keyword, typed = "ssl_check_hostname", bool(value.lower() == "https")
        else:
            keyword = _KAFKA_PYTHON_ALIASES.get(name, name.replace(".", "_").replace("-", "_"))
            typed = _coerce(value)
        if keyword not in known:
            raise ConfigError(
                "--kafka-option",
                f"unknown Kafka property {name!r} for --kafka-client kafka-python",
            )
        if keyword in defaults[role]:
            out[keyword] = typed
    return out


def check_properties(properties: Mapping[str, str], backend: str) -> None:
    """Refuse, before anything connects, a property the chosen client cannot take.

    librdkafka checks names and values itself: a throwaway client of each kind
    (no broker, logging off) is built from the properties it would get.
    """
    if backend == "kafka-python":
        for role in ("consumer", "producer", "admin"):
            kafka_python_config(properties, role)
        return
    import confluent_kafka as ck

    quiet = {"log_level": 0}
    for role, factory, extra in (
        ("consumer", ck.Consumer, {"group.id": "check"}),
        ("producer", ck.Producer, {}),
    ):
        props = for_clients(properties, role)
        try:
            client = factory({**props, **extra, **quiet})
        except ck.KafkaException as exc:
            error = exc.args[0]
            text = error.str() if hasattr(error, "str") else str(exc)
            raise ConfigError("--kafka-option", f"refused by librdkafka: {text}") from None
        if role == "consumer":
            client.close()
