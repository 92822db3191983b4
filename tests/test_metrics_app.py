"""/metrics as Prometheus scrapes it, and every metric the worker promises, by its samples.

No broker and no worker loop: each metric is driven the way its caller
drives it and read back with ``registry.get_sample_value``; the HTTP side is
the real server on a free port.
"""

from __future__ import annotations

import gzip
import json
import platform
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib import metadata

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker.errors import ConfigError
from worker.observability import DEFAULT_METRICS_PORT, Health, HealthServer, Metrics

NS = "inference_worker"


def _request(
    port: int, path: str, *, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers.items()), r.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers.items()), exc.read()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def port(metrics: Metrics) -> Iterator[int]:
    with HealthServer(0, metrics, Health()) as server:
        yield server.port


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(f"{NS}_{name}", labels)


# -- every metric the worker promises, by its samples ----------------------------------


MV = {"model": "mnist-mlp", "version": "1"}


def test_record_outcome_counters(metrics: Metrics) -> None:
    series = metrics.series("mnist-mlp", 1)
    series.ok.inc()
    series.ok.inc()
    series.failed("schema-mismatch").inc()
    metrics.unknown.failed("model-not-found").inc()
    metrics.dlq.labels(error_type="decode-error").inc()
    metrics.retries.labels(error_type="broker-timeout").inc(3)
    series.rows.inc(3)
    metrics.series("mnist-mlp", 1).rows.inc(5)  # the same children, bound once
    assert _value(metrics, "messages_total", status="ok", error_type="", **MV) == 2
    assert _value(metrics, "messages_total", status="dlq", error_type="schema-mismatch", **MV) == 1
    unknown = {"model": "", "version": ""}
    assert (
        _value(metrics, "messages_total", status="dlq", error_type="model-not-found", **unknown)
        == 1
    )
    assert _value(metrics, "dlq_total", error_type="decode-error") == 1
    assert _value(metrics, "dlq_total", error_type="too-large") is None  # labels stay apart
    assert _value(metrics, "retries_total", error_type="broker-timeout") == 3
    assert _value(metrics, "rows_total", **MV) == 8
    assert _value(metrics, "rows_total", model="mnist-mlp", version="2") is None


def test_histograms_bucket_count_and_sum(metrics: Metrics) -> None:
    series = metrics.series("mnist-mlp", 1)
    series.batch_rows.observe(3)
    series.batch_rows.observe(1024)
    assert _value(metrics, "batch_rows_bucket", le="4.0", **MV) == 1
    assert _value(metrics, "batch_rows_bucket", le="1024.0", **MV) == 2
    assert _value(metrics, "batch_rows_count", **MV) == 2
    assert _value(metrics, "batch_rows_sum", **MV) == 1027

    m2 = {"model": "m", "version": "2"}
    metrics.series("m", 2).inference_seconds.observe(0.004)
    assert _value(metrics, "inference_seconds_bucket", le="0.0025", **m2) == 0
    assert _value(metrics, "inference_seconds_bucket", le="0.005", **m2) == 1
    assert _value(metrics, "inference_seconds_count", **m2) == 1
    assert _value(metrics, "inference_seconds_sum", **m2) == pytest.approx(0.004)

    series.end_to_end_seconds.observe(0.2)
    series.end_to_end_seconds.observe(45.0)  # beyond the last bucket: only +Inf
    assert _value(metrics, "end_to_end_seconds_bucket", le="0.25", **MV) == 1
    assert _value(metrics, "end_to_end_seconds_bucket", le="30.0", **MV) == 1
    assert _value(metrics, "end_to_end_seconds_bucket", le="+Inf", **MV) == 2
    assert _value(metrics, "end_to_end_seconds_sum", **MV) == pytest.approx(45.2)

    series.queued(10.0, [9.997, 9.5, 10.5])  # a clock step back counts as no wait
    assert _value(metrics, "queue_seconds_bucket", le="0.0", **MV) is None
    assert _value(metrics, "queue_seconds_bucket", le="0.005", **MV) == 2
    assert _value(metrics, "queue_seconds_bucket", le="0.5", **MV) == 3
    assert _value(metrics, "queue_seconds_sum", **MV) == pytest.approx(0.503)

    metrics.model_load_seconds.observe(1.5)
    assert _value(metrics, "model_load_seconds_bucket", le="1.0") == 0
    assert _value(metrics, "model_load_seconds_bucket", le="2.5") == 1
    assert _value(metrics, "model_load_seconds_count") == 1


