# syntax=docker/dockerfile:1
#
# Two images from one file:
#   docker build -t inference-worker:gpu .                 # default: CUDA 13 + cuDNN 9
#   docker build -t inference-worker:cpu --target cpu .    # slim, onnxruntime (CPU)
#
# Each image builds a virtualenv in a builder stage and copies only that venv
# into the runtime stage: no compilers, pip caches or sources in the final image.
# The venv comes from requirements/{cpu,gpu}.lock (hashes checked; `make lock`
# rewrites them), so two builds of one commit install the same files.
# onnxruntime-gpu 1.31 is built against CUDA 13 and cuDNN 9, so the GPU base
# must stay on a 13.x tag (tests/test_deploy.py checks the pair).

ARG PYTHON_IMAGE=python:3.12-slim
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG ONNXRUNTIME_GPU_VERSION=1.31.1

# ---------------------------------------------------------------- cpu builder
FROM ${PYTHON_IMAGE} AS cpu-builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies before the source, from the lock (every version and file hash
# pinned, scripts/lock.py): a code change rebuilds only the layers below this
# one. The cache mount keeps downloaded wheels between builds, outside the image.
COPY requirements/cpu.lock requirements/
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install --require-hashes -r requirements/cpu.lock
COPY pyproject.toml README.md ./
COPY worker/ worker/
COPY producers/ producers/
# --no-deps: the lock installed them all (and setuptools, so no build isolation);
# pip check fails the build if pyproject.toml has a dependency the lock lacks.
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation . \
    && /opt/venv/bin/pip check

# ---------------------------------------------------------------- gpu builder
FROM ${CUDA_IMAGE} AS gpu-builder
ARG ONNXRUNTIME_GPU_VERSION
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv
WORKDIR /src
COPY requirements/gpu.lock requirements/
# The lock must pin the onnxruntime-gpu this CUDA base is chosen for (`make lock`
# takes it from ONNXRUNTIME_GPU_VERSION); checked before gigabytes of wheels download.
RUN cut -d' ' -f1 requirements/gpu.lock | grep -qx "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
    || { echo "requirements/gpu.lock does not pin onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}: run make lock" >&2; exit 1; }
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install --require-hashes -r requirements/gpu.lock
COPY pyproject.toml README.md ./
COPY worker/ worker/
COPY producers/ producers/
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation . \
    && /opt/venv/bin/pip check

# ---------------------------------------------------------------- cpu runtime
FROM ${PYTHON_IMAGE} AS cpu
LABEL org.opencontainers.image.title="inference-worker (cpu)" \
      org.opencontainers.image.description="Streaming ONNX inference on Kafka" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid worker --home-dir /tmp --shell /usr/sbin/nologin worker \
    && mkdir -p /models && chown worker:worker /models
COPY --from=cpu-builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    WORKER_MODEL_REPOSITORY=/models \
    WORKER_METRICS_PORT=8099 \
    WORKER_DEVICE=cpu
WORKDIR /tmp
EXPOSE 8099
USER 10001:10001
# /healthz is 200 while the poll loop makes progress; urlopen raises on 503.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('WORKER_METRICS_PORT', '8099'), timeout=4)"]
# Exec form: the worker is PID 1 and receives SIGTERM itself, so it can drain.
ENTRYPOINT ["inference-worker", "run"]

# ---------------------------------------------------------------- gpu runtime (default)
FROM ${CUDA_IMAGE} AS gpu
LABEL org.opencontainers.image.title="inference-worker (gpu)" \
      org.opencontainers.image.description="Streaming ONNX inference on Kafka, CUDA 13 + cuDNN 9" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
# Only the interpreter: the venv from the builder already holds every package.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid worker --home-dir /tmp --shell /usr/sbin/nologin worker \
    && mkdir -p /models && chown worker:worker /models
COPY --from=gpu-builder /opt/venv /opt/venv
# WORKER_DEVICE=cuda, not auto: a GPU image without a usable GPU exits 2 at
# start (fails fast) instead of quietly serving on CPU.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    WORKER_MODEL_REPOSITORY=/models \
    WORKER_METRICS_PORT=8099 \
    WORKER_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /tmp
EXPOSE 8099
USER 10001:10001
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('WORKER_METRICS_PORT', '8099'), timeout=4)"]
ENTRYPOINT ["inference-worker", "run"]
