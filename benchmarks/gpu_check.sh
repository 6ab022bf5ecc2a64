#!/usr/bin/env bash
# One GPU check, under 8 minutes on one modern GPU; prints a summary at the end.
#
#   benchmarks/gpu_check.sh [OUT_DIR]                # default OUT_DIR: a temporary folder (kept, its path printed)
#   PYTHON=.venv/bin/python benchmarks/gpu_check.sh
#   DEVICE=cpu BENCH_ARGS="--image-size 64 --batch-size 8 --steps 2 --warmup 1 --workers-max 2 --modes fp32" \
#     PREPARE_ARGS="--per-class 24 --phantom-size 64" TRAIN_ARGS="--image-size 32 --epochs 1 --batch-size 16" \
#     benchmarks/gpu_check.sh   # a dry run of the plumbing on a CPU (no GPU numbers)
#
# Steps (each with a time limit; a failed or timed-out step is reported and the next one runs):
#   1. bench     benchmarks/bench_train.py with its defaults (224 px DenseNet-121: fp32/bf16 x channels_last x
#                torch.compile, data wait, loader img/s with 1..N workers, augmentation on the GPU alone and fed
#                by the loader, peak GPU memory) -> OUT/bench_train.json
#   1b. augment  batched GPU augmentation vs image-by-image CPU augmentation (same draws), and its img/s
#   2. train     a short bf16 training on phantoms (--compile auto: compiled on CUDA), checkpoint keys checked
#   3. ddp       the same on 2 GPUs under torchrun, if there are 2 (skipped otherwise)
#   4. onnx      export the run of step 2; ONNX Runtime CUDA provider logits vs CPU provider logits
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PYTHON="${PYTHON:-python}"
DEVICE="${DEVICE:-cuda}"
BENCH_ARGS="${BENCH_ARGS:-}"      # extra bench_train.py options
PREPARE_ARGS="${PREPARE_ARGS:-}"  # extra `gpu_check.py prepare` options
TRAIN_ARGS="${TRAIN_ARGS:-}"      # extra `gpu_check.py train` options (also for ddp)
OUT="${1:-$(mktemp -d "${TMPDIR:-/tmp}/covid-cxr-gpu-check.XXXXXX")}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's covid_cxr
START=$(date +%s)

note() { echo "RESULT $1 $2 $3" >> "$SUMMARY"; echo "== $1: $2 $3"; }

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND, keeps its RESULT lines, reports a failure or timeout itself.
step() {
    local name="$1" limit="$2"; shift 2
    local log="$OUT/$name.log" t0 rc
    echo "== $name (at most ${limit} s): $*"
    t0=$(date +%s)
    timeout --kill-after=20 "$limit" "$@" > >(tee "$log") 2>&1
    rc=$?
    sleep 0.2  # let tee finish the log
    if grep -q "^RESULT $name " "$log"; then
        grep "^RESULT $name " "$log" >> "$SUMMARY"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        note "$name" FAIL "timed out after ${limit} s (log: $log)"
    elif [ "$rc" = 0 ]; then
        note "$name" PASS "in $(( $(date +%s) - t0 )) s (log: $log)"
    else
        note "$name" FAIL "exit status $rc: $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-200) (log: $log)"
    fi
}

"$PYTHON" -c "import covid_cxr, torch; print('covid-cxr', covid_cxr.__version__, 'torch', torch.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.device_count(), 'GPU(s)')" || { echo "covid_cxr does not import"; exit 2; }
if [ "$DEVICE" != cpu ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA device: run on a GPU machine, or DEVICE=cpu for a dry run"; exit 2
fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# 1. training throughput (the table is printed to the log; JSON kept)
# shellcheck disable=SC2086
step bench 300 "$PYTHON" "$HERE/bench_train.py" --device "$DEVICE" --out "$OUT/bench_train.json" $BENCH_ARGS

# 1b. batched augmentation on the device agrees with the per-image one
step augment 60 "$PYTHON" "$HERE/gpu_check.py" augment --device "$DEVICE"

# 2. a short bf16 training on phantoms
# shellcheck disable=SC2086
step prepare 60 "$PYTHON" "$HERE/gpu_check.py" prepare --out "$OUT/phantoms" $PREPARE_ARGS
# shellcheck disable=SC2086
step train 120 "$PYTHON" "$HERE/gpu_check.py" train --data "$OUT/phantoms/dataset" --out "$OUT/run" \
    --device "$DEVICE" $TRAIN_ARGS

# 3. two-process DDP, if there are two GPUs
NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$DEVICE" != cpu ] && [ "${NGPU:-0}" -ge 2 ]; then
    # shellcheck disable=SC2086
    step ddp 120 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 "$HERE/gpu_check.py" train \
        --data "$OUT/phantoms/dataset" --out "$OUT/ddp" --device cuda $TRAIN_ARGS
else
    note ddp SKIP "needs 2 GPUs, found ${NGPU:-0}"
fi

# 4. ONNX Runtime: CUDA provider vs CPU provider
if [ -f "$OUT/run/best.pt" ]; then
    step onnx 120 "$PYTHON" "$HERE/gpu_check.py" onnx --run "$OUT/run" --device "$DEVICE"
else
    note onnx SKIP "no trained run to export (step train failed)"
fi

echo
echo "================ gpu_check summary ($(( $(date +%s) - START )) s; outputs in $OUT)"
if [ -f "$OUT/bench_train.json" ]; then
    "$PYTHON" "$HERE/bench_train.py" --show "$OUT/bench_train.json"
fi
sed 's/^RESULT //' "$SUMMARY"
if grep -q "^RESULT [a-z]* FAIL" "$SUMMARY"; then exit 1; fi
exit 0
