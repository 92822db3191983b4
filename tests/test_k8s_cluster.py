"""The manifests against a real API server and a simulated cluster.

``make test-k8s`` (``scripts/kube-local test``) starts etcd, kube-apiserver
(token auth, RBAC), kube-controller-manager, kube-scheduler and KWOK faking
three nodes, installs the KEDA and ServiceMonitor CRDs, and runs this module
with ``KUBECONFIG`` pointing at it. ``make test`` deselects the ``k8s`` marker;
run without that cluster, every test here is skipped with the reason.

Nodes (``scripts/kube-local.d/nodes.yaml``): ``kwok-cpu-0``; ``kwok-gpu-0``
(driver 580, 2 GPUs, tainted ``nvidia.com/gpu``); ``kwok-gpu-old-0`` (driver
570, 8 GPUs, same taint), which the GPU overlay must never use.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ["cpu", "gpu", "keda", "keda-sasl", "keda-topics", "hpa", "servicemonitor"]
LABELS = "app.kubernetes.io/name=inference-worker,app.kubernetes.io/component=worker"
CPU_NODE = "kwok-cpu-0"
GPU_NODE = "kwok-gpu-0"
OLD_GPU_NODE = "kwok-gpu-old-0"

pytestmark = [
    pytest.mark.k8s,
    pytest.mark.skipif(
        not os.environ.get("KUBE_LOCAL_RUN"),
        reason="needs the simulated cluster: run `make test-k8s`",
    ),
]


# ---------------------------------------------------------------- helpers


def kubectl(
    *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        ["kubectl", *args], input=stdin, capture_output=True, text=True,
        timeout=timeout, check=False,
    )
    if check and out.returncode != 0:
        pytest.fail(f"kubectl {' '.join(args)} failed:\n{out.stderr}")
    return out


def get_json(*args: str) -> Any:
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


def rendered(path: Path) -> str:
    return kubectl("kustomize", str(path)).stdout


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"iw-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def k8s_copy(tmp_path: Path) -> Path:
    """A scratch copy of k8s/, for overlays the tests write next to the real ones."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    return copy


def overlay(k8s_dir: Path, name: str, body: dict[str, Any]) -> Path:
    path = k8s_dir / "overlays" / name
    path.mkdir(parents=True, exist_ok=True)
    doc = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **body}
    (path / "kustomization.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def apply(path: Path, ns: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return kubectl("apply", "--server-side", "-n", ns, *extra, "-f", "-", stdin=rendered(path),
                   check=False)


