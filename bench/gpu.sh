#!/usr/bin/env bash
# One prepared GPU check, sized to finish in minutes on one H100/H200: configs/llama-1b.yaml (1.1B
# parameters, seq 2048, 16k tokens per step) on 1 GPU, in one process (bench/switches.py --set
# gpu): a hand-written loop, harness bf16, + compile, + chunked cross-entropy, + selective AC, full
# AC, fp16, fp32 (TF32 off) and DeepSpeed ZeRO-3 bf16; then host syncs counted on CUDA (fp16 with
# an injected overflow: the skip happens on the device) and the checkpoint staging bench with the
# state on the GPU. Prints Markdown tables for bench/RESULTS.md.
#   bench/gpu.sh [OUT_DIR]         (STEPS=8 by default; ONLY=variant,variant to run a subset)
# Wheels the GPU image lacks (datasets, deepspeed, ...) are installed from .whl/ when they are
# missing (the device tool's README says how to download them).
# On a CPU-only machine it runs end to end with a tiny model instead (GPU_SH_SMOKE=1 forces it).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${1:-${OUT:-runs/gpu-bench}}
mkdir -p "$OUT"
source bench/gpu_env.sh
STEPS=${STEPS:-8}

CONFIG=configs/llama-1b.yaml
SHAPE=()
SYNC_SHAPE=(train.seq_len=512)
if [[ -n "${GPU_SH_SMOKE:-}" ]] || ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu.sh: no GPU: a smoke run with a tiny model (numbers mean nothing)"
  CONFIG=configs/tiny.yaml
  STEPS=2
  SHAPE=(--override train.seq_len=32 --override train.micro_batch_size=2 --override train.grad_accum=1)
  SYNC_SHAPE=(train.seq_len=32)
  ONLY=${ONLY:-base,fp16}
fi

{
  date -u +"date: %Y-%m-%d %H:%M UTC"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "device: CPU ($(nproc) cores)"
  "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
  "$PYTHON" - <<'PY'
import time, torch
if torch.cuda.is_available():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
    for _ in range(3): a @ b
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(10): a @ b
    torch.cuda.synchronize(); print(f"dense bf16 matmul 8192^3: {10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12:.0f} TFLOP/s")
PY
} | tee "$OUT/device.txt"

echo "== switches (one process, every variant side by side)"
"$PYTHON" bench/switches.py --config "$CONFIG" --set gpu --steps "$STEPS" ${ONLY:+--only "$ONLY"} "${SHAPE[@]}" \
  2>&1 | grep -v -i "warn" | tee "$OUT/switches.log" | grep -E '^\||^config|"variant"'

echo "== host syncs on CUDA (fp16, an overflow injected at step 2; rows read at steps 1, 4)"
"$PYTHON" -m harness train "$CONFIG" train.steps=4 log.every=4 eval.every=0 log.progress=off precision=fp16 \
  debug.count_syncs=true faults.nonfinite_grad_steps=[2] "run.dir=$OUT/syncs" "${SYNC_SHAPE[@]}" >"$OUT/syncs.log" 2>&1
echo "   exit $?"
"$PYTHON" -c "
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r['step'], 'skipped' if r['skipped'] else 'applied', 'scale', r['loss_scale'], 'host_syncs', r['host_syncs'], r['collectives'])
" "$OUT/syncs/metrics.jsonl" | tee "$OUT/syncs.txt"

echo "== checkpoint staging (SmolLM2-135M state on the device)"
STAGING=(--device cuda --saves 2)
[[ "$CONFIG" == configs/tiny.yaml ]] && STAGING=(--device cpu --saves 1 --config configs/tiny.yaml)
"$PYTHON" bench/checkpoint_staging.py "${STAGING[@]}" 2>&1 | tail -n 5 | tee "$OUT/staging.txt"