def test_model_cache_series(metrics: Metrics) -> None:
    metrics.model_cache_hits.inc(4)
    metrics.model_cache_misses.inc()
    metrics.model_cache_evictions.inc(2)
    metrics.model_cache_models.set(3)
    metrics.model_cache_bytes.set(123_456)
    assert _value(metrics, "model_cache_hits_total") == 4
    assert _value(metrics, "model_cache_misses_total") == 1
    assert _value(metrics, "model_cache_evictions_total") == 2
    assert _value(metrics, "model_cache_models") == 3
    assert _value(metrics, "model_cache_bytes") == 123_456


def test_consumer_lag_per_topic_and_partition(metrics: Metrics) -> None:
    metrics.consumer_lag.labels(topic="requests", partition="0").set(7)
    metrics.consumer_lag.labels(topic="requests", partition="1").set(0)
    assert _value(metrics, "consumer_lag", topic="requests", partition="0") == 7
    assert _value(metrics, "consumer_lag", topic="requests", partition="1") == 0


def test_last_commit_age_is_nan_until_a_health_is_watched(metrics: Metrics) -> None:
    age = _value(metrics, "last_commit_age_seconds")
    assert age is not None and age != age  # NaN: no number rather than a made-up one


def test_build_info(metrics: Metrics) -> None:
    labels = {
        "version": metadata.version("inference-worker"),
        "python": platform.python_version(),
        "onnxruntime": metadata.version("onnxruntime"),
        "kafka_client": "unknown",
    }
    assert _value(metrics, "build_info", **labels) == 1
    metrics.set_build_info(kafka_client="confluent")
    assert _value(metrics, "build_info", **{**labels, "kafka_client": "confluent"}) == 1
    assert _value(metrics, "build_info", **labels) is None  # one series, not two


def test_each_metrics_has_its_own_registry() -> None:
    """No process-wide singleton: two workers in one process never share a counter."""
    a, b = Metrics(), Metrics(CollectorRegistry())
    a.series("m", 1).ok.inc()
    ok = {"status": "ok", "model": "m", "version": "1", "error_type": ""}
    assert _value(a, "messages_total", **ok) == 1
    assert _value(b, "messages_total", **ok) is None
    assert REGISTRY.get_sample_value(f"{NS}_messages_total", ok) is None
    assert b.registry.get_sample_value("process_cpu_seconds_total") is not None


# -- /metrics over HTTP ----------------------------------------------------------------


