# `make run` and `make test` work as the first command on a fresh clone: both install
# what they need first (README.md). Everything lives in .venv.
SHELL := /bin/bash
PY := .venv/bin/python
PIP := .venv/bin/pip
# Written by the last successful setup; older than pyproject.toml or constraints.txt
# means the installed set is stale, and the next target that needs .venv reinstalls.
SETUP_DONE := .venv/.setup-done
export LORAFLOW_DATA ?= $(abspath ../shared/data/imdb)
export AIRFLOW_HOME ?= $(CURDIR)/airflow_home
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export HF_HUB_OFFLINE ?= 0
# Training tasks per GPU (pool `gpu` = GPUs x k; tasks/slots.py): a number, or `auto` to fit
# free GPU memory. Without a GPU it is 1 whatever it says.
export LORAFLOW_TASKS_PER_GPU ?= auto
PRESET ?= cpu
PORT ?= 8280
CLUSTER_PORT ?= 8380
MLFLOW_PORT ?= 5080
GPU_WORKERS ?=

.PHONY: setup test test-fast run ui cluster cluster-stop mlflow bench lint clean

setup:  ## (re)install everything, even when it looks up to date
	$(MAKE) --always-make $(SETUP_DONE) $(MLFLOW_DONE)

# .venv: CPU torch where no CUDA GPU is present, then the project and dev tools; Chromium
# for the browser tests; the Airflow home.
$(SETUP_DONE): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch==2.13.0 -c constraints.txt; fi
	$(PIP) install -q -e '.[dev,celery]' -c constraints.txt
	bash scripts/install_chromium.sh
	bash scripts/airflow_init.sh
	touch $@

# The MLflow server's own .venv-mlflow (`make mlflow` and the tracking tests): only the
# targets that need it install it, so `make run` on a fresh clone does not wait for it.
MLFLOW_DONE := .venv-mlflow/.setup-done
$(MLFLOW_DONE): scripts/mlflow_server.constraints.txt scripts/mlflow_server.sh
	bash scripts/mlflow_server.sh install
	touch $@

# Both print their 25 slowest tests: the suite's time budget, visible. pytest-xdist workers share
# the suite; the tests of one shared run (the cluster, the real Airflow, the session's smoke run,
# the dag.test run) stay in one worker, and those groups start first (tests/conftest.py).
# `make test` runs three workers on the two cores: the cluster's and the real Airflow's groups
# mostly wait on their own servers, and the third worker uses that time (here: 7 min 38 s with
# two, 6 min 59 s with three, on the same tree). test-fast never waits: two.
# TEST_WORKERS=N sets either; TEST_WORKERS=0: one process.
TEST_WORKERS ?=
test: WORKERS := $(or $(TEST_WORKERS),3)
test-fast: WORKERS := $(or $(TEST_WORKERS),2)
PYTEST = $(PY) -m pytest -q --durations=25 -n $(WORKERS) --dist loadscope --no-loadscope-reorder
test: $(SETUP_DONE) $(MLFLOW_DONE)  ## the whole suite, slow tests included (what CI runs)
	$(PYTEST)

test-fast: $(SETUP_DONE)  ## skip the slow, browser, scheduler and cluster tests
	$(PYTEST) -m "not slow and not browser and not scheduler and not cluster"

run: $(SETUP_DONE)  ## the whole DAG on this machine (embedded MiniLM, local IMDB), then print the report path
	bash scripts/run_dag.sh $(PRESET)

ui: $(SETUP_DONE)  ## Airflow web UI (standalone) on http://127.0.0.1:$(PORT)
	bash scripts/airflow_ui.sh $(PORT)

cluster: $(SETUP_DONE)  ## CeleryExecutor on this machine (PostgreSQL, Redis, default + GPU_WORKERS gpu workers), API on CLUSTER_PORT
	$(PY) scripts/loraflow_cluster.py start --port $(CLUSTER_PORT) $(if $(GPU_WORKERS),--gpu-workers $(GPU_WORKERS))

cluster-stop:  ## stop every process `make cluster` started
	$(PY) scripts/loraflow_cluster.py stop

mlflow: $(MLFLOW_DONE)  ## MLflow tracking server on http://127.0.0.1:$(MLFLOW_PORT) (SQLite, artifacts in mlflow_home/); runs tracked when MLFLOW_TRACKING_URI points at it
	bash scripts/mlflow_server.sh serve $(MLFLOW_PORT)

bench: $(SETUP_DONE)
	.venv/bin/loraflow bench

# `ruff format` would rewrite most of the older modules (their hanging indents align with the
# opening bracket, which it never does), so the format check covers the files already in its
# format; a file joins the list once it is formatted (`ruff format FILE`), alone in a commit.
FORMATTED := tasks/job.py tasks/steps.py tasks/sources.py tasks/methods/__init__.py \
	tasks/methods/full_finetune.py bench/common.py bench/inference.py \
	scripts/cluster_api.py scripts/cluster_env.py scripts/cluster_processes.py \
	scripts/loraflow_hostname.py tests/test_import_graph.py tests/tasks/conftest.py \
	tests/plugins/conftest.py tests/cluster/__init__.py

lint: $(SETUP_DONE)
	.venv/bin/ruff check lora_core tasks dags plugins tests bench scripts
	.venv/bin/ruff format --check $(FORMATTED)

clean:
	rm -rf artifacts airflow_home airflow_cluster mlflow_home reports/*/ reports/index.html
