# One command per job; each works on a fresh clone (creates .venv, installs
# what is missing, fetches the Kafka jars).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# onnxruntime-gpu where a GPU answers, onnxruntime otherwise: never both.
EXTRA := $(shell nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(EXTRA)
PYTEST_ARGS ?=

.PHONY: install system-deps kafka-jars test test-slow test-k8s demo lint bench soak clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRA),test,dev]"
	@rm -f $(VENV)/.installed-*
	@touch $@

# Debian packages the project needs where missing (Java 17 for the broker,
# Maven to fetch its jars); kubectl for the manifest tests.
system-deps:
	@missing=""; \
	command -v java >/dev/null || missing="$$missing openjdk-17-jre-headless"; \
	command -v mvn >/dev/null || missing="$$missing maven"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

kafka-jars: system-deps
	@scripts/kafka-local fetch

kubectl: install
	@VENV=$(VENV) scripts/install-kubectl

test: install kafka-jars kubectl
	$(PY) -m pytest -m "not slow and not k8s" $(PYTEST_ARGS)

test-slow: install kafka-jars
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

demo: install kafka-jars
	$(PY) scripts/demo.py

lint: install
	$(VENV)/bin/ruff check worker producers tests bench scripts
	$(VENV)/bin/mypy

bench: install kafka-jars
	$(PY) bench/run.py

# Not in CI: 10 minutes at 80% of the measured maximum; throughput, lag and RSS as a PNG.
soak: install kafka-jars
	$(PY) scripts/soak.py $(SOAK_ARGS)

clean:
	-scripts/kafka-local stop
	rm -rf $(VENV) .kafka-local models .pytest_cache .mypy_cache .ruff_cache .hypothesis

# Not in `make test`: builds kube-apiserver, controller-manager, scheduler,
# etcd and KWOK once (~15 min cold on two cores, into ~/.cache/inference-worker-k8s),
# runs the manifests against them (tests/test_k8s_cluster.py), stops the cluster.
test-k8s: install kubectl
	PYTHON=$(PY) scripts/kube-local test $(PYTEST_ARGS)

# On a GPU machine without a package registry: gathers the onnxruntime-gpu
# wheel's parts (made here by `bench/gpu_check.py pack`, one carried per call),
# installs the wheel and prints the device check as JSON (docs/performance.md).
.PHONY: gpu-check
gpu-check:
	$(if $(wildcard $(PY)),$(PY),python3) bench/gpu_check.py $(GPU_CHECK_ARGS)
