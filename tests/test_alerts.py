"""The alerting rules, tested with Prometheus' own ``promtool``.

``deploy/prometheus/alerts.yml`` is the rule file; ``alerts.test.yml`` beside
it gives input series and the alerts each rule must (and must not) raise, run
by ``promtool test rules``. The PrometheusRule copies (the kustomize component
and the Helm chart) must hold the same groups, and the compose Prometheus
config passes ``promtool check config``. promtool is built once with
``go install`` (``scripts/promtool install``, cached under ~/.cache; ``make
test`` builds it first).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.harness import go_tool
from tests.test_deploy import _exposed_metric_names, _metric_names

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULES_TEST = PROMETHEUS / "alerts.test.yml"
CHART_RULES = ROOT / "deploy" / "helm" / "inference-worker" / "files" / "alerts.yml"
KUSTOMIZE_RULE = ROOT / "k8s" / "components" / "prometheusrule" / "prometheusrule.yaml"

# Series from outside the worker the rules read: kube-state-metrics' restart
# counter, and the per-replica gauge of assigned partitions.
EXTERNAL_SERIES = {"kube_pod_container_status_restarts_total"}
SPEC_SERIES = {"inference_worker_assigned_partitions"}

ALERTS = {
    "InferenceWorkerConsumerLagGrowing",
    "InferenceWorkerDeadLetterRateHigh",
    "InferenceWorkerCommitsStalled",
    "InferenceWorkerCrashLooping",
    "InferenceWorkerModelLoadFailures",
    "InferenceWorkerNoPartitionsAssigned",
    "InferenceWorkerReplicaIdle",
}


def promtool() -> str:
    return go_tool("promtool")


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def rules(path: Path = RULES) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(path.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_rules_check() -> None:
    out = run_promtool("check", "rules", str(RULES), cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_rules_unit_tests() -> None:
    out = run_promtool("test", "rules", RULES_TEST.name, cwd=PROMETHEUS)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_rule_has_a_unit_test() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    names = {rule["alert"] for rule in rules()}
    assert names == ALERTS
    assert names <= tested, f"no firing case for {sorted(names - tested)}"


def test_a_broken_threshold_fails(tmp_path: Path) -> None:
    """The unit tests notice a moved threshold (here the dead-letter share)."""
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    text = RULES.read_text()
    assert "> 0.05" in text
    (tmp_path / RULES.name).write_text(text.replace("> 0.05", "> 0.5"))
    out = run_promtool("test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert out.returncode != 0
    assert "InferenceWorkerDeadLetterRateHigh" in out.stdout + out.stderr


def test_rules_read_real_metrics() -> None:
    known = _exposed_metric_names() | EXTERNAL_SERIES | SPEC_SERIES
    for rule in rules():
        names = _metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= known, f"{rule['alert']}: {sorted(names - known)} not exposed"


def test_every_rule_says_what_and_how_bad() -> None:
    for rule in rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_prometheusrule_copies_match() -> None:
    """The chart's file and the kustomize PrometheusRule hold alerts.yml's groups."""
    assert CHART_RULES.read_text() == RULES.read_text(), "copy alerts.yml into the chart's files/"
    resource = yaml.safe_load(KUSTOMIZE_RULE.read_text())
    assert resource["apiVersion"] == "monitoring.coreos.com/v1"
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_compose_prometheus_config(tmp_path: Path) -> None:
    """promtool check config on the compose Prometheus, its rule file where compose mounts it."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    prometheus = compose["services"]["prometheus"]
    mounts = dict(v.removesuffix(":ro").split(":", 1)[::-1] for v in prometheus["volumes"])
    assert (ROOT / mounts["/etc/prometheus/alerts.yml"]).resolve() == RULES
    config = (ROOT / mounts["/etc/prometheus/prometheus.yml"]).read_text()
    assert "worker:8099" in config
    # The rule file at the path compose mounts it, here its place in the repository.
    scratch = tmp_path / "prometheus.yml"
    scratch.write_text(config.replace("/etc/prometheus/alerts.yml", str(RULES)))
    out = run_promtool("check", "config", str(scratch), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 7 rules found" in out.stdout + out.stderr
