#!/usr/bin/env bash
# One-off GPU check for a borrowed machine (an NVIDIA H200, 15 minutes of device time):
# the GPU tests (training under bf16/fp16, the step without host syncs, k-slot leases on
# the real device), then the sweep benchmark on CUDA (8 LoRA variants through run_variant,
# one at a time vs k at once; full fine-tuning at the paper shape, 16 x 512, fp32/TF32 and
# bf16, TFLOP/s against the card's bf16 dense peak). Results land in bench/results/gpu/.
# Wall time is capped under 8 minutes by the timeouts below (2 + 5 + setup checks).
# The per-step and end-to-end benchmark (`loraflow bench --device cuda`, results already
# in bench/results/gpu/bench.md) is not rerun here: it would not fit beside the sweep.
#
#   bash bench/gpu.sh             # on the GPU machine, from anywhere
#   bash bench/gpu.sh --dry-run   # anywhere: print every command, check what can be checked
#
# Environment: PY (default .venv/bin/python, else python3), LORAFLOW_DATA (a folder with
# IMDB's train.parquet and test.parquet; default ../shared/data/imdb), OUT_DIR (default
# bench/results/gpu).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac

PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DATA=${LORAFLOW_DATA:-../shared/data/imdb}
OUT_DIR=${OUT_DIR:-bench/results/gpu}
TEST_TIMEOUT_S=120
BENCH_TIMEOUT_S=300
GPU_TESTS="tests/bench/test_gpu_training.py tests/tasks/test_gpu.py tests/tasks/test_train_step.py"
export LORAFLOW_DATA="$DATA" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false LORAFLOW_PROGRESS=0
export PYTHONUNBUFFERED=1

# The commands of a real run, in order; a dry run prints them and runs none.
COMMANDS=(
  "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv"
  "$PY -c 'import torch; assert torch.cuda.is_available(), \"torch sees no CUDA device\"; print(torch.__version__, torch.cuda.get_device_name(0))'"
  "timeout $TEST_TIMEOUT_S $PY -m pytest -q -p no:cacheprovider $GPU_TESTS 2>&1 | tee $OUT_DIR/pytest_gpu.log"
  "timeout $BENCH_TIMEOUT_S $PY -m tasks.cli bench --sweep --device cuda --data $DATA --out $OUT_DIR 2>&1 | tee $OUT_DIR/sweep.log"
)

check() {  # a validation that needs no GPU: name, then the command
  local name=$1; shift
  if "$@" >/tmp/gpu_sh_check.$$ 2>&1; then
    echo "ok: $name"
  else
    echo "FAILED: $name"; sed 's/^/    /' /tmp/gpu_sh_check.$$; rm -f /tmp/gpu_sh_check.$$
    exit 1
  fi
  rm -f /tmp/gpu_sh_check.$$
}

if [ "$DRY" = 1 ]; then
  echo "dry run: python $PY, data $DATA, results $OUT_DIR"
  echo "would run:"
  for c in "${COMMANDS[@]}"; do echo "  $c"; done
  echo "checks:"
  check "data folder has train.parquet and test.parquet" \
    test -f "$DATA/train.parquet" -a -f "$DATA/test.parquet"
  check "benchmark modules import" \
    "$PY" -c "import bench.run, bench.common, bench.inference, bench.step, bench.sweep, bench.flops, bench.report"
  check "loraflow bench parses --sweep --device cuda --data --out" "$PY" -c \
    "from tasks.cli import build_parser; a = build_parser().parse_args(['bench', '--sweep', '--device', 'cuda', '--data', '$DATA', '--out', '$OUT_DIR']); assert (a.sweep, a.device, a.out) == (True, 'cuda', '$OUT_DIR')"
  check "the data holds the sweep's rows (cpu preset: 2,500 train-split, 1,000 test)" "$PY" -c \
    "import pandas as pd, pathlib; p = pathlib.Path('$DATA'); assert len(pd.read_parquet(p / 'train.parquet', columns=['label'])) >= 2500 and len(pd.read_parquet(p / 'test.parquet', columns=['label'])) >= 1000"
  check "bench.flops knows the H200's peak" "$PY" -c \
    "from bench.flops import peak_bf16_tflops as p; assert p('NVIDIA H200') == ('H200', 989.0) and p('Tesla T4') is None"
  collected=$("$PY" -m pytest --collect-only -q -m gpu $GPU_TESTS 2>&1 | grep '::test_' || true)
  check "pytest collects the gpu-marked tests" test -n "$collected"
  echo "gpu-marked tests:"
  echo "$collected" | sed 's/^/  /'
  echo "dry run ok"
  exit 0
fi

mkdir -p "$OUT_DIR"
status=0
for i in "${!COMMANDS[@]}"; do
  c=${COMMANDS[$i]}
  echo "+ $c"
  if ! bash -c "set -o pipefail; $c"; then
    echo "step failed: $c"
    status=1
    # no GPU: nothing after the first two steps can run; later steps are independent
    # (the benchmark is worth having even if a test fails)
    [ "$i" -lt 2 ] && exit 1
  fi
done
echo "results in $OUT_DIR"
exit $status
