"""The user docs say true things: no development history, one figure per fact
(matching ``--help``, the Makefile and the measured run), and every README
command block that needs no GPU or cluster runs as written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
# Other pages' owners keep them; they are checked once those are merged.
OWNED_ELSEWHERE: set[str] = set()
USER_DOCS = [README, *(d for d in DOCS if d.name not in OWNED_ELSEWHERE)]
VENV_BIN = Path(sys.executable).parent


def _text(path: Path) -> str:
    return path.read_text()


# ---------------------------------------------------------------- history


HISTORY = re.compile(
    r"\b(first|second|third|fourth|fifth|this|previous|last|earlier|next) session\b"
    r"|\bsession \d+\b", re.IGNORECASE)


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: p.name)
def test_no_development_history(doc: Path) -> None:
    found = [m.group() for m in HISTORY.finditer(_text(doc))]
    assert not found, f"{doc.name} tells development history: {found}"


# ---------------------------------------------------------------- figures


def _help(*argv: str) -> str:
    out = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True,
                         timeout=60, check=False, cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def _quoted(pattern: str) -> list[tuple[str, str]]:
    """(doc, captured value) for every match of ``pattern`` in the user docs and README."""
    return [(d.name, m.group(1)) for d in USER_DOCS for m in re.finditer(pattern, _text(d))]


def test_bench_duration_is_the_latest_runs() -> None:
    seconds = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())["seconds"]
    quoted = _quoted(r"`make bench` \(about (\d+) minutes") + _quoted(
        r"A full run takes about (\d+) minutes")
    assert {d for d, _ in quoted} >= {"README.md", "performance.md"}
    for doc, minutes in quoted:
        assert int(minutes) == round(seconds / 60), f"{doc}: {minutes} min, measured {seconds} s"


def test_quick_bench_duration_is_the_helps() -> None:
    (helped,) = re.findall(r"fewer messages \(about (\d+) minutes\)", _help("bench/run.py"))
    for doc, minutes in _quoted(r"--quick`?[^.\n`]{0,60}?about (\d+)"):
        assert minutes == helped, f"{doc} says {minutes} minutes for --quick, --help {helped}"


def test_durations_agree_with_the_makefile() -> None:
    makefile = _text(ROOT / "Makefile")
    (soak,) = re.findall(r"# Not in CI: (\d+) minutes at", makefile)
    assert re.search(rf"\[--minutes {soak}\]", _text(ROOT / "scripts" / "soak.py"))
    (cold,) = re.findall(r"\(~(\d+) min cold on two cores", makefile)
    quoted = _quoted(r"about (\d+) minutes on two cores") + _quoted(
        r"\(about (\d+) minutes on two cores\)")
    assert quoted, "the cold control-plane build is quoted somewhere"
    for doc, minutes in quoted:
        assert minutes == cold, f"{doc}: {minutes} minutes, the Makefile ~{cold}"


_SIZE = {"": 1, "b": 1, "k": 1 << 10, "ki": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
         "mi": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gi": 1 << 30, "gib": 1 << 30}


def _run_defaults() -> dict[str, str]:
    """``inference-worker run --help``: flag and WORKER_* variable -> its default."""
    text = " ".join(_help("-m", "worker.cli", "run").split())
    defaults: dict[str, str] = {}
    for block in re.split(r"(?= --[a-z][a-z0-9-]+ [A-Z|])", text):
        flag = re.match(r" (--[a-z][a-z0-9-]+)", block)
        default = re.search(r"\(default ([^)\s]+)\)", block)
        env = re.search(r"\[(WORKER_[A-Z0-9_]+)\]", block)
        if flag and default:
            defaults[flag.group(1)] = default.group(1)
            if env:
                defaults[env.group(1)] = default.group(1)
    assert defaults["--metrics-port"] == "8099"
    return defaults


def _number(value: str, unit: str) -> float:
    factor = _SIZE.get(unit.lower(), 1)
    return float(value.replace(",", "")) * factor


def test_quoted_defaults_match_help() -> None:
    """"`--flag` (N unit)" and "`WORKER_FLAG` (N unit)" in the docs say the default."""
    defaults = _run_defaults()
    checked = 0
    for doc in USER_DOCS:
        for m in re.finditer(r"`(--[a-z0-9-]+|WORKER_[A-Z0-9_]+)`\s*\((\d[\d,.]*)\s*([A-Za-z]*)",
                             _text(doc)):
            name, value, unit = m.groups()
            if name not in defaults:
                continue
            default = re.match(r"(\d[\d.]*)([A-Za-z]*)", defaults[name])
            assert default, f"{name}: default {defaults[name]!r} is not a number"
            assert _number(value, unit) == _number(*default.groups()), (
                f"{doc.name}: {m.group()} but --help says {defaults[name]}")
            checked += 1
    assert checked >= 3


# ---------------------------------------------------------------- README commands


def _blocks() -> list[str]:
    """The README's ```sh blocks, backslash-continued lines joined."""
    blocks = re.findall(r"^```sh\n(.*?)^```", _text(README), re.DOTALL | re.MULTILINE)
    return [block.replace("\\\n", " ") for block in blocks]


# First command of each block -> why it is not run here, or the test that runs it.
NOT_RUN_HERE = {
    "kubectl apply": "a cluster: make test-k8s applies every overlay",
    "helm install": "a cluster: make test-k8s installs the chart",
}
RUN_HERE = {
    "make demo": "test_readme_demo_block",
    "inference-worker run": "test_readme_run_block",
    "python -m worker.demo": "test_readme_optimize_block",
    "inference-producer record": "test_readme_shadow_walkthrough",
}


