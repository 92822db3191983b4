"""Kafka properties: one vocabulary (Kafka's own names) for both backends.

Users write what Kafka's documentation, the Java tools and librdkafka use:
``--kafka-option security.protocol=SASL_SSL``, a ``--kafka-config`` file in
Java ``.properties`` form, ``KAFKA_*`` variables for credentials. librdkafka
takes the names as they are (it refuses an unknown one when the client is
built); kafka-python gets each name mapped to its keyword, and a name it has
no keyword for is refused here, before anything connects.

Java's ``sasl.jaas.config`` (``PlainLoginModule`` / ``ScramLoginModule`` with
``username`` and ``password``, as Confluent Cloud hands it out) becomes
``sasl.username`` / ``sasl.password``, which both clients take. Every error
names where the property came from: ``--kafka-config FILE:LINE``, the
``KAFKA_*`` variable or ``--kafka-option``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import javaproperties

from worker.errors import ConfigError

__all__ = [
    "CONSUMER_ONLY",
    "JAAS_MODULES",
    "PRODUCER_ONLY",
    "check_properties",
    "credentials_from_env",
    "for_clients",
    "kafka_properties",
    "kafka_python_config",
    "parse_kafka_options",
    "read_properties",
    "translate_jaas",
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
    """``["fetch.max.bytes=1048576", "security.protocol=SSL"]`` -> ``{name: value}``;
    a ``sasl.jaas.config`` is translated (:func:`translate_jaas`)."""
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(flag, f"expected KEY=VALUE with a Kafka property name, got {pair!r}")
        options[key] = value.strip()
    if "sasl.jaas.config" in options:
        options.update(translate_jaas(options.pop("sasl.jaas.config"), flag, _mechanism(options)))
    return options


def _mechanism(properties: Mapping[str, str]) -> str | None:
    # librdkafka also takes the plural spelling
    return properties.get("sasl.mechanism") or properties.get("sasl.mechanisms")


def read_properties(path: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """A Java ``.properties`` file, as Kafka's tools take with ``--command-config``:
    ``(properties, where)``, ``where`` naming each property's ``--kafka-config FILE:LINE``.

    The format's own parser: ``=``, ``:`` or blanks between key and value,
    backslash escapes (``\\uXXXX`` too), continuation lines, ``#``/``!`` comments;
    ``sasl.jaas.config`` is translated (:func:`translate_jaas`).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("--kafka-config", f"cannot read {path}: {exc}") from None
    properties: dict[str, str] = {}
    where: dict[str, str] = {}
    line = 1
    try:
        for element in javaproperties.parse(text):
            here = f"--kafka-config {path}:{line}"
            line += element.source.count("\n")
            if isinstance(element, javaproperties.KeyValue):
                key = element.key.strip()
                if not key:
                    raise ConfigError(here, f"expected key=value, got {element.source.strip()!r}")
                properties[key] = element.value.strip()
                where[key] = here
    except javaproperties.InvalidUEscapeError as exc:
        raise ConfigError(f"--kafka-config {path}", f"bad \\u escape: {exc}") from None
    if "sasl.jaas.config" in properties:
        here = where.pop("sasl.jaas.config")
        found = translate_jaas(properties.pop("sasl.jaas.config"), here, _mechanism(properties))
        properties.update(found)
        where.update(dict.fromkeys(found, here))
    return properties, where


# Java login modules that carry a user name and password, and the
# sasl.mechanism values each goes with (the first is assumed when none is set).
JAAS_MODULES = {
    "org.apache.kafka.common.security.plain.PlainLoginModule": ("PLAIN",),
    "org.apache.kafka.common.security.scram.ScramLoginModule": ("SCRAM-SHA-512", "SCRAM-SHA-256"),
}
_JAAS = re.compile(r"\s*([\w.$]+)\s+(required|requisite|sufficient|optional)\b(.*?);?\s*", re.S)
_JAAS_OPTION = re.compile(
    r"""\s*([\w.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s"';]+)"""
)


