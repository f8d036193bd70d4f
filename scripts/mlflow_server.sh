#!/usr/bin/env bash
# A local MLflow tracking server in its own virtualenv (.venv-mlflow), apart from the
# project's .venv: the server needs SQLAlchemy, alembic and Flask versions that Airflow's
# pins exclude. loraflow itself talks to it over MLflow's REST API (tasks/tracking.py).
#
#   scripts/mlflow_server.sh install        create or update .venv-mlflow (pinned mlflow)
#   scripts/mlflow_server.sh serve [PORT]   SQLite backend and artifact folder under
#                                           $MLFLOW_HOME (default ./mlflow_home), artifacts
#                                           proxied by the server; prints its URL
set -euo pipefail
cd "$(dirname "$0")/.."
MLFLOW_VERSION=3.17.2  # the server; the REST API loraflow uses is MLflow 2.x and 3.x
VENV=${MLFLOW_VENV:-.venv-mlflow}

install() {
    if [[ -x $VENV/bin/mlflow ]] && [[ "$("$VENV/bin/python" -c 'import mlflow; print(mlflow.__version__)' 2>/dev/null)" == "$MLFLOW_VERSION" ]]; then
        return 0
    fi
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "mlflow==$MLFLOW_VERSION" -c scripts/mlflow_server.constraints.txt
}

serve() {
    local port=${1:-5080} home=${MLFLOW_HOME:-$PWD/mlflow_home}
    install
    mkdir -p "$home/artifacts"
    echo "MLflow UI and tracking URI: http://127.0.0.1:$port"
    echo "  export MLFLOW_TRACKING_URI=http://127.0.0.1:$port   # then make run / loraflow run"
    # no job runner (GenAI evaluation jobs): loraflow needs none
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false exec "$VENV/bin/mlflow" server --host 127.0.0.1 --port "$port" \
        --backend-store-uri "sqlite:///$home/mlflow.db" \
        --artifacts-destination "$home/artifacts" --serve-artifacts --workers 1
}

case ${1:-} in
    install) install ;;
    serve) shift; serve "$@" ;;
    *) echo "usage: $0 install | serve [PORT]" >&2; exit 2 ;;
esac