def test_every_promised_family_is_served(metrics: Metrics, port: int) -> None:
    status, headers, body = _request(port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    promised = {
        "messages": "counter",
        "rows": "counter",
        "batch_rows": "histogram",
        "inference_seconds": "histogram",
        "end_to_end_seconds": "histogram",
        "dlq": "counter",
        "model_cache_hits": "counter",
        "model_cache_misses": "counter",
        "model_cache_evictions": "counter",
        "model_cache_models": "gauge",
        "model_cache_bytes": "gauge",
        "model_load_seconds": "histogram",
        "consumer_lag": "gauge",
        "last_commit_age_seconds": "gauge",
        "build_info": "gauge",
        "retries": "counter",
        "queue_seconds": "histogram",
        "rebalances": "counter",
        "assigned_partitions": "gauge",
        "transactions_aborted": "counter",
        "kafka_broker_rtt_seconds": "gauge",
        "kafka_fetch_queue_messages": "gauge",
        "kafka_producer_queue_messages": "gauge",
    }
    for name, kind in promised.items():
        assert families[f"{NS}_{name}"].type == kind, name
    for name in (
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
    ):
        assert families[name].samples, name
    assert families["python_info"].samples
    assert families["python_gc_collections"].samples


def test_openmetrics_is_negotiated(metrics: Metrics, port: int) -> None:
    metrics.series("m", 3).ok.inc()
    accept = "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5"
    status, headers, body = _request(port, "/metrics", headers={"Accept": accept})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n")
    assert f"# TYPE {NS}_messages counter\n" in text
    assert f'{NS}_messages_total{{error_type="",model="m",status="ok",version="3"}} 1.0\n' in text
    assert "_created" not in text
    assert f"# TYPE {NS}_build info\n" in text


def test_gzip_when_asked(metrics: Metrics, port: int) -> None:
    status, headers, body = _request(port, "/metrics", headers={"Accept-Encoding": "gzip"})
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert f"# TYPE {NS}_consumer_lag gauge" in gzip.decompress(body).decode()
    _, plain_headers, plain = _request(port, "/metrics")
    assert "Content-Encoding" not in plain_headers
    assert plain.startswith(b"# HELP")


def test_name_filter(metrics: Metrics, port: int) -> None:
    metrics.dlq.labels(error_type="too-large").inc()
    query = f"?name[]={NS}_dlq_total&name[]=process_open_fds"
    _, _, body = _request(port, "/metrics" + query)
    names = {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert names == {f"{NS}_dlq_total", "process_open_fds"}


def test_head_gives_the_get_headers_and_no_body(metrics: Metrics, port: int) -> None:
    query = f"/metrics?name[]={NS}_model_cache_models"  # a stable body: lengths comparable
    status, headers, body = _request(port, query, method="HEAD")
    _, get_headers, get_body = _request(port, query)
    assert status == 200
    assert body == b""
    assert headers["Content-Type"] == get_headers["Content-Type"]
    assert int(headers["Content-Length"]) == len(get_body) > 0
    status, headers, body = _request(port, "/healthz", method="HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", "3")


def test_unknown_path_is_404(port: int) -> None:
    status, _, body = _request(port, "/nope")
    assert status == 404
    assert b"/metrics" in body


def test_post_to_metrics_is_refused(port: int) -> None:
    status, headers, _ = _request(port, "/metrics", method="POST")
    assert status == 405
    assert "GET" in headers["Allow"]


# -- binding -----------------------------------------------------------------------


def test_a_port_in_use_is_a_config_error(metrics: Metrics) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(ConfigError) as info:
            HealthServer(busy, metrics, Health(), bind="127.0.0.1")
    assert info.value.flag == "--metrics-port"
    assert str(info.value) == (
        f"--metrics-port: port {busy} on 127.0.0.1 is already in use; choose another port"
    )


@pytest.mark.parametrize("bad", [70000, 65536, -1])
def test_a_port_out_of_range_is_a_config_error(metrics: Metrics, bad: int) -> None:
    with pytest.raises(ConfigError) as info:
        HealthServer(bad, metrics, Health())
    assert info.value.flag == "--metrics-port"
    assert str(info.value) == f"--metrics-port: {bad} is not a TCP port (0-65535)"


def test_an_address_not_of_this_host_is_a_config_error(metrics: Metrics) -> None:
    with pytest.raises(ConfigError) as info:
        HealthServer(0, metrics, Health(), bind="192.0.2.1")  # TEST-NET-1, never local
    assert info.value.flag == "--metrics-bind"
    assert "\n" not in str(info.value)


def test_bind_to_loopback_only(metrics: Metrics) -> None:
    with HealthServer(0, metrics, Health(), bind="127.0.0.1") as server:
        assert _request(server.port, "/readyz")[0] == 503


def test_bind_to_ipv6_loopback(metrics: Metrics) -> None:
    with (
        HealthServer(0, metrics, Health(), bind="::1") as server,
        urllib.request.urlopen(f"http://[::1]:{server.port}/healthz", timeout=5) as r,
    ):
        assert r.status == 200


def test_closing_a_server_frees_its_port(metrics: Metrics) -> None:
    with HealthServer(0, metrics, Health(), bind="127.0.0.1") as server:
        port = server.port
    with HealthServer(port, Metrics(), Health(), bind="127.0.0.1") as again:
        assert again.port == port


def test_default_port_collides_with_no_common_exporter() -> None:
    # Outside Prometheus' exporter register (9100-9999, dcgm-exporter's 9400 included)
    # and its own components (9090-9094), below Linux's ephemeral ports.
    assert not 9090 <= DEFAULT_METRICS_PORT <= 9999
    assert DEFAULT_METRICS_PORT not in {8000, 8001, 8002, 8080, 8081, 8082, 8083, 8089}
    assert 1024 <= DEFAULT_METRICS_PORT < 32768


def test_rebalances_and_assigned_partitions(metrics: Metrics) -> None:
    metrics.rebalanced(assigned=[("t", 0), ("t", 1), ("t", 2)])
    metrics.rebalanced(revoked=[("t", 1)])
    metrics.rebalanced(assigned=[("t", 1)])  # cooperative: the same partition back
    metrics.rebalanced(revoked=[("t", 0), ("t", 9)])  # lost, one never owned
    assert _value(metrics, "rebalances_total") == 4
    assert _value(metrics, "assigned_partitions") == 2


def test_transactions_aborted_is_read_at_each_scrape(metrics: Metrics) -> None:
    assert _value(metrics, "transactions_aborted_total") == 0
    aborted = [0]
    metrics.watch_transactions(lambda: aborted[0])
    aborted[0] = 3
    assert _value(metrics, "transactions_aborted_total") == 3


# A librdkafka statistics document, cut down to the fields read (STATISTICS.md).
_CONSUMER_STATS = {
    "name": "g-consumer#consumer-1",
    "type": "consumer",
    "msg_cnt": 0,
    "brokers": {
        "localhost:9092/bootstrap": {"name": "localhost:9092/bootstrap", "nodeid": -1,
                                     "rtt": {"avg": 900}},
        "127.0.0.1:9092/1": {"name": "127.0.0.1:9092/1", "nodeid": 1, "rtt": {"avg": 2500}},
    },
    "topics": {
        "requests": {"partitions": {
            "0": {"partition": 0, "fetchq_cnt": 7},
            "1": {"partition": 1, "fetchq_cnt": 5},
            "-1": {"partition": -1, "fetchq_cnt": 100},
        }},
    },
}  # fmt: skip


def test_librdkafka_statistics_become_gauges(metrics: Metrics) -> None:
    metrics.kafka_statistics("consumer")(json.dumps(_CONSUMER_STATS))
    rtt = _value(metrics, "kafka_broker_rtt_seconds", client="consumer", broker="127.0.0.1:9092/1")
    assert rtt == pytest.approx(0.0025)
    bootstrap = {"client": "consumer", "broker": "localhost:9092/bootstrap"}
    assert _value(metrics, "kafka_broker_rtt_seconds", **bootstrap) is None
    assert _value(metrics, "kafka_fetch_queue_messages", client="consumer") == 12
    producer = {"type": "producer", "msg_cnt": 42, "msg_size": 4096, "brokers": {}}
    metrics.kafka_statistics("producer")(json.dumps(producer))
    assert _value(metrics, "kafka_producer_queue_messages", client="producer") == 42
    assert _value(metrics, "kafka_producer_queue_bytes", client="producer") == 4096
    metrics.kafka_statistics("producer")("{not json")  # one sample lost, nothing raised
    assert _value(metrics, "kafka_producer_queue_messages", client="producer") == 42


def test_no_created_series_and_no_global_switch(metrics: Metrics, port: int) -> None:
    metrics.series("m", 1).ok.inc()
    metrics.model_cache_hits.inc()
    _, _, body = _request(port, "/metrics")
    assert b"_created" not in body
    assert b"inference_worker_model_cache_hits_total 1.0" in body
    assert b"_created" not in metrics.exposition()
    _, _, only = _request(port, "/metrics?name[]=inference_worker_model_cache_hits_created"
                          "&name[]=inference_worker_model_cache_hits_total")  # fmt: skip
    assert b"_created" not in only and b"model_cache_hits_total 1.0" in only
    # Other registries in the process keep prometheus_client's default.
    other = CollectorRegistry()
    Counter("other", "x", registry=other).inc()
    assert b"other_created" in generate_latest(other)
