"""Nothing stuck: a worker whose commits are refused says so, a stuck model run never
holds the exit.

Commits refused while records are answered, with one broker: a group that
never becomes stable. Two silent members join the worker's group with the
group protocol's own requests (raw JoinGroup v2, nothing else): the first
completes a generation and then never speaks again; the second joins, which
starts a rebalance that waits for the first until its session expires. For
that whole time the broker refuses the worker's OffsetCommit
(REBALANCE_IN_PROGRESS) while records keep arriving. ``/healthz`` must turn
503 once no commit succeeded for the session timeout while records are
pending, ``inference_worker_last_commit_age_seconds`` must grow, both recover
when the group settles, and a SIGTERM meanwhile still ends the process within
``--drain-timeout`` (a commit that waits for the rebalance must not hold it).

(An ACL that denies the group's READ refuses heartbeats and joins too, and a
fault proxy in front of a single broker cuts fetches with commits, so neither
isolates the commit path on one broker.)
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.brokers import Feeder, committed_offsets, reading
from tests.harness import ROOT, demo_requests, produce, worker_process
from worker.protocol import encode_request

pytestmark = pytest.mark.kafka


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _commit_age(port: int) -> float:
    _, text = _get(port, "/metrics")
    m = re.search(r"^inference_worker_last_commit_age_seconds (\S+)$", text, re.M)
    assert m, "no inference_worker_last_commit_age_seconds sample"
    return float(m.group(1))


# -- a silent group member, in the group protocol's own bytes ---------------------


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">h", len(b)) + b


def _join_group(
    bootstrap: str, group: str, session_ms: int, *, wait: bool
) -> tuple[socket.socket, int]:
    """JoinGroup v2 as a member subscribed to a topic nobody writes; returns the open
    socket (kept: a closed one is still a member until its session expires) and, when
    ``wait``, the response's error code (the response comes once the rebalance ends)."""
    host, port = bootstrap.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=60)
    # ConsumerProtocolSubscription v1: topics, no user data, no owned partitions
    subscription = struct.pack(">h", 1) + struct.pack(">i", 1) + _str("silent-none")
    subscription += struct.pack(">i", -1) + struct.pack(">i", 0)
    body = _str(group) + struct.pack(">ii", session_ms, 60_000) + _str("") + _str("consumer")
    body += struct.pack(">i", 1) + _str("cooperative-sticky")
    body += struct.pack(">i", len(subscription)) + subscription
    header = struct.pack(">hhi", 11, 2, 1) + _str("silent-member")
    request = header + body
    sock.sendall(struct.pack(">i", len(request)) + request)
    if not wait:
        return sock, 0
    size = struct.unpack(">i", _recv(sock, 4))[0]
    response = _recv(sock, size)
    error = struct.unpack_from(">h", response, 8)[0]  # after correlation id, throttle
    return sock, error


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("the broker closed the connection")
        buf += chunk
    return buf


def _requests(n: int, prefix: str) -> list[tuple[bytes, bytes, list]]:
    return demo_requests(n, prefix, seed=3)


def _unsettle(bootstrap: str, group: str, silent_s: int) -> list[socket.socket]:
    """Make ``group`` rebalance for about ``silent_s`` seconds from now."""
    # First silent member: a generation with it completes once the worker rejoins.
    first, error = _join_group(bootstrap, group, silent_s * 1000, wait=True)
    assert error == 0, f"JoinGroup error {error}"
    # Second: its join waits for the first, which never rejoins.
    return [first, _join_group(bootstrap, group, silent_s * 1000, wait=False)[0]]


