#!/usr/bin/env python3
"""A picture of the Grafana dashboard, drawn from its own queries on a live worker.

    scripts/dashboard_picture.py [--seconds 120] [--out docs/images/dashboard.png]

1. A worker process serves the demo model; Prometheus (built once by
   ``scripts/go-tool prometheus install``) scrapes its /metrics every second
   with the labels the compose scrape gives (``namespace="compose"``).
2. A feeder publishes at a rate that steps up and down over ``--seconds``, with
   a burst of undecodable records halfway (dead letters).
3. Every target of every panel of ``deploy/grafana/inference-worker.json`` is
   asked of Prometheus' ``query_range`` API (``$namespace`` and ``$model`` as
   "All", ``$__rate_interval`` as 5 s), and the answers are drawn at the
   panels' own grid positions: stat panels as their last value, time series as
   lines. Grafana itself draws the same queries; this is its layout, not its
   pixels.

Uses ``--bootstrap-servers`` or ``KAFKA_BOOTSTRAP_SERVERS``, else starts (or
reuses) ``scripts/kafka-local``. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from kafka import KafkaProducer  # noqa: E402
from soak import Feeder, Pool, _bootstrap, _create, _free_port, start_worker  # noqa: E402

from worker.demo import write_demo_model  # noqa: E402

DASHBOARD = ROOT / "deploy" / "grafana" / "inference-worker.json"
RATE_INTERVAL = "5s"
STEP_S = 2
# (share of --seconds, messages/s): the load steps up, then down.
PHASES = ((0.3, 40.0), (0.4, 160.0), (0.3, 80.0))
BAD_RECORDS = 200
BG, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"


def _query(expr: str) -> str:
    return (
        expr.replace('"$namespace"', '"compose"')
        .replace('"$model"', '".*"')
        .replace("$__rate_interval", RATE_INTERVAL)
    )


def _get(base: str, path: str, **params: Any) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        body = json.loads(response.read())
    if body.get("status") != "success":
        raise RuntimeError(f"{path}: {body}")
    return body["data"]


@contextmanager
def prometheus(target: str, workdir: Path) -> Iterator[str]:
    built = subprocess.run(
        [str(ROOT / "scripts" / "go-tool"), "prometheus", "install"],
        capture_output=True, text=True, check=False,
    )
    if built.returncode != 0:
        sys.exit(f"dashboard_picture: building Prometheus failed:\n{built.stderr[-2000:]}")
    binary = built.stdout.strip().splitlines()[-1]
    config = workdir / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: inference-worker\n"
        f"    static_configs: [{{targets: ['{target}'], "
        "labels: {namespace: compose, pod: worker-0}}]\n"
    )
    port = _free_port()
    log = (workdir / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _get(base, "/api/v1/query", query="up")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit("dashboard_picture: Prometheus did not start; see its log in "
                             f"{workdir / 'prometheus.log'}")
                time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _bad(bootstrap: str, topic: str, count: int) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for n in range(count):
        producer.send(topic, value=b"\xc1 not a request", key=str(n).encode())
    producer.flush(30)
    producer.close()


def load(bootstrap: str, topic: str, pool: Pool, seconds: float) -> None:
    """The phases of PHASES, and BAD_RECORDS undecodable records halfway (a few at the
    start too: a rate needs the counter's series to exist before the burst)."""
    _bad(bootstrap, topic, 3)
    for i, (share, per_s) in enumerate(PHASES):
        print(f"  {per_s:.0f} msg/s for {share * seconds:.0f} s", flush=True)
        feeder = Feeder(bootstrap, topic, pool, per_s)
        feeder.start()
        try:
            if i == 1:
                time.sleep(share * seconds / 2)
                _bad(bootstrap, topic, BAD_RECORDS)
                time.sleep(share * seconds / 2)
            else:
                time.sleep(share * seconds)
        finally:
            feeder.halt.set()
            feeder.join(60)


def _label(metric: dict[str, str], legend: str | None) -> str:
    if legend:
        return legend.replace("{{", "{").replace("}}", "}").format_map(_Missing(metric))
    return ", ".join(f"{k}={v}" for k, v in sorted(metric.items())) or "value"


class _Missing(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "-"


def _human(value: float, unit: str | None) -> str:
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= div:
            return f"{value / div:.1f}{suffix}"
    return f"{value:.3g}" if value else "0"


def draw(base: str, start: float, end: float, out: Path) -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit_h = 0.42  # inches per grid row
    fig = plt.figure(figsize=(20, bottom * unit_h), facecolor=BG)
    for panel in panels:
        g = panel["gridPos"]
        left, width = g["x"] / 24, g["w"] / 24
        top, height = 1 - g["y"] / bottom, g["h"] / bottom
        if panel["type"] == "row":
            fig.text(left + 0.005, top - height / 2, panel["title"], color=TEXT,
                     fontsize=13, weight="bold", va="center")
            continue
        # Room on the left for the value ticks, below for the seconds.
        ax = fig.add_axes((left + 0.03, top - height + 0.012, width - 0.036, height - 0.024))
        ax.set_facecolor(PANEL)
        for spine in ax.spines.values():
            spine.set_color(GRID)
        ax.set_title(panel["title"], color=TEXT, fontsize=9, loc="left")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        series = []
        for target in panel.get("targets", []):
            data = _get(base, "/api/v1/query_range", query=_query(target["expr"]),
                        start=start, end=end, step=STEP_S)
            for result in data["result"]:
                points = [(float(t) - start, float(v)) for t, v in result["values"]
                          if v not in ("NaN", "+Inf", "-Inf")]
                if points:
                    series.append((_label(result["metric"], target.get("legendFormat")), points))
        if panel["type"] == "stat":
            ax.set_xticks([])
            ax.set_yticks([])
            shown = _human(series[0][1][-1][1], unit) if series else "No data"
            ax.text(0.5, 0.45, shown, color="#73bf69", fontsize=26, ha="center",
                    va="center", transform=ax.transAxes)
            continue
        ax.tick_params(colors=TEXT, labelsize=7)
        ax.set_xlabel("seconds", color=TEXT, fontsize=7, labelpad=1)
        ax.grid(color=GRID, linewidth=0.5)
        if not series:
            ax.text(0.5, 0.5, "No data", color=TEXT, ha="center", va="center",
                    transform=ax.transAxes)
            continue
        for label, points in series[:8]:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, linewidth=1.2, label=label[:48])
        ax.legend(fontsize=6, loc="upper left", facecolor=PANEL, labelcolor=TEXT,
                  edgecolor=GRID)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72, facecolor=BG)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="load length (default 120)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "dashboard.png")
    parser.add_argument("--bootstrap-servers", default=None)
    args = parser.parse_args(argv)
    if args.seconds < 30:
        parser.error("--seconds: at least 30 (the load has three phases)")
    bootstrap = _bootstrap(args.bootstrap_servers)
    with tempfile.TemporaryDirectory(prefix="dashboard-") as tmp:
        workdir = Path(tmp)
        repo = workdir / "models"
        write_demo_model(repo)
        topic = f"dashboard-{uuid.uuid4().hex[:8]}"
        _create(bootstrap, topic)
        # librdkafka's statistics every second feed the "librdkafka" panels.
        stats = ["--kafka-option", "statistics.interval.ms=1000"]
        worker = start_worker(bootstrap, topic, repo, workdir, "worker", stats)
        try:
            with prometheus(f"127.0.0.1:{worker.metrics_port}", workdir) as base:
                start = time.time()
                load(bootstrap, topic, Pool(rows=8), args.seconds)
                time.sleep(5)  # the last answers and scrapes
                draw(base, start, time.time(), args.out)
        finally:
            worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
