#!/usr/bin/env bash
# One short GPU session that measures every accelerator figure of docs/benchmarks.md, each next to its reference:
#   1. r50 bf16 batch 512: the JAX step and the eager PyTorch step (channels_last, autocast) in the same run, MFU;
#   2. what moves the MFU: batch 1024, and XLA GPU flags (autotuning off, Triton GEMMs off, command buffers off),
#      each a JAX-only run next to run 1;
#   3. the training loop against its step alone (benchmarks/train_loop.py): r18 112x112 on a .rec and on the
#      synthetic source, with logging and asynchronous checkpoints.
# Every run has its own time cap, so a hang or an out-of-memory costs that run only; the JSON lines go to
# $OUT/bench.jsonl (train_step.py) and $OUT/train_loop.jsonl.
#
#   bash benchmarks/gpu_session.sh              # on the GPU machine: about 8 minutes, 1 GPU
#   SMALL=1 bash benchmarks/gpu_session.sh      # a dry run of the script on a CPU with tiny sizes (minutes)
#
# The GPU image lacks ml_collections: install it first as benchmarks/README.md (the GPU preset) shows.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1

if [ "${SMALL:-0}" = 1 ]; then  # the same runs at sizes a CPU finishes quickly
  STEP=(--arch r_tiny --width 0.25 --input-size 32 --embedding-size 64 --num-classes 96 --steps 2 --windows 1
        --warmup 1)
  B1=16; B2=32; CAP=240; CAP_LOOP=400
  LOOP=(--cases quickstart-synthetic --steps 4 --reps 1 --log-every 2 --ckpt-every 2)
else
  STEP=(--arch r50 --dtype bfloat16 --steps 20 --windows 4 --warmup 5)
  B1=512; B2=1024; CAP=110; CAP_LOOP=200
  LOOP=(--cases r18-rec r18-synthetic --r18-batch 512 --r18-steps 40 --reps 1 --log-every 20 --ckpt-every 20
        --rec-images 8192 --threads 8)
fi

run() {  # run NAME CAP COMMAND...: one capped run, its status in the log either way
  local name=$1 cap=$2; shift 2
  echo "=== $name (cap ${cap}s) $(date -u +%H:%M:%S)"
  timeout --kill-after=10 "$cap" "$@"
  echo "=== $name: exit $?"
}

step() {  # step NAME CAP XLA_FLAGS ARGS...: benchmarks/train_step.py under the given XLA flags
  local name=$1 cap=$2 flags=$3; shift 3
  run "$name" "$cap" env XLA_FLAGS="$flags" "$PY" benchmarks/train_step.py "${STEP[@]}" --tag "$name" \
    --jsonl "$OUT/bench.jsonl" "$@"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
step "step b$B1 jax+torch" $((CAP + 60)) "" --batch $B1
step "step b$B2" "$CAP" "" --batch $B2 --no-torch
step "step b$B1 autotune off" "$CAP" "--xla_gpu_autotune_level=0" --batch $B1 --no-torch
step "step b$B1 triton gemm off" "$CAP" "--xla_gpu_enable_triton_gemm=false" --batch $B1 --no-torch
step "step b$B1 command buffers off" "$CAP" "--xla_gpu_enable_command_buffer=" --batch $B1 --no-torch
run "loop vs step" "$CAP_LOOP" "$PY" benchmarks/train_loop.py "${LOOP[@]}" --jsonl "$OUT/train_loop.jsonl"
echo "=== done $(date -u +%H:%M:%S); results in $OUT/"
