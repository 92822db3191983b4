"""`make demo` end to end: the script trains, serves and reports accuracy through a real
broker and a real worker process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parent.parent


def test_demo_prints_accuracy_throughput_latency_and_digits(kafka_bootstrap: str) -> None:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout
    assert done.returncode == 0, done.stderr[-2000:] + out
    assert "predictions: 10000 rows in 200 responses" in out
    accuracy = re.search(r"^accuracy: +(\d+\.\d)% ", out, flags=re.MULTILINE)
    assert accuracy and float(accuracy.group(1)) > 90.0, out
    assert re.search(r"^throughput: +[\d,]+ rows/s", out, flags=re.MULTILINE)
    assert re.search(r"^latency: +p50 [\d.]+ ms, p99 [\d.]+ ms", out, flags=re.MULTILINE)
    captions = re.findall(r"(\d) \(p=[01]\.\d\d\) true (\d)", out)
    assert len(captions) == 5