def _block(first: str) -> list[str]:
    (block,) = (b for b in _blocks() if b.lstrip().startswith(first))
    lines = [line.split("  #", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line]


def test_every_readme_block_is_accounted_for() -> None:
    for block in _blocks():
        first = block.lstrip()
        assert any(first.startswith(k) for k in (*NOT_RUN_HERE, *RUN_HERE)), first[:60]
    for name in RUN_HERE.values():
        assert name in globals(), name


def _shell(line: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_readme_optimize_block(tmp_path: Path) -> None:
    """Writes the trained demo MLP and its held-out digits, then the int8 version passes."""
    for line in _block("python -m worker.demo"):
        out = _shell(line, tmp_path)
        assert out.returncode == 0, f"{line}\n{out.stdout}{out.stderr}"
    assert "ACCEPTED, written as version 2" in out.stdout
    assert (tmp_path / "models" / "mnist-mlp" / "2" / "model.onnx").is_file()


@pytest.mark.slow
@pytest.mark.kafka
def test_readme_demo_block(kafka_bootstrap: str) -> None:
    line, suite = _block("make demo")
    assert suite == "make test", "the suite itself is not run from inside it"
    out = _shell(line, ROOT, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.kafka
def test_readme_run_block(kafka_bootstrap: str, kafka_admin: object, tmp_path: Path) -> None:
    """The run command as written (the broker's address and a free metrics port from
    their variables), ready, then stopped with SIGTERM: exit 0."""
    (line,) = _block("inference-worker run")
    argv = shlex.split(line)
    host, port = kafka_bootstrap.rsplit(":", 1)
    if f"{host}:{port}" != "localhost:9092":
        argv[argv.index("--bootstrap-servers") + 1] = kafka_bootstrap  # the test broker
    _ensure_topics(kafka_admin, argv[argv.index("--input-topic") + 1],
                   argv[argv.index("--output-topic") + 1])
    assert _shell("python -m worker.demo models/", tmp_path).returncode == 0
    metrics = _free_port()
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
           "WORKER_METRICS_PORT": str(metrics), "WORKER_GROUP_ID": f"readme-{metrics}"}
    worker = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert worker.poll() is None, worker.communicate()[0][-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/readyz", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "not ready in 60 s"
                time.sleep(0.5)
    finally:
        worker.send_signal(signal.SIGTERM)
        output = worker.communicate(timeout=60)[0]
    assert worker.returncode == 0, output[-3000:]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ensure_topics(admin: object, *topics: str) -> None:
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    for topic in topics:
        with contextlib.suppress(TopicAlreadyExistsError):
            admin.create_topics([NewTopic(topic, 1, 1)])  # type: ignore[attr-defined]


def _recreate_topics(admin: object, *topics: str) -> None:
    """Fresh topics: the walkthrough's names are fixed, and collect reads from the start."""
    from kafka.errors import UnknownTopicOrPartitionError

    for topic in topics:
        with contextlib.suppress(UnknownTopicOrPartitionError):
            admin.delete_topics([topic])  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while set(topics) & set(admin.list_topics()):  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "topics not deleted in 30 s"
        time.sleep(0.5)
    _ensure_topics(admin, *topics)


@pytest.mark.slow
@pytest.mark.kafka
def test_readme_shadow_walkthrough(kafka_bootstrap: str, kafka_admin: object,
                                   tmp_path: Path) -> None:
    """record live traffic, replay it to a shadow worker as versions 1 and 2, collect
    both, compare: every line as written, with traffic on `requests` while it records."""
    lines = _block("inference-producer record")
    topics = {"requests", "shadow-requests", "shadow-predictions"}
    _recreate_topics(kafka_admin, *sorted(topics))
    from worker.demo import write_demo_model

    write_demo_model(tmp_path / "models", 1, seed=7)
    write_demo_model(tmp_path / "models", 2, seed=8)
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
           "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    metrics = _free_port()
    shadow = subprocess.Popen(
        ["inference-worker", "run", "--bootstrap-servers", kafka_bootstrap,
         "--input-topic", "shadow-requests", "--output-topic", "shadow-predictions",
         "--model-repository", "models", "--default-model", "mnist-mlp",
         "--group-id", f"shadow-{metrics}", "--metrics-port", str(metrics)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        record = subprocess.Popen(["bash", "-c", lines[0]], cwd=tmp_path, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(10)  # record starts at the end of the topic: traffic after it joined
        publish = _shell(f"inference-producer publish --bootstrap-servers {kafka_bootstrap} "
                         "--topic requests --format msgpack --model mnist-mlp "
                         "--synthetic 784 --rows 640 --batch-rows 64", tmp_path)
        assert publish.returncode == 0, publish.stderr
        recorded = record.communicate(timeout=600)[0]
        assert record.returncode == 0, recorded
        for line in lines[1:]:
            out = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=300, check=False)
            assert out.returncode == 0, f"{line}\n{out.stdout}{out.stderr}"
    finally:
        shadow.send_signal(signal.SIGTERM)
        shadow.wait(60)
    assert (tmp_path / "v1-vs-v2.png").stat().st_size > 0
    # The 640 recorded rows, answered by both versions, joined by request id.
    assert "joined 640 rows by request id (only in A: 0, only in B: 0)" in out.stdout, out.stdout
    assert "mnist-mlp v1" in out.stdout and "mnist-mlp v2" in out.stdout