def pods(ns: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = get_json("pods", "-n", ns, "-l", LABELS)["items"]
    return items


def wait_rollout(ns: str, timeout_s: int = 120) -> None:
    kubectl("rollout", "status", "deployment/inference-worker", "-n", ns,
            f"--timeout={timeout_s}s", timeout=timeout_s + 10)


def unschedulable(pod: dict[str, Any]) -> str | None:
    for cond in pod.get("status", {}).get("conditions", []):
        if cond["type"] == "PodScheduled" and cond["status"] == "False":
            return str(cond.get("message", cond.get("reason")))
    return None


def watch_rollout(ns: str, changed: Path, timeout_s: float = 150) -> list[dict[str, int]]:
    """Apply ``changed`` and sample the Deployment until its rollout has completed.

    Each sample: the ReplicaSets' replicas added up (what maxSurge bounds),
    pods not terminating, and the Deployment's available count (what
    maxUnavailable bounds).
    """
    before = get_json("deployment/inference-worker", "-n", ns)["metadata"]["generation"]
    out = apply(changed, ns)
    assert out.returncode == 0, out.stderr
    return samples_until_rolled(ns, before, timeout_s)


def samples_until_rolled(ns: str, before: int, timeout_s: float = 150) -> list[dict[str, int]]:
    """Sample the Deployment (past generation ``before``) until its rollout completed."""
    samples: list[dict[str, int]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        items = get_json("deployments,replicasets,pods", "-n", ns, "-l", LABELS)["items"]
        (dep,) = (i for i in items if i["kind"] == "Deployment")
        status = dep.get("status", {})
        samples.append({
            "replicas": sum(i["spec"]["replicas"] for i in items if i["kind"] == "ReplicaSet"),
            "active": sum(i["kind"] == "Pod" and "deletionTimestamp" not in i["metadata"]
                          for i in items),
            "available": status.get("availableReplicas", 0),
        })
        want = dep["spec"]["replicas"]
        generation = dep["metadata"]["generation"]
        if (generation > before and status.get("observedGeneration", 0) >= generation
                and status.get("updatedReplicas") == want and status.get("replicas") == want
                and status.get("availableReplicas") == want):
            return samples
        time.sleep(0.3)
    pytest.fail(f"rollout did not finish in {timeout_s} s; last samples {samples[-5:]}")


def evict(ns: str, pod: str) -> subprocess.CompletedProcess[str]:
    body = json.dumps({
        "apiVersion": "policy/v1", "kind": "Eviction",
        "metadata": {"name": pod, "namespace": ns},
    })
    return kubectl("create", "--raw", f"/api/v1/namespaces/{ns}/pods/{pod}/eviction",
                   "-f", "-", stdin=body, check=False)


# ---------------------------------------------------------------- the cluster


def test_cluster_is_the_simulated_one() -> None:
    nodes = {n["metadata"]["name"]: n for n in get_json("nodes")["items"]}
    assert set(nodes) == {CPU_NODE, GPU_NODE, OLD_GPU_NODE}
    for node in nodes.values():
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True"
    assert nodes[GPU_NODE]["status"]["allocatable"]["nvidia.com/gpu"] == "2"
    version = json.loads(kubectl("version", "-o", "json").stdout)["serverVersion"]
    assert version["gitVersion"].startswith("v1.34.")
    crds = {c["metadata"]["name"] for c in get_json("crd")["items"]}
    assert {"scaledobjects.keda.sh", "triggerauthentications.keda.sh",
            "servicemonitors.monitoring.coreos.com",
            "prometheusrules.monitoring.coreos.com"} <= crds


# ---------------------------------------------------------------- dry runs


@pytest.mark.parametrize("name", OVERLAYS, ids=[f"overlays/{o}" for o in OVERLAYS])
def test_overlay_passes_server_side_dry_run(name: str, namespace: str) -> None:
    out = apply(K8S / "overlays" / name, namespace, "--dry-run=server")
    assert out.returncode == 0, out.stderr
    assert "deployment.apps/inference-worker serverside-applied (server dry run)" in out.stdout


def test_components_pass_server_side_dry_run(k8s_copy: Path, namespace: str) -> None:
    """The opt-in components no shipped overlay lists, on top of the GPU overlay."""
    path = overlay(k8s_copy, "all-components", {
        "resources": ["../gpu"],
        "components": ["../../components/models-pvc", "../../components/nvidia-runtime",
                       "../../components/servicemonitor", "../../components/kafka-sasl"],
    })
    out = apply(path, namespace, "--dry-run=server")
    assert out.returncode == 0, out.stderr
    assert "persistentvolumeclaim/inference-worker-models serverside-applied" in out.stdout


def _broken(k8s_dir: Path, name: str, base: str, patch: dict[str, Any]) -> Path:
    return overlay(k8s_dir, name, {
        "resources": [f"../{base}"],
        "patches": [{"target": {"kind": patch["target"], "name": "inference-worker"},
                     "patch": yaml.safe_dump(patch["ops"])}],
    })


@pytest.mark.parametrize(
    ("base", "target", "ops", "message"),
    [
        pytest.param(
            "cpu", "Deployment",
            [{"op": "replace", "path": "/spec/replicas", "value": -1}],
            "spec.replicas: Invalid value: -1: must be greater than or equal to 0",
            id="negative-replicas",
        ),
        pytest.param(
            "keda", "ScaledObject",
            [{"op": "add", "path": "/spec/triggers/0/lagTreshold", "value": "10"}],
            ".spec.triggers[0].lagTreshold: field not declared in schema",
            id="unknown-scaledobject-field",
        ),
        pytest.param(
            "cpu", "PodDisruptionBudget",
            [{"op": "add", "path": "/spec/minAvailable", "value": 1}],
            "minAvailable and maxUnavailable cannot be both set",
            id="pdb-with-both-bounds",
        ),
        pytest.param(
            "gpu", "Deployment",
            [{"op": "replace", "path":
              "/spec/template/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution"
              "/nodeSelectorTerms/0/matchExpressions/1/values", "value": ["579", "600"]}],
            "must be specified single value when `operator` is 'Lt' or 'Gt'",
            id="gt-with-two-values",
        ),
    ],
)
def test_server_refuses_broken_copies(
    k8s_copy: Path, namespace: str, base: str, target: str, ops: list[dict[str, Any]],
    message: str,
) -> None:
    path = _broken(k8s_copy, "broken", base, {"target": target, "ops": ops})
    out = apply(path, namespace, "--dry-run=server")
    assert out.returncode != 0, f"the server accepted it:\n{out.stdout}"
    assert message in out.stderr, out.stderr


# ---------------------------------------------------------------- applied for real


def test_cpu_overlay_runs_on_the_cpu_node_and_rolls_out_within_limits(
    k8s_copy: Path, namespace: str
) -> None:
    path = K8S / "overlays" / "cpu"
    out = apply(path, namespace)
    assert out.returncode == 0, out.stderr
    wait_rollout(namespace)
    running = pods(namespace)
    assert len(running) == 2
    assert {p["spec"]["nodeName"] for p in running} == {CPU_NODE}

    # A config change renames the generated ConfigMap, so the pods roll:
    # maxSurge 1 / maxUnavailable 0 means 2 or 3 pods, never fewer than 2 available.
    changed = overlay(k8s_copy, "cpu-changed", {
        "resources": ["../cpu"],
        "configMapGenerator": [{"name": "inference-worker-config", "behavior": "merge",
                                "literals": ["WORKER_LOG_LEVEL=DEBUG"]}],
    })
    samples = watch_rollout(namespace, changed)
    assert max(s["replicas"] for s in samples) == 3, "surges one pod, no more"
    assert min(s["available"] for s in samples) >= 2, "never one fewer"
    assert {p["spec"]["nodeName"] for p in pods(namespace)} == {CPU_NODE}


def test_pdb_allows_one_disruption(namespace: str) -> None:
    out = apply(K8S / "overlays" / "cpu", namespace)
    assert out.returncode == 0, out.stderr
    wait_rollout(namespace)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pdb = get_json("pdb/inference-worker", "-n", namespace)
        if pdb.get("status", {}).get("currentHealthy") == 2:
            break
        time.sleep(0.3)
    assert pdb["status"]["disruptionsAllowed"] == 1, pdb["status"]

    # As `kubectl drain` does: cordon, then evict. The replacement cannot be
    # scheduled on the cordoned node, so the second eviction must be refused.
    kubectl("cordon", CPU_NODE)
    try:
        first, second = (p["metadata"]["name"] for p in pods(namespace))
        ok = evict(namespace, first)
        assert ok.returncode == 0, ok.stderr
        refused = evict(namespace, second)
        assert refused.returncode != 0
        assert "disruption budget" in refused.stderr, refused.stderr
    finally:
        kubectl("uncordon", CPU_NODE)


def _gpu_pods_placed(ns: str) -> list[dict[str, Any]]:
    current = pods(ns)
    assert len(current) == 2
    assert {p["spec"]["nodeName"] for p in current} == {GPU_NODE}
    return current


def test_gpu_overlay_runs_only_on_the_cuda13_gpu_node_and_rolls_without_surge(
    k8s_copy: Path, namespace: str
) -> None:
    # The optional runtimeClassName component too: admission refuses a pod
    # whose RuntimeClass does not exist, so create the one the GPU Operator makes.
    kubectl("apply", "--server-side", "-f", "-", stdin=yaml.safe_dump({
        "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
        "metadata": {"name": "nvidia"}, "handler": "nvidia",
    }))
    path = overlay(k8s_copy, "gpu-runtime", {
        "resources": ["../gpu"], "components": ["../../components/nvidia-runtime"],
    })
    out = apply(path, namespace)
    assert out.returncode == 0, out.stderr
    wait_rollout(namespace)
    placed = _gpu_pods_placed(namespace)
    assert all(p["spec"]["runtimeClassName"] == "nvidia" for p in placed)

    # Both GPUs of the only eligible node are taken: a surge pod would stay
    # Pending. maxSurge 0 / maxUnavailable 1 replaces them one at a time.
    changed = overlay(k8s_copy, "gpu-changed", {
        "resources": ["../gpu-runtime"],
        "configMapGenerator": [{"name": "inference-worker-config", "behavior": "merge",
                                "literals": ["WORKER_LOG_LEVEL=DEBUG"]}],
    })
    samples = watch_rollout(namespace, changed)
    assert max(s["replicas"] for s in samples) == 2, "a surge pod was asked for"
    assert max(s["active"] for s in samples) <= 2
    assert min(s["available"] for s in samples) == 1, "one pod at a time"
    _gpu_pods_placed(namespace)
    assert not [r for r in map(unschedulable, pods(namespace)) if r]


def test_gpu_rollout_with_a_surge_would_wait_for_a_spare_gpu(
    k8s_copy: Path, namespace: str
) -> None:
    """The control for the test above: the base's maxSurge 1 strands a pod."""
    surging = overlay(k8s_copy, "gpu-surge", {
        "resources": ["../gpu"],
        "patches": [{"target": {"kind": "Deployment", "name": "inference-worker"},
                     "patch": yaml.safe_dump([
                         {"op": "replace", "path": "/spec/strategy/rollingUpdate",
                          "value": {"maxSurge": 1, "maxUnavailable": 0}}])}],
    })
    out = apply(surging, namespace)
    assert out.returncode == 0, out.stderr
    wait_rollout(namespace)
    changed = overlay(k8s_copy, "gpu-surge-changed", {
        "resources": ["../gpu-surge"],
        "configMapGenerator": [{"name": "inference-worker-config", "behavior": "merge",
                                "literals": ["WORKER_LOG_LEVEL=DEBUG"]}],
    })
    assert apply(changed, namespace).returncode == 0
    deadline = time.monotonic() + 30
    reasons: list[str] = []
    while time.monotonic() < deadline and not reasons:
        reasons = [r for r in map(unschedulable, pods(namespace)) if r]
        time.sleep(0.3)
    assert reasons, "the surge pod found a GPU it should not have"
    assert "Insufficient nvidia.com/gpu" in reasons[0]
    assert "node(s) didn't match Pod's node affinity/selector" in reasons[0]


def test_hpa_is_accepted_and_finds_its_target(namespace: str) -> None:
    out = apply(K8S / "overlays" / "hpa", namespace)
    assert out.returncode == 0, out.stderr
    # The HPA controller resolves the scale target; the lag metric itself needs
    # prometheus-adapter, which this cluster lacks (ScalingActive stays False).
    deadline = time.monotonic() + 60
    conditions: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline and "AbleToScale" not in conditions:
        hpa = get_json("hpa/inference-worker", "-n", namespace)
        conditions = {c["type"]: c for c in hpa.get("status", {}).get("conditions", [])}
        time.sleep(0.5)
    assert conditions["AbleToScale"]["status"] == "True", conditions
    assert "inference_worker_consumer_lag" in conditions["ScalingActive"]["message"]
    assert hpa["spec"]["maxReplicas"] == 12


@pytest.mark.parametrize("name", ["keda", "keda-sasl", "keda-topics"])
def test_scaledobject_is_accepted(name: str, namespace: str) -> None:
    out = apply(K8S / "overlays" / name, namespace)
    assert out.returncode == 0, out.stderr
    scaled = get_json("scaledobject/inference-worker", "-n", namespace)
    assert scaled["spec"]["scaleTargetRef"]["name"] == "inference-worker"
    deployment = get_json("deployment/inference-worker", "-n", namespace)
    partitions = int(deployment["metadata"]["annotations"]["inference-worker.io/input-partitions"])
    assert scaled["spec"]["maxReplicaCount"] == partitions
    if name == "keda-sasl":
        auth = get_json("triggerauthentication/inference-worker-kafka", "-n", namespace)
        params = {r["parameter"] for r in auth["spec"]["secretTargetRef"]}
        assert {"sasl", "username", "password", "tls", "ca"} <= params
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]


# ---------------------------------------------------------------- the Helm chart

CHART = ROOT / "deploy" / "helm" / "inference-worker"
RELEASE = "inference-worker"


def helm(*args: str, ns: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    found = subprocess.run([str(ROOT / "scripts" / "helm"), "path"], capture_output=True,
                           text=True, check=False)
    if found.returncode != 0:
        pytest.fail("helm is not built: run `make helm` (make test-k8s does)")
    return subprocess.run([found.stdout.strip(), *args, "--namespace", ns], capture_output=True,
                          text=True, timeout=timeout, check=False)


def _readme_helm_install() -> str:
    readme = (ROOT / "README.md").read_text()
    (line,) = [ln for ln in readme.splitlines() if ln.startswith("helm install ")]
    return line


@pytest.mark.parametrize("values", [
    ["--set", "device=cpu"],
    [],
    ["--set", "keda.enabled=true,serviceMonitor.enabled=true,prometheusRule.enabled=true"],
], ids=["cpu", "gpu", "keda-monitoring"])
def test_chart_passes_server_side_dry_run(values: list[str], namespace: str) -> None:
    rendered = helm("template", RELEASE, str(CHART), *values, ns=namespace)
    assert rendered.returncode == 0, rendered.stderr
    out = kubectl("apply", "--server-side", "--dry-run=server", "-n", namespace, "-f", "-",
                  stdin=rendered.stdout, check=False)
    assert out.returncode == 0, out.stderr
    assert "deployment.apps/inference-worker serverside-applied (server dry run)" in out.stdout
    if values[1:] and "keda" in values[1]:
        for kind in ("scaledobject.keda.sh", "servicemonitor.monitoring.coreos.com",
                     "prometheusrule.monitoring.coreos.com"):
            assert f"{kind}/inference-worker serverside-applied" in out.stdout, kind


def _release_objects(ns: str) -> list[str]:
    kinds = "deployments,replicasets,pods,services,configmaps,serviceaccounts,pdb,secrets"
    items = get_json(kinds, "-n", ns, "-l", f"app.kubernetes.io/instance={RELEASE}")["items"]
    names = [f"{i['kind']}/{i['metadata']['name']}" for i in items]
    secrets = get_json("secrets", "-n", ns)["items"]  # helm's release records
    return names + [f"Secret/{i['metadata']['name']}" for i in secrets
                    if i["metadata"]["name"].startswith("sh.helm.release")]


def test_helm_install_upgrade_uninstall_on_the_cpu_node(namespace: str) -> None:
    """The README's command as written (HELM_NAMESPACE picks the namespace)."""
    env = {**os.environ, "HELM_NAMESPACE": namespace}
    found = subprocess.run([str(ROOT / "scripts" / "helm"), "path"], capture_output=True,
                           text=True, check=False)
    assert found.returncode == 0, "helm is not built: make helm"
    line = _readme_helm_install().replace("helm ", found.stdout.strip() + " ", 1)
    out = subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=180, check=False)
    assert out.returncode == 0, out.stderr
    wait_rollout(namespace)
    running = pods(namespace)
    assert len(running) == 2 and {p["spec"]["nodeName"] for p in running} == {CPU_NODE}

    # A settings change moves the config checksum, so the pods roll within
    # maxSurge 1 / maxUnavailable 0: 2 or 3 pods, never fewer than 2 available.
    before = get_json("deployment/inference-worker", "-n", namespace)["metadata"]["generation"]
    up = helm("upgrade", RELEASE, str(CHART), "--reuse-values", "--set", "config.log_level=DEBUG",
              ns=namespace)
    assert up.returncode == 0, up.stderr
    samples = samples_until_rolled(namespace, before)
    assert max(s["replicas"] for s in samples) == 3, "surges one pod, no more"
    assert min(s["available"] for s in samples) >= 2, "never one fewer"
    config = get_json("configmap/inference-worker-file", "-n", namespace)["data"]["config.toml"]
    assert 'log_level = "DEBUG"' in config and 'device = "cpu"' in config

    assert _release_objects(namespace)
    gone = helm("uninstall", RELEASE, "--wait", "--timeout", "120s", ns=namespace)
    assert gone.returncode == 0, gone.stderr
    deadline = time.monotonic() + 60
    while (left := _release_objects(namespace)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"left behind: {left}"


def test_helm_gpu_install_runs_on_the_cuda13_node_and_upgrades_without_surge(
    namespace: str,
) -> None:
    out = helm("install", RELEASE, str(CHART), ns=namespace)
    assert out.returncode == 0, out.stderr
    wait_rollout(namespace)
    _gpu_pods_placed(namespace)
    before = get_json("deployment/inference-worker", "-n", namespace)["metadata"]["generation"]
    up = helm("upgrade", RELEASE, str(CHART), "--reuse-values", "--set", "config.log_level=DEBUG",
              ns=namespace)
    assert up.returncode == 0, up.stderr
    samples = samples_until_rolled(namespace, before)
    assert max(s["replicas"] for s in samples) == 2, "a surge pod was asked for"
    assert min(s["available"] for s in samples) == 1, "one pod at a time"
    _gpu_pods_placed(namespace)
