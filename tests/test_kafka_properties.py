"""Kafka properties as Java users bring them: .properties files, sasl.jaas.config, origins."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from producers.clients import kafka_properties as producer_properties
from producers.errors import UsageError
from worker.cli import parse_settings
from worker.errors import ConfigError
from worker.kafka.options import (
    kafka_properties,
    kafka_python_config,
    parse_kafka_options,
    read_properties,
    translate_jaas,
)

PLAIN = "org.apache.kafka.common.security.plain.PlainLoginModule"
SCRAM = "org.apache.kafka.common.security.scram.ScramLoginModule"

CLOUD = f"""\
# Required connection configs for Kafka producer, consumer, and admin
bootstrap.servers=pkc-00000.europe-west1.gcp.confluent.cloud:9092
security.protocol=SASL_SSL
sasl.mechanism=PLAIN
sasl.jaas.config={PLAIN} required username='KEY' password='SECRET';
"""


def _file(tmp_path: Path, text: str, name: str = "client.properties") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_the_formats_separators_escapes_and_continuations(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        "# comment\n"
        "! another comment\n"
        "\n"
        "a.b=1\n"
        "c.d : two\n"
        "e.f three\n"
        "g.h=one\\\n"
        "    more\n"
        "key\\ with\\=odd\\:chars = v\n"
        "u.e=caf\\u00e9\\tx\n"
        "   indented.key  =  trimmed  \n",
    )
    props, where = read_properties(path)
    assert props == {
        "a.b": "1",
        "c.d": "two",
        "e.f": "three",
        "g.h": "onemore",
        "key with=odd:chars": "v",
        "u.e": "caf\u00e9\tx",
        "indented.key": "trimmed",
    }
    # line numbers count comments, blanks and continued lines
    assert where["a.b"] == f"--kafka-config {path}:4"
    assert where["g.h"] == f"--kafka-config {path}:7"
    assert where["key with=odd:chars"] == f"--kafka-config {path}:9"
    assert where["indented.key"] == f"--kafka-config {path}:11"


def test_a_bad_unicode_escape_names_the_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "a=\\u12G4\n")
    with pytest.raises(ConfigError) as info:
        read_properties(path)
    assert str(path) in info.value.flag


@pytest.mark.parametrize(
    ("jaas", "mechanism", "expected"),
    [
        (f'{PLAIN} required username="u" password="p";', None, ("PLAIN", "u", "p")),
        (f"{SCRAM} required username=u password=p;", None, ("SCRAM-SHA-512", "u", "p")),
        (f'{SCRAM} required username="u" password="p"', "SCRAM-SHA-256", (None, "u", "p")),
        (f'  {PLAIN}   required\n username = "u"\n password = "p;q=\\"r\\"" ; ', "PLAIN",
         (None, "u", 'p;q="r"')),
    ],
)
def test_jaas_becomes_username_and_password(
    jaas: str, mechanism: str | None, expected: tuple[str | None, str, str]
) -> None:
    found = translate_jaas(jaas, "here", mechanism)
    assert found.get("sasl.mechanism") == expected[0]
    assert (found["sasl.username"], found["sasl.password"]) == expected[1:]


@pytest.mark.parametrize(
    ("jaas", "mechanism", "why"),
    [
        ("com.sun.security.auth.module.Krb5LoginModule required useKeyTab=true;", None,
         "login module com.sun.security.auth.module.Krb5LoginModule is not supported"),
        ("org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required;", None,
         "is not supported"),
        (f'{PLAIN} required username="u";', None, "needs username and password"),
        (f'{PLAIN} required username="u" password="p" unsecuredLoginStringClaim_sub="x";', None,
         "unsupported option"),
        (f'{PLAIN} required username="u" password="p" junk;', None, "cannot read the options"),
        ("username=u password=p", None, "not a JAAS login module line"),
        (f'{PLAIN} required username="u" password="p";', "SCRAM-SHA-512", "goes with"),
        (f'{SCRAM} required username="u" password="p";', "PLAIN", "goes with"),
    ],
)
def test_jaas_refusals_say_what_is_supported(jaas: str, mechanism: str | None, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        translate_jaas(jaas, "--kafka-config f:3", mechanism)
    assert info.value.flag == "--kafka-config f:3"
    assert why in info.value.reason
    assert "SECRET" not in str(info.value)


def test_a_confluent_cloud_file_for_both_clients(tmp_path: Path) -> None:
    path = _file(tmp_path, CLOUD.replace("bootstrap.servers=", "#"))
    for backend in ("confluent", "kafka-python"):
        props = kafka_properties(path, {}, [], backend)
        assert props["sasl.username"] == "KEY" and "sasl.jaas.config" not in props
    assert props["sasl.password"] == "SECRET" and props["sasl.mechanism"] == "PLAIN"
    kp = kafka_python_config(props, "consumer")
    assert (kp["sasl_plain_username"], kp["sasl_plain_password"]) == ("KEY", "SECRET")
    assert kp["sasl_mechanism"] == "PLAIN" and kp["security_protocol"] == "SASL_SSL"
    # librdkafka's plural spelling of the mechanism, for either client
    plural = _file(tmp_path, CLOUD.replace("sasl.mechanism=", "sasl.mechanisms="), "c2.properties")
    kp = kafka_python_config(kafka_properties(plural, {}, [], "kafka-python"), "producer")
    assert kp["sasl_mechanism"] == "PLAIN"


def test_jaas_through_kafka_option_too() -> None:
    jaas = f'sasl.jaas.config={SCRAM} required username="u" password="p";'
    found = parse_kafka_options(["sasl.mechanism=SCRAM-SHA-256", jaas])
    assert found == {"sasl.mechanism": "SCRAM-SHA-256", "sasl.username": "u", "sasl.password": "p"}


def test_an_unsupported_login_module_names_file_and_line(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        "security.protocol=SASL_SSL\n"
        "sasl.mechanism=GSSAPI\n"
        "sasl.jaas.config=com.sun.security.auth.module.Krb5LoginModule required \\\n"
        "    useKeyTab=true;\n",
    )
    for backend in ("confluent", "kafka-python"):
        with pytest.raises(ConfigError) as info:
            kafka_properties(path, {}, [], backend)
        assert info.value.flag == f"--kafka-config {path}:3"
    with pytest.raises(UsageError, match=f"--kafka-config {path}:3"):
        producer_properties([], path, {}, "confluent")


@pytest.mark.parametrize("backend", ["confluent", "kafka-python"])
def test_a_refused_property_is_named_where_it_came_from(tmp_path: Path, backend: str) -> None:
    path = _file(tmp_path, "linger.ms=5\n\nno.such.property=1\n")
    with pytest.raises(ConfigError) as info:
        kafka_properties(path, {}, ["client.id=x"], backend)
    assert info.value.flag == f"--kafka-config {path}:3"
    with pytest.raises(ConfigError) as info:
        kafka_properties(path, {}, ["no.such.property=2"], backend)
    assert info.value.flag == "--kafka-option"  # the flag's value wins, and is what is refused


def test_the_file_then_credentials_then_options(tmp_path: Path) -> None:
    path = _file(tmp_path, CLOUD.replace("bootstrap.servers=", "#"))
    env = {"KAFKA_SASL_USERNAME": "env-user"}
    props = kafka_properties(path, env, ["sasl.password=flag-secret"], "confluent")
    assert props["sasl.username"] == "env-user" and props["sasl.password"] == "flag-secret"


def test_the_worker_exits_2_naming_the_line(tmp_path: Path) -> None:
    path = _file(tmp_path, "\n# x\nsasl.jaas.config=com.example.Custom required;\n")
    args = ["--input-topic", "a", "--output-topic", "o", "--model-repository", str(tmp_path)]
    with pytest.raises(ConfigError) as info:
        parse_settings([*args, "--kafka-config", str(path)], {})
    assert info.value.flag == f"--kafka-config {path}:3"
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run", *args, "--kafka-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--kafka-config {path}:3" in lines[0], lines
    assert "PlainLoginModule or ScramLoginModule" in lines[0]


def test_the_producer_exits_2_naming_the_line(tmp_path: Path) -> None:
    path = _file(tmp_path, "sasl.jaas.config=com.example.Custom required;\n")
    out = subprocess.run(
        [sys.executable, "-m", "producers.cli", "collect", "--topic", "t", "--out",
         str(tmp_path / "o.arrow"), "--kafka-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert f"--kafka-config {path}:1" in out.stderr


def test_a_files_bootstrap_servers_unless_one_was_set(tmp_path: Path) -> None:
    path = _file(tmp_path, CLOUD)
    args = ["--input-topic", "a", "--output-topic", "o", "--model-repository", str(tmp_path)]
    args += ["--kafka-config", str(path)]
    s = parse_settings(args, {})
    assert s.bootstrap_servers == "pkc-00000.europe-west1.gcp.confluent.cloud:9092"
    assert "bootstrap.servers" not in s.kafka_properties  # one place says where the cluster is
    assert parse_settings(args, {"KAFKA_BOOTSTRAP_SERVERS": "k:1"}).bootstrap_servers == "k:1"
    assert parse_settings([*args, "--bootstrap-server", "f:1"], {}).bootstrap_servers == "f:1"


def test_the_producers_bootstrap_servers_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from producers.cli import _settings, build_parser

    path = _file(tmp_path, CLOUD.replace("SASL_SSL", "PLAINTEXT"))
    base = ["collect", "--topic", "t", "--out", str(tmp_path / "o.arrow")]
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    parse = build_parser().parse_args
    assert _settings(parse(base)).bootstrap_servers == "localhost:9092"
    s = _settings(parse([*base, "--kafka-config", str(path)]))
    assert s.bootstrap_servers.startswith("pkc-00000") and "bootstrap.servers" not in s.properties
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k:1")
    assert _settings(parse([*base, "--kafka-config", str(path)])).bootstrap_servers == "k:1"
    s = _settings(parse([*base, "--kafka-config", str(path), "--bootstrap-server", "f:1"]))
    assert s.bootstrap_servers == "f:1"
