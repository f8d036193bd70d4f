#!/usr/bin/env bash
# Sourced by the airflow_*.sh scripts: one Airflow home inside the project (SQLite,
# LocalExecutor), the project's DAG and plugin folders, and the project importable as
# `tasks` even before `pip install -e .`. Values already exported (e.g. by the Makefile) win.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$ROOT/airflow_home}"
export AIRFLOW__CORE__DAGS_FOLDER="${AIRFLOW__CORE__DAGS_FOLDER:-$ROOT/dags}"
export AIRFLOW__CORE__PLUGINS_FOLDER="${AIRFLOW__CORE__PLUGINS_FOLDER:-$ROOT/plugins}"  # the Report tab
export AIRFLOW__CORE__LOAD_EXAMPLES="${AIRFLOW__CORE__LOAD_EXAMPLES:-False}"
# Airflow's LocalExecutor, whose workers start with torch & co. imported: each task process
# forked from them skips seconds of imports (tasks/preload.py).
export AIRFLOW__CORE__EXECUTOR="${AIRFLOW__CORE__EXECUTOR:-tasks.preload.LocalExecutor}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# `airflow standalone` starts its components as `airflow ...` from PATH.
export PATH="$ROOT/.venv/bin:$PATH"
AIRFLOW="${LORAFLOW_AIRFLOW_BIN:-$ROOT/.venv/bin/airflow}"
PY="$ROOT/.venv/bin/python"
mkdir -p "$AIRFLOW_HOME"

# GPUs, tasks per GPU (LORAFLOW_TASKS_PER_GPU: a number or `auto`, tasks/slots.py) and the
# slots of pool `gpu` (GPUs x k; 1 without a GPU) as GPUS, TASKS_PER_GPU, POOL_SLOTS. The
# resolved k is exported, so every task process leases the same k slots per GPU.
gpu_plan() {
    local plan
    plan="$("$PY" -m tasks.slots)" || return 1
    eval "$plan"
    export LORAFLOW_TASKS_PER_GPU="$TASKS_PER_GPU"
}
set_gpu_pool() {
    gpu_plan
    "$AIRFLOW" pools set gpu "$POOL_SLOTS" \
        "training tasks (LoRA, full fine-tuning, linear probe): $TASKS_PER_GPU per GPU; $GPUS GPU(s) found" \
        >/dev/null
}