@pytest.mark.slow  # over 12 s: make test stays under its 10 minutes
def test_commits_refused_past_the_session_timeout_turn_healthz_503_and_age_grows(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    model_repo: Path,
    kafka_client: str,
    tmp_path: Path,
) -> None:
    session_s, silent_s = 6, 15
    requests, outputs = new_topic(), new_topic()
    port = _free_port()
    args = ["--bootstrap-servers", kafka_bootstrap, "--input-topic", requests]
    args += ["--output-topic", outputs, "--model-repository", str(model_repo)]
    args += ["--group-id", group_id, "--metrics-port", str(port), "--device", "cpu"]
    # Records must be pending when the rebalance starts: kafka-python fetches nothing
    # while its group rebalances, so a commit just before that which covers every
    # polled record leaves nothing pending, and /healthz is rightly 200. Commits 2 s
    # apart and 50 records a second leave that window ~1% of the time (at 100 ms and
    # 20 a second the worker held 1-3 records then, and once in CI none).
    args += ["--kafka-client", kafka_client, "--commit-interval-ms", "2000"]
    args += ["--kafka-option", f"session.timeout.ms={session_s * 1000}"]
    args += ["--kafka-option", "heartbeat.interval.ms=500", "--log-level", "INFO"]
    log = tmp_path / "worker.log"
    feeder = Feeder(kafka_bootstrap, requests, _requests(4000, "s"), per_s=50)
    feeder.start()
    assert feeder.flowing.wait(30)
    proc = worker_process(args, log_path=log)
    sockets: list[socket.socket] = []
    try:
        with reading(kafka_bootstrap, outputs) as out:
            assert out.until(lambda rs: len(rs) >= 20, 60), log.read_text()[-3000:]
            assert _get(port, "/healthz")[0] == 200
            sockets += _unsettle(kafka_bootstrap, group_id, silent_s)
            stuck_at = time.monotonic()
            status, why = 200, ""
            deadline = stuck_at + session_s + 10
            while time.monotonic() < deadline:
                out.read(0.2)
                assert proc.poll() is None, "the worker exited:\n" + log.read_text()[-3000:]
                status, why = _get(port, "/healthz")
                if status == 503:
                    break
            assert status == 503, f"/healthz stayed {status} ({why}):\n{log.read_text()[-3000:]}"
            assert "commits stalled" in why
            print(f"{time.monotonic() - stuck_at:.1f} s after the rebalance began: {why}")
            age = _commit_age(port)
            assert age >= session_s, age
            # Nothing is committed meanwhile (whether records are still fetched during a
            # rebalance is the client's business: kafka-python stops fetching).
            committed_then = committed_offsets(kafka_bootstrap, group_id, requests).get(0, 0)
            out.settle(2.0)
            assert _commit_age(port) >= age + 1.5, "the commit age does not grow"
            assert committed_offsets(kafka_bootstrap, group_id, requests).get(0, 0) == (
                committed_then
            )
            assert committed_then < feeder.sent, "everything published was committed"
            # The first member's session expires: the group settles, commits resume.
            deadline = stuck_at + silent_s + 30
            while time.monotonic() < deadline and proc.poll() is None:
                out.read(0.2)
                if _get(port, "/healthz")[0] == 200 and _commit_age(port) < session_s:
                    break
            assert proc.poll() is None, "the worker exited:\n" + log.read_text()[-3000:]
            assert _get(port, "/healthz")[0] == 200, log.read_text()[-3000:]
            assert committed_offsets(kafka_bootstrap, group_id, requests).get(0, 0) > (
                committed_then
            )
    finally:
        feeder.halt.set()
        for s in sockets:
            s.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        feeder.join(30)


@pytest.mark.parametrize(
    "kafka_client",
    [
        "confluent",
        pytest.param("kafka-python", marks=pytest.mark.slow),  # the kafka-python half: slow
    ],
)
def test_sigterm_while_the_group_never_settles_exits_within_drain_timeout(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    model_repo: Path,
    kafka_client: str,
    tmp_path: Path,
) -> None:
    drain_s, slack_s, silent_s = 3.0, 5.0, 40
    requests, outputs = new_topic(), new_topic()
    args = ["--bootstrap-servers", kafka_bootstrap, "--input-topic", requests]
    args += ["--output-topic", outputs, "--model-repository", str(model_repo)]
    args += ["--group-id", group_id, "--metrics-port", "0", "--device", "cpu"]
    args += ["--kafka-client", kafka_client, "--commit-interval-ms", "100"]
    args += ["--kafka-option", "session.timeout.ms=6000", "--drain-timeout", str(drain_s)]
    args += ["--kafka-option", "heartbeat.interval.ms=500", "--log-level", "INFO"]
    log = tmp_path / "worker.log"
    feeder = Feeder(kafka_bootstrap, requests, _requests(2000, "t"), per_s=20)
    feeder.start()
    assert feeder.flowing.wait(30)
    proc = worker_process(args, log_path=log)
    sockets: list[socket.socket] = []
    try:
        with reading(kafka_bootstrap, outputs) as out:
            assert out.until(lambda rs: len(rs) >= 10, 60), log.read_text()[-3000:]
        sockets += _unsettle(kafka_bootstrap, group_id, silent_s)
        time.sleep(1.0)  # a commit already on the wire lands or is refused
        committed_then = committed_offsets(kafka_bootstrap, group_id, requests).get(0, 0)
        time.sleep(2.0)  # the rebalance is under way; commits are refused
        assert proc.poll() is None, log.read_text()[-3000:]
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(drain_s + slack_s)
        took = time.monotonic() - sent
        assert proc.poll() is not None, (
            f"still running {took:.0f} s after SIGTERM (--drain-timeout {drain_s:g}):\n"
            + log.read_text()[-3000:]
        )
        # Commits were refused from the rebalance to the exit, drain included.
        committed_now = committed_offsets(kafka_bootstrap, group_id, requests).get(0, 0)
        assert committed_now == committed_then, (committed_then, committed_now)
        with reading(kafka_bootstrap, outputs) as out:
            out.settle(2.0)
            answered = {int((r.header("request-id") or "t--1")[2:]) for r in out.records}
        # Exit 0 says everything answered was committed; answers past the committed
        # offset (one partition, published in order) make it exit 1.
        uncommitted = len({i for i in answered if i >= committed_now})
        print(f"{kafka_client}: exit {proc.returncode} {took:.1f} s after SIGTERM, {uncommitted} "
              f"answers uncommitted (committed offset {committed_now})")
        assert proc.returncode == (1 if uncommitted else 0), (
            f"exit {proc.returncode} with {uncommitted} answers uncommitted:\n"
            + log.read_text()[-3000:]
        )
    finally:
        feeder.halt.set()
        for s in sockets:
            s.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        feeder.join(30)


