"""The Helm chart (deploy/helm/inference-worker), checked offline with Helm itself.

``helm lint`` and ``helm template`` run here (``make test``; Helm is built once
with ``go install`` by ``scripts/helm install``, cached under ~/.cache). One
source of truth: the chart's defaults render what the kustomize overlays do,
compared field by field where it matters (probes, ports, settings, env,
resources, security context, placement, rollout, scaler, monitoring).
``tests/test_k8s_cluster.py`` installs it on the simulated cluster.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.harness import go_tool
from tests.test_deploy import K8S_VERSIONS, _config, _config_file, _is_crd, _one, _rendered

if sys.version_info >= (3, 11):
    import tomllib
else:  # the tomli backport the worker depends on there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "inference-worker"
RELEASE = "inference-worker"

# kustomize overlay -> the chart values that should render the same.
PAIRS: dict[str, dict[str, Any]] = {
    "gpu": {},
    "cpu": {"device": "cpu"},
    "keda": {"keda": {"enabled": True}},
    "servicemonitor": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
}


def helm() -> str:
    return go_tool("helm")


def run_helm(*args: str, values: dict[str, Any] | None = None,
             tmp: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra: list[str] = []
    if values:
        assert tmp is not None
        path = tmp / f"values-{abs(hash(repr(values)))}.yaml"
        path.write_text(yaml.safe_dump(values))
        extra = ["-f", str(path)]
    return subprocess.run([helm(), *args, *extra], capture_output=True, text=True,
                          timeout=120, check=False)


def template(values: dict[str, Any], tmp: Path, release: str = RELEASE) -> list[dict[str, Any]]:
    out = run_helm("template", release, str(CHART), values=values, tmp=tmp)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


# ---------------------------------------------------------------- helpers


def _pod(docs: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> dict[str, Any]:
    spec: dict[str, Any] = _one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def _env(docs: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """What the worker container's environment resolves to: envFrom data, then env."""
    (container,) = _pod(docs)["containers"]
    resolved: dict[str, Any] = {}
    for source in container["envFrom"]:
        name = source["configMapRef"]["name"]
        (data,) = (d["data"] for d in docs
                   if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name)
        resolved.update(data)
    for entry in container["env"]:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        resolved[entry["name"]] = entry.get("value") if ref is None else (
            "secret", ref["name"], ref["key"], ref.get("optional"))
    return resolved


