#!/usr/bin/env bash
# `make bench`: every CPU benchmark, side by side measurements printed as Markdown, ready for
# bench/RESULTS.md (date, device, command and commit on top). 2 gloo ranks.
#   bench/run_all.sh [OUT_FILE]          (BENCH_QUICK=1: a seconds-long form for CI; numbers mean nothing)
#   (a) harness vs a hand-written loop (bench/overhead.py): FSDP2 fp32/bf16, ZeRO-3 fp32 (bf16 is
#       emulated on CPUs without avx512_bf16: slow and noisy; bench/gpu.sh measures it on a GPU)
#   (b) each throughput switch on and off (bench/switches.py --set cpu)
#   (c) backend step times (bench/backend_step_time.py)
#   (d) checkpoint staging (bench/checkpoint_staging.py)
#   (e) harness estimate's step-time model against measured step times (bench/step_model.py)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${1:-runs/bench/results.md}
mkdir -p "$(dirname "$OUT")"
PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python && -z "${VIRTUAL_ENV:-}" ]] && PYTHON=.venv/bin/python
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RUN=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2)

CONFIG=configs/bench-cpu.yaml
STEPS=6; ROUNDS=3; SWITCH_STEPS=4; SAVES=3; STAGING_CONFIG=smollm2-135m; BACKEND_CONFIG=$CONFIG; SMALL=(); ONLY=()
MODEL_CASES=()
# bf16 matmuls are emulated on CPUs without avx512_bf16 (~5x slower than fp32): the hand-written
# comparison runs a shorter sequence so its bf16 cases take minutes, not an hour.
OVERHEAD_SHAPE=(--override train.seq_len=64 --override train.grad_accum=1)
if [[ -n "${BENCH_QUICK:-}" ]]; then
  STEPS=1; ROUNDS=1; SWITCH_STEPS=1; SAVES=1; STAGING_CONFIG=configs/tiny.yaml; BACKEND_CONFIG=configs/tiny.yaml
  SMALL=(--override train.seq_len=32 --override train.grad_accum=1 --override train.micro_batch_size=2)
  OVERHEAD_SHAPE=("${SMALL[@]}")
  ONLY=(--only "no_batch_prefetch,ac_selective_op")
  MODEL_CASES=(--case "fsdp2:")
fi

{
  echo "### make bench: $(date -u +'%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo
  echo "Device: CPU, $(getconf _NPROCESSORS_ONLN) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), 2 gloo ranks, OMP_NUM_THREADS=$OMP_NUM_THREADS. Command: \`make bench\`${BENCH_QUICK:+ (BENCH_QUICK=1)}."
  echo
} >"$OUT"

echo "== (a) harness vs hand-written loop"
"${RUN[@]}" bench/overhead.py --config "$CONFIG" --steps "$STEPS" --rounds "$ROUNDS" "${OVERHEAD_SHAPE[@]}" \
  --only "fsdp2 fp32,fsdp2 bf16,zero3 fp32" --out "$OUT" 2>&1 | grep -E '^\||^config' || true
echo >>"$OUT"
echo "== (b) switches on and off"
"${RUN[@]}" bench/switches.py --config "$CONFIG" --set cpu --steps "$SWITCH_STEPS" --rounds "$ROUNDS" "${SMALL[@]}" "${ONLY[@]}" --out "$OUT" 2>&1 | grep -E '^\||^config' || true
echo >>"$OUT"
echo "== (c) backend step times"
"${RUN[@]}" bench/backend_step_time.py --config "$BACKEND_CONFIG" --steps "$STEPS" --rounds "$ROUNDS" 2>&1 | grep -v -i "warn" | tail -n 7 | tee -a "$OUT"
echo >>"$OUT"
echo "== (d) checkpoint staging"
"$PYTHON" bench/checkpoint_staging.py --config "$STAGING_CONFIG" --saves "$SAVES" | tee -a "$OUT"
echo >>"$OUT"
echo "== (e) step-time model vs measured"
"${RUN[@]}" bench/step_model.py --config "$BACKEND_CONFIG" --steps "$STEPS" "${SMALL[@]}" "${MODEL_CASES[@]}" 2>&1 \
  | grep -E '^\||^measured' | tee -a "$OUT"
echo
echo "results: $OUT"