_STUCK_IN_A_CALL = """
import sys, threading
from contextlib import ExitStack
from worker.loop import Worker
from worker.settings import Settings

worker = Worker(Settings(input_topics=("in",), output_topic="out", model_repository=".",
                         drain_timeout_s=float(sys.argv[1])))
with ExitStack() as stack:
    worker._install_signal_handlers(stack)
    print("ready", flush=True)
    threading.Event().wait()  # a call that never returns, whatever the signal handler does
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_the_process_when_the_loop_thread_never_comes_back(
    sig: signal.Signals,
) -> None:
    # The loop's thread stuck in a call (as in a librdkafka commit waiting out a
    # rebalance) cannot run the stop: the watchdog ends the process after
    # --drain-timeout and its slack, exit status 1, saying why.
    drain_s = 1.0
    with subprocess.Popen(
        [sys.executable, "-c", _STUCK_IN_A_CALL, str(drain_s)], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            sent = time.monotonic()
            proc.send_signal(sig)
            _out, err = proc.communicate(timeout=15)
            took = time.monotonic() - sent
        finally:
            proc.kill()
    assert proc.returncode == 1, err
    assert drain_s <= took < drain_s + 5, took
    assert "a call into the Kafka client is stuck" in err


def test_without_a_stop_signal_the_watchdog_never_ends_the_process() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _STUCK_IN_A_CALL, "0.1"], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            time.sleep(3.0)
            assert proc.poll() is None, proc.communicate()[1]
        finally:
            proc.kill()


# -- SIGTERM while a model run is stuck ------------------------------------------------


def _write_stuck_model(repo: Path) -> None:
    """x float32[?,16] -> y float32[?,4] after a Loop of max(x) 256x256 MatMul+Tanh
    steps (milliseconds each): a request of large values runs for hours, while a
    warm-up run of zeros returns at once."""
    n = 256
    rng = np.random.default_rng(4)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "w"], ["mm"]),
            helper.make_node("Tanh", ["mm"], ["h_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "step",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [n, n]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [n, n]),
        ],
    )
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
        helper.make_node("Add", ["base", "m"], ["h0"]),
        helper.make_node("ReduceMax", ["x"], ["top"], keepdims=0),
        helper.make_node("Cast", ["top"], ["trips"], to=TensorProto.INT64),
        helper.make_node("Loop", ["trips", "yes", "h0"], ["hn"], body=body),
        helper.make_node("ReduceMean", ["hn"], ["s"], keepdims=0),
        helper.make_node("MatMul", ["x", "wx"], ["xw"]),
        helper.make_node("Add", ["xw", "s"], ["y"]),
    ]
    inits = {
        "base": rng.normal(size=(n, n)).astype(np.float32),
        "w": (rng.normal(size=(n, n)) / np.sqrt(n)).astype(np.float32),
        "wx": rng.normal(size=(16, 4)).astype(np.float32),
        "yes": np.array(True),
    }
    graph = helper.make_graph(
        nodes,
        "stuck",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = repo / "stuck" / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def test_sigterm_during_a_stuck_model_run_exits_1_within_drain_timeout(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    tmp_path: Path,
    kafka_client: str,
) -> None:
    drain_s, slack_s = 3.0, 5.0
    repo = tmp_path / "models"
    _write_stuck_model(repo)
    requests, outputs = new_topic(), new_topic()
    value, headers = encode_request(
        {"x": np.full((1, 16), 1e6, np.float32)}, format="msgpack", model="stuck"
    )
    produce(kafka_bootstrap, requests, [(b"k", value, headers)])
    args = ["--bootstrap-servers", kafka_bootstrap, "--input-topic", requests]
    args += ["--output-topic", outputs, "--model-repository", str(repo)]
    args += ["--group-id", group_id, "--metrics-port", "0", "--device", "cpu"]
    args += ["--kafka-client", kafka_client, "--drain-timeout", str(drain_s)]
    args += ["--log-level", "INFO"]
    log = tmp_path / "worker.log"
    proc = worker_process(args, log_path=log)
    try:
        deadline = time.monotonic() + 60
        while "model stuck:1 loaded" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        assert "model stuck:1 loaded" in log.read_text(), log.read_text()[-3000:]
        time.sleep(1.0)  # the batch window closes; the run is under way
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(drain_s + slack_s + 30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert rc == 1, f"exit status {rc}:\n{log.read_text()[-3000:]}"
    assert took <= drain_s + slack_s, f"exit took {took:.1f} s:\n{log.read_text()[-3000:]}"
    with reading(kafka_bootstrap, outputs) as out:
        out.settle(1.0)
    assert not out.records, "an answer appeared for a run that never finished"
    # Never committed: the restart answers it.
    assert committed_offsets(kafka_bootstrap, group_id, requests).get(0) in (None, 0)