def _other_env(docs: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return {k: v for k, v in _env(docs).items() if not k.startswith("WORKER_")}


def _without_labels(value: Any) -> Any:
    """``value`` with label selectors and hashed ConfigMap names taken out."""
    if isinstance(value, dict):
        return {k: _without_labels(v) for k, v in value.items()
                if k not in ("labelSelector", "matchLabels")}
    if isinstance(value, list):
        return [_without_labels(v) for v in value]
    return value


def _volumes(pod: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for volume in pod["volumes"]:
        kind = next(k for k in volume if k != "name")
        body = dict(volume[kind])
        body.pop("name", None)  # a ConfigMap's (kustomize hashes it)
        out[volume["name"]] = (kind, body)
    return out


def _container_view(container: dict[str, Any]) -> dict[str, Any]:
    keys = ("image", "args", "ports", "resources", "securityContext", "startupProbe",
            "readinessProbe", "livenessProbe", "command", "imagePullPolicy")
    view = {k: container.get(k) for k in keys}
    view["volumeMounts"] = sorted((m["mountPath"], m["name"], m.get("readOnly", False))
                                  for m in container["volumeMounts"])
    return view


# ---------------------------------------------------------------- tests


def test_helm_lint(tmp_path: Path) -> None:
    for values in PAIRS.values():
        out = run_helm("lint", "--strict", str(CHART), values=values, tmp=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("overlay", list(PAIRS))
def test_chart_renders_what_kustomize_renders(overlay: str, tmp_path: Path) -> None:
    chart, kust = template(PAIRS[overlay], tmp_path), _rendered(overlay)
    assert sorted(d["kind"] for d in chart) == sorted(d["kind"] for d in kust)

    chart_dep, kust_dep = _one(chart, "Deployment"), _one(kust, "Deployment")
    for key in ("replicas", "strategy", "minReadySeconds", "revisionHistoryLimit"):
        assert chart_dep["spec"].get(key) == kust_dep["spec"].get(key), key
    assert chart_dep["metadata"]["annotations"] == kust_dep["metadata"]["annotations"]
    chart_pod, kust_pod = _pod(chart), _pod(kust)
    for key in ("securityContext", "tolerations", "affinity", "terminationGracePeriodSeconds",
                "automountServiceAccountToken", "runtimeClassName", "nodeSelector"):
        assert chart_pod.get(key) == kust_pod.get(key), key
    assert _without_labels(chart_pod["topologySpreadConstraints"]) == _without_labels(
        kust_pod["topologySpreadConstraints"])
    assert _volumes(chart_pod) == _volumes(kust_pod)
    assert [_container_view(c) for c in chart_pod["containers"]] == [
        _container_view(c) for c in kust_pod["containers"]]
    assert [_container_view(c) for c in chart_pod["initContainers"]] == [
        _container_view(c) for c in kust_pod["initContainers"]]
    annotations = chart_dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations.pop("checksum/config")  # what rolls the pods (kustomize: the hash)
    assert annotations == kust_dep["spec"]["template"]["metadata"]["annotations"]

    # The settings as the worker sees them (config.toml, WORKER_* winning), and the rest of
    # the environment: the chart sets the device in the file, the overlays by variable.
    assert _config(tuple(chart)) == _config(kust)
    assert _other_env(chart) == _other_env(kust)

    assert _one(chart, "Service")["spec"]["ports"] == _one(kust, "Service")["spec"]["ports"]
    assert _one(chart, "PodDisruptionBudget")["spec"]["maxUnavailable"] == _one(
        kust, "PodDisruptionBudget")["spec"]["maxUnavailable"]
    for kind in ("ScaledObject", "ServiceMonitor", "PrometheusRule"):
        mine = [d for d in chart if d["kind"] == kind]
        theirs = [d for d in kust if d["kind"] == kind]
        assert [_without_labels(d["spec"]) for d in mine] == [
            _without_labels(d["spec"]) for d in theirs], kind


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_objects_validate_strictly(version: str, tmp_path: Path) -> None:
    for values in PAIRS.values():
        for doc in template(values, tmp_path):
            if not _is_crd(doc):
                kubernetes_validate.validate(doc, version, strict=True)


def test_version_from_one_place() -> None:
    """pyproject.toml's version is the chart's, its appVersion and the overlays' image tags."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == version
    for overlay in ("cpu", "gpu"):
        kustomization = yaml.safe_load(
            (ROOT / "k8s" / "overlays" / overlay / "kustomization.yaml").read_text())
        (image,) = (i for i in kustomization["images"] if i["name"] == "inference-worker")
        assert image["newTag"] == f"{version}-{overlay}"


def test_release_names_and_settings(tmp_path: Path) -> None:
    docs = template({"kafka": {"inputTopic": "a,b", "groupId": "g"}, "keda": {"enabled": True},
                     "config": {"max_batch_rows": 64}, "extraEnv": {"WORKER_LOG_LEVEL": "DEBUG"}},
                    tmp_path, release="prod")
    names = {d["metadata"]["name"] for d in docs}
    assert "prod-inference-worker" in names and "prod-inference-worker-file" in names
    assert "replicas" not in _one(docs, "Deployment")["spec"], "KEDA owns the replica count"
    scaled = _one(docs, "ScaledObject")["spec"]
    assert [t["metadata"]["topic"] for t in scaled["triggers"]] == ["a", "b"]
    assert {t["metadata"]["consumerGroup"] for t in scaled["triggers"]} == {"g"}
    assert scaled["advanced"]["scalingModifiers"]["formula"] == "topic0 + topic1"
    assert _config_file(tuple(docs))["max_batch_rows"] == 64
    env = _env(docs)
    assert env["WORKER_INPUT_TOPIC"] == "a,b" and env["WORKER_LOG_LEVEL"] == "DEBUG"


def test_models_from_a_claim(tmp_path: Path) -> None:
    docs = template({"models": {"persistentVolumeClaim": {"claimName": "shared-models"}}},
                    tmp_path)
    pod = _pod(docs)
    assert "initContainers" not in pod
    assert _volumes(pod)["models"] == (
        "persistentVolumeClaim", {"claimName": "shared-models", "readOnly": True})


def test_a_wrong_device_fails_naming_the_value(tmp_path: Path) -> None:
    out = run_helm("template", RELEASE, str(CHART), values={"device": "tpu"}, tmp=tmp_path)
    assert out.returncode != 0
    assert re.search(r'device: expected gpu or cpu, got "tpu"', out.stderr), out.stderr
