#!/usr/bin/env bash
# Run the whole DAG once, in this process (`airflow dags test`: no scheduler or web server
# needed), with a preset and the local data; print the run folder and the report.
#   scripts/run_dag.sh [PRESET] [EXTRA_CONF_JSON]     e.g. scripts/run_dag.sh smoke '{"ranks": [4, 8]}'
set -euo pipefail
source "$(dirname "$0")/airflow_env.sh"
PRESET="${1:-cpu}"
EXTRA="${2:-}"
[ -n "$EXTRA" ] || EXTRA="{}"
DAG_ID="$("$PY" -c 'from tasks.steps import DAG_ID; print(DAG_ID)')"

# The trigger conf: the preset, the local data when $LORAFLOW_DATA is set, then EXTRA.
CONF="$("$PY" - "$PRESET" "$EXTRA" <<'PYEOF'
import json, os, sys
conf = {"preset": sys.argv[1]}
if os.environ.get("LORAFLOW_DATA"):
    conf["data"] = os.environ["LORAFLOW_DATA"]
conf.update(json.loads(sys.argv[2]))
print(json.dumps(conf))
PYEOF
)"

if [ -e "$AIRFLOW_HOME/airflow.db" ]; then
    set_gpu_pool   # the pool follows LORAFLOW_TASKS_PER_GPU on every run
else
    bash "$ROOT/scripts/airflow_init.sh"
    gpu_plan
fi
RUNS="$("$PY" -c 'from tasks.paths import artifacts_root; print(artifacts_root() / "runs")')"

marker="$(mktemp)"
trap 'rm -f "$marker"' EXIT
echo "airflow dags test $DAG_ID -c '$CONF'"
status=0
"$AIRFLOW" dags test "$DAG_ID" -c "$CONF" || status=$?

# `dags test` picks its own run id; the run is the folder `prepare` created just now.
run_dir="$(find "$RUNS" -mindepth 2 -maxdepth 2 -name config.json -newer "$marker" \
           -printf '%T@ %h\n' 2>/dev/null | sort -n | tail -1 | cut -d' ' -f2-)"
if [ -z "$run_dir" ]; then
    echo "error: no run folder under $RUNS: the run was refused or failed before prepare (see the log above)" >&2
    exit 1
fi
# The run's report folder (tasks.paths.report_slug), or the raw run id (older reports).
report="$("$PY" - "$run_dir" <<'PYEOF'
import sys
from tasks.paths import RunPaths, reports_root
paths = RunPaths.from_run_dir(sys.argv[1])
found = [d / "report.html" for d in (paths.report_dir, reports_root() / paths.run_id)
         if (d / "report.html").is_file()]
print((found or [paths.report_dir / "report.html"])[0])
PYEOF
)"
echo "run: $run_dir"
if [ -f "$report" ]; then
    echo "report: $report"
else
    echo "error: no report at $report" >&2
    [ "$status" -ne 0 ] || status=1
fi
[ "$status" -eq 0 ] || echo "error: the DAG run failed (exit $status); failed variants are listed in the report" >&2
exit "$status"