def translate_jaas(value: str, where: str, mechanism: str | None = None) -> dict[str, str]:
    """``sasl.jaas.config`` as Java clients take it -> ``sasl.username``/``sasl.password``
    (and ``sasl.mechanism`` when ``mechanism`` is None: PLAIN or SCRAM-SHA-512).

    ``org.apache.kafka.common.security.plain.PlainLoginModule required
    username="u" password="p";`` (or ``ScramLoginModule``). Any other login
    module, option or shape, or a module that does not go with ``mechanism``,
    raises :class:`ConfigError` naming ``where`` and saying what is supported;
    the password never appears in a message.
    """
    module, options = _parse_jaas(value, where)
    short = module.rsplit(".", 1)[-1]
    unknown = sorted(set(options) - {"username", "password"})
    if unknown or not {"username", "password"} <= set(options):
        what = f"unsupported option {unknown[0]!r}" if unknown else "needs username and password"
        raise ConfigError(where, f"sasl.jaas.config: {short} {what}; {_SUPPORTED}")
    mechanisms = JAAS_MODULES[module]
    if mechanism is not None and mechanism.upper() not in mechanisms:
        raise ConfigError(
            where,
            f"sasl.jaas.config: {short} goes with sasl.mechanism {' or '.join(mechanisms)}, "
            f"not {mechanism}",
        )
    found = {"sasl.username": options["username"], "sasl.password": options["password"]}
    return found if mechanism is not None else {"sasl.mechanism": mechanisms[0], **found}


_SUPPORTED = (
    "supported: PlainLoginModule or ScramLoginModule with username and password, e.g. "
    'org.apache.kafka.common.security.plain.PlainLoginModule required username="u" password="p";'
)


def _parse_jaas(value: str, where: str) -> tuple[str, dict[str, str]]:
    """(login module, options) of a one-module JAAS line."""
    m = _JAAS.fullmatch(value)
    if not m:
        raise ConfigError(where, f"sasl.jaas.config: not a JAAS login module line; {_SUPPORTED}")
    module, _, rest = m.groups()
    if module not in JAAS_MODULES:
        raise ConfigError(
            where, f"sasl.jaas.config: login module {module} is not supported; {_SUPPORTED}"
        )
    options: dict[str, str] = {}
    pos = 0
    for opt in _JAAS_OPTION.finditer(rest):
        if opt.start() != pos:
            break
        name, raw = opt.groups()
        quoted = raw[:1] in ("'", '"')  # either quote, as Java's StreamTokenizer reads them
        options[name] = re.sub(r"\\(.)", r"\1", raw[1:-1]) if quoted else raw
        pos = opt.end()
    if rest[pos:].strip():
        raise ConfigError(
            where, f"sasl.jaas.config: cannot read the options of {module}; {_SUPPORTED}"
        )
    return module, options


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


def kafka_properties(
    config_file: str | Path | None,
    environ: Mapping[str, str],
    options: Iterable[str],
    backend: str,
) -> dict[str, str]:
    """The ``--kafka-config`` file, then ``KAFKA_*`` credentials, then ``--kafka-option``
    (the last wins), checked against ``backend``'s client before anything connects.

    A refused property is reported under where it came from: ``--kafka-config
    FILE:LINE``, its variable, or ``--kafka-option``.
    """
    properties, where = read_properties(config_file) if config_file is not None else ({}, {})
    credentials = credentials_from_env(environ)
    variables = {key: var for var, key in _CREDENTIAL_ENV.items()}
    where.update({k: variables.get(k, "KAFKA_SASL_PASSWORD_FILE") for k in credentials})
    flags = parse_kafka_options(options)
    where.update(dict.fromkeys(flags, "--kafka-option"))
    merged = {**properties, **credentials, **flags}
    check_properties(merged, backend, where)
    return merged


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
    "sasl.mechanisms": "sasl_mechanism",
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


def kafka_python_config(
    properties: Mapping[str, str], role: str, where: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """kafka-python keywords for ``role`` from Kafka property names.

    Raises :class:`ConfigError` naming a property kafka-python cannot honour,
    under ``where[name]`` (default ``--kafka-option``).
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
                (where or {}).get(name, "--kafka-option"),
                f"unknown Kafka property {name!r} for --kafka-client kafka-python",
            )
        if keyword in defaults[role]:
            out[keyword] = typed
    return out


def check_properties(
    properties: Mapping[str, str], backend: str, where: Mapping[str, str] | None = None
) -> None:
    """Refuse, before anything connects, a property the chosen client cannot take,
    naming ``where[name]`` (default ``--kafka-option``).

    librdkafka checks names and values itself: a throwaway client of each kind
    (no broker, logging off) is built from the properties it would get.
    """
    where = where or {}
    if backend == "kafka-python":
        for role in ("consumer", "producer", "admin"):
            kafka_python_config(properties, role, where)
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
            raise ConfigError(_origin(text, where), f"refused by librdkafka: {text}") from None
        if role == "consumer":
            client.close()


def _origin(text: str, where: Mapping[str, str]) -> str:
    """Where the property a librdkafka message quotes came from; else the one place
    all came from; else ``--kafka-option``."""
    quoted = re.search(r'"([\w.-]+)"', text)
    if quoted and quoted.group(1) in where:
        return where[quoted.group(1)]
    places = set(where.values())
    return places.pop() if len(places) == 1 else "--kafka-option"
