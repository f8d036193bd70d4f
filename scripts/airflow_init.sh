#!/usr/bin/env bash
# Create or upgrade the project's Airflow home: metadata DB (SQLite), and the `gpu` pool
# that training tasks use, with GPUs x LORAFLOW_TASKS_PER_GPU slots (1 on a CPU-only machine).
set -euo pipefail
source "$(dirname "$0")/airflow_env.sh"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! "$AIRFLOW" db migrate >"$log" 2>&1; then
    cat "$log" >&2
    echo "airflow db migrate failed (AIRFLOW_HOME=$AIRFLOW_HOME)" >&2
    exit 1
fi

set_gpu_pool
echo "Airflow home: $AIRFLOW_HOME (pool gpu: $POOL_SLOTS slot(s), $GPUS GPU(s) found, $TASKS_PER_GPU task(s) per GPU)"
