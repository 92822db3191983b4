# One command per job; each works on a fresh clone (creates .venv, installs
# what is missing, fetches the Kafka jars).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# onnxruntime-gpu where a GPU answers, onnxruntime otherwise: never both.
EXTRA := $(shell nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(EXTRA)
# Every package `make install` puts in the venv, pinned with hashes
# (scripts/lock.py; `make lock` rewrites the locks after pyproject.toml changes).
LOCK := requirements/dev-$(EXTRA).lock
OTHER_ORT := $(if $(filter gpu,$(EXTRA)),onnxruntime,onnxruntime-gpu)
PYTEST_ARGS ?=

.PHONY: install lock system-deps kafka-jars toxiproxy test test-slow test-k8s demo lint bench soak clean

install: $(STAMP)

# A lock that pyproject.toml has outgrown is not used: the install then resolves
# from pyproject.toml (as before the locks), and says to run `make lock`.
$(STAMP): pyproject.toml $(wildcard $(LOCK))
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# Both wheels own the module onnxruntime: a venv switching kind loses both first.
	@if $(PY) -m pip show -q $(OTHER_ORT) >/dev/null 2>&1; then \
	  $(PY) -m pip uninstall -q -y onnxruntime onnxruntime-gpu; fi
	@set -e; if $(PY) scripts/lock.py check $(LOCK); then \
	  set -x; $(PY) -m pip install -q -r $(LOCK); \
	  PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q --no-deps --no-build-isolation -e .; \
	else \
	  set -x; PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e ".[$$($(PY) scripts/lock.py extras $(LOCK))]"; \
	fi
	@rm -f $(VENV)/.installed-*
	@touch $@

# Rewrites requirements/*.lock from pyproject.toml, keeping the pins that still
# fit (LOCK_ARGS=--upgrade: the newest versions instead); needs PyPI.
lock: install
	@test -x $(VENV)/bin/uv || $(PY) -m pip install -q uv
	$(PY) scripts/lock.py compile $(LOCK_ARGS)

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

# The fault proxy of the connection-reset tests, built once with Go into ~/.cache.
toxiproxy:
	@scripts/toxiproxy install >/dev/null

# Prometheus' promtool (the alerting rules' unit tests, the compose Prometheus
# config), Helm (the chart's lint, template and install) and Docker Compose
# (`docker-compose config` on docker-compose.yml), each built once with Go into
# ~/.cache (a few minutes cold on two cores).
.PHONY: promtool helm compose
promtool:
	@scripts/promtool install >/dev/null
helm:
	@scripts/helm install >/dev/null
compose:
	@scripts/go-tool compose install >/dev/null

# lint first: a lint error fails the run before the slow tests start.
test: lint kafka-jars kubectl toxiproxy promtool helm compose
	$(PY) -m pytest -m "not slow and not k8s" --durations=25 $(PYTEST_ARGS)

test-slow: install kafka-jars toxiproxy
	$(PY) -m pytest -m slow --durations=25 $(PYTEST_ARGS)

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
test-k8s: install kubectl helm
	PYTHON=$(PY) scripts/kube-local test $(PYTEST_ARGS)

# On a GPU machine without a package registry: gathers the onnxruntime-gpu
# wheel's parts (made here by `bench/gpu_check.py pack`, one carried per call),
# installs the wheel and prints the device check as JSON (docs/performance.md).
.PHONY: gpu-check
gpu-check:
	$(if $(wildcard $(PY)),$(PY),python3) bench/gpu_check.py $(GPU_CHECK_ARGS)

# Not in `make test` nor CI (about an hour on two cores): mutation testing of the
# delivery core, the loop and its policies against their unit tests on the fakes, no
# broker ([tool.mutmut] in pyproject.toml). The loop's tests mostly wait, so more
# workers than cores keep the cores busy. Survivors and why they are harmless:
# docs/testing.md. Fails below MUTATION_MIN %.
MUTATION_JOBS ?= 16
MUTATION_MIN ?= 95
.PHONY: mutation
mutation: install
	rm -rf mutants
	nice -n 10 $(VENV)/bin/mutmut run --max-children $(MUTATION_JOBS) > .mutmut.log 2>&1 \
	  || { tail -c 4000 .mutmut.log; exit 1; }
	$(PY) scripts/mutation_score.py --mutmut $(VENV)/bin/mutmut --min $(MUTATION_MIN)
