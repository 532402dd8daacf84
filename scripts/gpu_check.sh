#!/usr/bin/env bash
# Every GPU path of the lab, checked once on a fresh GPU machine (about 8 minutes on one H100), one table at the end:
#
#   bash scripts/gpu_check.sh            # from the checkout; writes experiments/<date>_gpu_check/README.md
#
# Steps (each logged to <out>/logs/<step>.log; a failed step does not stop the next):
#   setup      make setup (the probe picks the CUDA lock on a machine with an NVIDIA driver), then make setup-gpu
#   env        torch, CUDA and the device as torch sees them
#   gpu_tests  the `gpu`-marked tests: SWA window under flex attention, FSDP on one GPU, SSM kernels, CUDA
#              quantization variants, evaluation with compiled decode
#   bench      lab.bench at full size (seq 2048, bf16), the five archs, tuned vs plain
#   decode     a full-size llama_gqa trained a few steps on the GPU, quantized to int4wo and float8dq, decoded at
#              batch 1 with static cache + torch.compile beside bf16 (lab.evaluate)
#
# On a machine without CUDA every step still runs up to the point where CUDA is needed and then says so in one line
# (tests/test_gpu_check.py runs it that way). Environment:
#   GPU_CHECK_OUT     where the table and logs go (default experiments/<date>_gpu_check)
#   GPU_CHECK_WORK    scratch folder for prepared data, runs and variants (default a new temporary folder)
#   GPU_CHECK_SETUP   0: skip `make setup` and use GPU_CHECK_PYTHON as it is (a machine with the packages in place)
#   GPU_CHECK_PYTHON  the interpreter (default .venv/bin/python, what make setup creates)
#   GPU_CHECK_STEPS   the steps to run, comma-separated (default all, in the order above)
#   GPU_CHECK_BENCH_ARCHS  archs for the bench step (default all five)
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${GPU_CHECK_OUT:-experiments/$(date +%Y-%m-%d)_gpu_check}
WORK=${GPU_CHECK_WORK:-$(mktemp -d -t gpu_check.XXXXXX)}
PY=${GPU_CHECK_PYTHON:-.venv/bin/python}
STEPS=${GPU_CHECK_STEPS:-setup,env,gpu_tests,bench,decode}
BENCH_ARCHS=${GPU_CHECK_BENCH_ARCHS:-llama_gqa,mistral_swa,falcon_mqa,mamba2,llama_mha}
for name in ${STEPS//,/ }; do
  case $name in
    setup | env | gpu_tests | bench | decode) ;;
    *) echo "error: GPU_CHECK_STEPS names '$name': choose from setup,env,gpu_tests,bench,decode" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT/logs" "$WORK"
: >"$OUT/steps.tsv"
# The checks' own MLflow runs stay in the scratch folder, out of the project's store.
export MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db" PYTHONUNBUFFERED=1

wanted() { [[ ",$STEPS," == *",$1,"* ]]; }

cuda_visible() { "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

# run_step NAME BUDGET_S COMMAND...: runs the command with its output in the step's log and one row in steps.tsv
# (name, exit code, seconds). The report reads the log for the outcome.
run_step() {
  local name=$1 budget=$2 started rc
  shift 2
  echo "gpu_check: $name ..."
  started=$(date +%s)
  # timeout runs programs, not shell functions: each step is a function exported to a child bash
  timeout --kill-after=10 "$budget" bash -c "$*" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - started))" >>"$OUT/steps.tsv"
}

setup_step() {
  if [[ ${GPU_CHECK_SETUP:-1} == 0 ]]; then
    echo "setup skipped (GPU_CHECK_SETUP=0): using $PY as it is"
    return 0
  fi
  make setup || return
  if cuda_visible; then
    make setup-gpu
  else
    echo "setup-gpu skipped: needs CUDA (torch in $PY sees no CUDA device)"
  fi
}

env_step() {
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  "$PY" - <<'EOF'
import torch
print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    raise SystemExit("error: needs CUDA: PyTorch sees no CUDA device here")
props = torch.cuda.get_device_properties(0)
print(f"device {props.name}, compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.1f} GiB")
EOF
}

gpu_tests_step() {
  "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider --junitxml="$OUT/logs/gpu_tests.xml" tests
}

bench_step() {
  "$PY" -m lab.bench --size full --seq-len 2048 --precision bf16-mixed --device cuda --settings tuned,plain \
    --steps 5 --warmup 2 --archs "$BENCH_ARCHS" --out "$OUT/bench"
}

decode_step() {
  local prepared="$WORK/prepared" run="$WORK/train"
  "$PY" -m lab.prepare tokenizer=bpe2k data.seq_len=64 "data.prepared_dir=$prepared" "hydra.run.dir=$WORK/prepare" \
    || return
  "$PY" -m lab.train experiment=demo arch=llama_gqa size=full trainer=gpu trainer.max_steps=20 \
    "data.prepared_dir=$prepared" "hydra.run.dir=$run" callbacks.energy=false trainer.enable_progress_bar=false \
    || return
  "$PY" -m lab.quantize "model_path=$run/hf" "variants=[int4wo,float8dq]" device=cuda "output_dir=$WORK/variants" \
    "hydra.run.dir=$WORK/quantize" || return
  "$PY" -m lab.evaluate "model_path=$run/hf" "quantized_dir=$WORK/variants" "variants=[bf16,int4wo,float8dq]" \
    device=cuda "prepared_dir=$prepared" max_blocks=16 "tasks=[]" mlflow.enabled=false \
    "efficiency.batch_sizes=[1]" "efficiency.prompt_lengths=[128]" efficiency.compile=true \
    "output_dir=$OUT/decode" "hydra.run.dir=$WORK/evaluate"
}

export OUT WORK PY BENCH_ARCHS GPU_CHECK_SETUP
export -f cuda_visible setup_step env_step gpu_tests_step bench_step decode_step
for name in setup env gpu_tests bench decode; do
  wanted "$name" || continue
  case $name in
    setup) run_step setup 1800 setup_step ;;
    env) run_step env 60 env_step ;;
    gpu_tests) run_step gpu_tests 900 gpu_tests_step ;;
    bench) run_step bench 900 bench_step ;;
    decode) run_step decode 900 decode_step ;;
  esac
done

"$PY" scripts/gpu_check_report.py "$OUT"
