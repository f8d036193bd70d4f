#!/usr/bin/env bash
# Create or upgrade the project's Airflow home: metadata DB (SQLite), and the `gpu` pool
# that training tasks use, with one slot per GPU (1 on a CPU-only machine).
set -euo pipefail
source "$(dirname "$0")/airflow_env.sh"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! "$AIRFLOW" db migrate >"$log" 2>&1; then
    cat "$log" >&2
    echo "airflow db migrate failed (AIRFLOW_HOME=$AIRFLOW_HOME)" >&2
    exit 1
fi

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
fi
slots=$(( gpus > 0 ? gpus : 1 ))
"$AIRFLOW" pools set gpu "$slots" \
    "training tasks (LoRA, full fine-tuning, linear probe): one slot per GPU; $gpus GPU(s) found" \
    >/dev/null
echo "Airflow home: $AIRFLOW_HOME (pool gpu: $slots slot(s), $gpus GPU(s) found)"
