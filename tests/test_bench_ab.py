"""bench/bench_ab.py's B sides that need no broker: an extra hidden as if not installed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.bench_ab import HIDEABLE, hidden, main

TRACING_ON = "from worker.tracing import Tracing; print(Tracing.from_environment().enabled)"


def _tracing_enabled(env: dict[str, str]) -> str:
    # An exporter named: tracing is on wherever the SDK can be imported.
    full = {**os.environ, **env, "OTEL_TRACES_EXPORTER": "console"}
    out = subprocess.run([sys.executable, "-c", TRACING_ON], env=full, capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    return out.stdout.strip()


def test_the_otel_extra_hidden_turns_tracing_off_as_if_not_installed() -> None:
    assert _tracing_enabled({}) == "True"  # installed here (the dev lock carries it)
    with hidden(HIDEABLE["otel"]) as env:
        assert _tracing_enabled(env) == "False"


@pytest.mark.parametrize("argv", [[], ["--rev", "HEAD", "--b-without", "otel"],
                                  ["--b-without", "otel", "--", "--inline-below-ms", "0"]])
def test_exactly_one_b_side(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "give one of --rev, --b-without, or B's flags" in capsys.readouterr().err
