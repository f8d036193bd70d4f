#!/usr/bin/env bash
# The Airflow web UI on this machine (`airflow standalone`: API server + UI, scheduler,
# DAG processor, triggerer; LocalExecutor, SQLite), then how to log in.
#   scripts/airflow_ui.sh [PORT]    (default 8280; Ctrl-C stops everything)
# No schedule unless LORAFLOW_SCHEDULE is set: unpausing the DAG here (the trigger form
# does it) must not start a `cpu` run of its own.
set -euo pipefail
source "$(dirname "$0")/airflow_env.sh"
export LORAFLOW_SCHEDULE="${LORAFLOW_SCHEDULE:-none}"
PORT="${1:-8280}"
case "$PORT" in
    8793|8794) echo "port $PORT is taken by the scheduler's / triggerer's log server; pick another" >&2; exit 2 ;;
    ''|*[!0-9]*) echo "PORT must be a number, got '$PORT'" >&2; exit 2 ;;
esac
URL="http://127.0.0.1:$PORT"
export AIRFLOW__API__HOST="${AIRFLOW__API__HOST:-127.0.0.1}"
export AIRFLOW__API__PORT="$PORT"
export AIRFLOW__API__BASE_URL="$URL"                   # tasks reach the API at $URL/execution/
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="$URL/execution/"

bash "$ROOT/scripts/airflow_init.sh"
gpu_plan   # standalone's task processes lease the k that the pool was sized with
PASSWORDS="$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"

# standalone runs in its own session, so a Ctrl-C here reaches only this script, whose
# trap stops standalone in order (it then stops its components); a Ctrl-C delivered to
# every component at once can leave the scheduler hanging. A script's background jobs
# ignore SIGINT, so it is restored before standalone starts.
setsid "$PY" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])' \
    "$AIRFLOW" standalone &
pid=$!
stop() {
    trap - INT TERM
    echo "stopping Airflow (up to 60 s)..." >&2
    kill -INT "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -TERM -- "-$pid" 2>/dev/null || true   # whatever is left of its process group
    sleep 3
    kill -KILL -- "-$pid" 2>/dev/null || true
    exit 0
}
trap stop INT TERM

# Once the API server answers and the admin password exists, say how to log in.
for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || { echo "airflow standalone exited" >&2; exit 1; }
    if [ -s "$PASSWORDS" ] && curl -fs -o /dev/null "$URL/api/v2/monitor/health"; then
        password="$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("admin", "?"))' "$PASSWORDS")"
        dag_id="$("$PY" -c 'from tasks.steps import DAG_ID; print(DAG_ID)')"
        cat <<MSG

  Airflow UI:  $URL/dags/$dag_id
  username:    admin
  password:    $password     (from $PASSWORDS)
  Trigger a run with the ▶ button: pick a preset; empty fields keep the preset's values.
  A run's report: its Report tab; all runs: $URL/loraflow/reports/index.html
  Schedule:    $LORAFLOW_SCHEDULE (LORAFLOW_SCHEDULE)
  Ctrl-C stops Airflow.

MSG
        break
    fi
    sleep 1
done
wait "$pid"
