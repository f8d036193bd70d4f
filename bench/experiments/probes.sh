#!/usr/bin/env bash
# Reliability probes (issue 13): bad inputs given to the `loraflow` command the way a user
# would, each with its exit code and the last line it printed. Prints a Markdown table.
#   bash bench/experiments/probes.sh > bench/experiments/probes.md
# Needs the project installed (.venv) and $LORAFLOW_DATA; writes only under a temp folder.
set -uo pipefail
cd "$(dirname "$0")/../.."
LORAFLOW=.venv/bin/loraflow
PY=.venv/bin/python
export LORAFLOW_DATA="${LORAFLOW_DATA:-$(cd .. && pwd)/shared/data/imdb}"
TMP="$(mktemp -d)"
trap 'kill "${first:-0}" 2>/dev/null; rm -rf "$TMP"' EXIT
export LORAFLOW_ARTIFACTS="$TMP/artifacts" LORAFLOW_REPORTS="$TMP/reports"
# Local sources must lie under these (tasks/sources.py): the IMDB copy's folder and $TMP.
export LORAFLOW_DATA_ROOTS="$(dirname "$LORAFLOW_DATA"):$TMP"
SMOKE=(--preset smoke --train-size 64 --val-size 32 --test-size 32 --max-length 32)

echo "| probe | command | exit | what it said |"
echo "| --- | --- | ---: | --- |"
probe() {  # probe DESCRIPTION COMMAND...
    local what="$1"; shift
    local out code
    out="$("$@" 2>&1)"; code=$?
    local said
    said="$(printf '%s\n' "$out" | grep -v '^\s*$' | grep -iv 'warning\|great_expectations' | tail -1)"
    local shown="${*/#.venv\/bin\//}"
    [ "${#shown}" -le 160 ] || shown="${shown:0:157}..."
    printf '| %s | `%s` | %s | %s |\n' "$what" "$shown" "$code" "${said//|/\\|}"
}

probe "target that matches no module" $LORAFLOW run "${SMOKE[@]}" --targets foo
probe "classifier as a LoRA target" $LORAFLOW run "${SMOKE[@]}" --targets classifier
probe "markup as a target name" $LORAFLOW run "${SMOKE[@]}" --targets '<img src=x onerror=alert(1)>'
probe "a model that does not exist" $LORAFLOW run "${SMOKE[@]}" --model no/such-model
probe "a data folder that does not exist" $LORAFLOW run "${SMOKE[@]}" --data /no/such/folder
probe "an ftp:// data source" $LORAFLOW run "${SMOKE[@]}" --data ftp://example.org/imdb.tar.gz
probe "a URL without a checksum" $LORAFLOW run "${SMOKE[@]}" --data https://example.org/imdb.tar.gz
probe "train_size larger than the source" $LORAFLOW run "${SMOKE[@]}" --train-size 30000
probe "rank above the adapted matrices' width" $LORAFLOW run "${SMOKE[@]}" --ranks 1024
probe "a sweep of 1,200 variants" $LORAFLOW run "${SMOKE[@]}" --methods lora --seeds "$(seq -s, 1 1200)"
probe "unequal tuning budgets" $LORAFLOW run "${SMOKE[@]}" --lora-lr 1e-3,2e-3 --full-lr 5e-5
probe "negative warmup_steps" $LORAFLOW run "${SMOKE[@]}" --warmup-steps -5
probe "negative weight_decay" $LORAFLOW run "${SMOKE[@]}" --weight-decay -1
probe "max_grad_norm 0" $LORAFLOW run "${SMOKE[@]}" --max-grad-norm 0
probe "data_seed -1" $LORAFLOW run "${SMOKE[@]}" --data-seed -1
probe "a DAG conf key outside the form" $PY -c \
    'from tasks.pipeline import config_from_params; config_from_params({"preset": "smoke", "full_finetune": "no"})'

# Invalid UTF-8 in a text column: named file, column and row, and validation.json written.
mkdir -p "$TMP/badutf"
$PY - "$TMP/badutf" "$LORAFLOW_DATA" <<'EOF'
import sys
import pyarrow as pa, pyarrow.parquet as pq
out, src = sys.argv[1], sys.argv[2]
for split in ("train", "test"):
    table = pa.Table.from_pandas(pq.read_table(f"{src}/{split}.parquet").to_pandas()
                                  .sample(400, random_state=0), preserve_index=False)
    texts = [t.encode() for t in table.column("text").to_pylist()]
    texts[7] = b"\xff" + texts[7]
    table = table.set_column(0, "text", pa.array(texts, pa.binary()))
    pq.write_table(table, f"{out}/{split}.parquet")
EOF
probe "invalid UTF-8 in a review" $LORAFLOW run "${SMOKE[@]}" --data "$TMP/badutf" --run-id badutf
[ -f "$TMP/artifacts/runs/badutf/data/validation.json" ] && v=yes || v=no
printf '| ... and its validation.json written | `ls runs/badutf/data/validation.json` | - | %s |\n' "$v"

# Two owners of one run id: the second is refused while the first holds the run.
$LORAFLOW run "${SMOKE[@]}" --run-id twice >/dev/null 2>&1 & first=$!
sleep 8
probe "a second run with the same run id" $LORAFLOW run "${SMOKE[@]}" --run-id twice
kill "$first" 2>/dev/null; wait "$first" 2>/dev/null
probe "default run ids started in the same second" $PY -c \
    'from tasks.pipeline import new_run_id; ids = {new_run_id() for _ in range(1000)}; print(len(ids), "distinct of 1000")'
