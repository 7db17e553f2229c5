#!/usr/bin/env bash
# One prepared GPU check, sized for a short lease on one H100/H200: configs/llama-1b.yaml (1.1B
# parameters, seq 2048, 16k tokens per step) on 1 GPU, harness in bf16, bf16 + activation
# checkpointing, fp16, fp32 (TF32 off) and DeepSpeed ZeRO-3 bf16, next to a hand-written
# single-GPU loop (bench/plain_loop.py). Prints Markdown rows for bench/RESULTS.md.
#   bench/gpu.sh [OUT_DIR]         (STEPS=10 RUN_TIMEOUT=150 by default)
# Wheels the GPU image lacks (datasets, deepspeed, ...) are installed from .whl/ when they are
# missing (the device tool's README says how to download them).
# On a CPU-only machine it runs end to end with a tiny model instead (GPU_SH_SMOKE=1 forces it).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${1:-${OUT:-runs/gpu-bench}}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python && -z "${VIRTUAL_ENV:-}" ]] && PYTHON=.venv/bin/python
if ! "$PYTHON" -c "import datasets, deepspeed" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/harness-site .whl/*.whl \
    || { echo "gpu.sh: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/harness-site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
export HARNESS_CACHE=${HARNESS_CACHE:-/tmp/harness-cache} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
STEPS=${STEPS:-10}
RUN_TIMEOUT=${RUN_TIMEOUT:-150}

CONFIG=configs/llama-1b.yaml
SHAPE=()
if [[ -n "${GPU_SH_SMOKE:-}" ]] || ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu.sh: no GPU: a smoke run with a tiny model (numbers mean nothing)"
  CONFIG=configs/tiny.yaml
  STEPS=4
  SHAPE=(train.seq_len=32 train.micro_batch_size=2 train.grad_accum=1 eval.every=0)
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

run_harness() {  # NAME [overrides...]
  local name=$1; shift
  echo "== harness $name: $*"
  timeout "$RUN_TIMEOUT" "$PYTHON" -m harness.train "$CONFIG" "train.steps=$STEPS" log.every=1 log.progress=lines \
    eval.every=0 "run.dir=$OUT/$name" "${SHAPE[@]}" "$@" >"$OUT/$name.log" 2>&1
  echo "   exit $? ($(tail -n 1 "$OUT/$name.log"))"
}

echo "== plain loop bf16"
timeout "$RUN_TIMEOUT" "$PYTHON" bench/plain_loop.py "$CONFIG" --steps "$STEPS" --precision bf16 \
  --out "$OUT/plain-bf16.json" >"$OUT/plain-bf16.log" 2>&1
echo "   exit $?"
run_harness bf16 precision=bf16
run_harness bf16-ac precision=bf16 model.gradient_checkpointing=true
run_harness fp16 precision=fp16
run_harness fp32 precision=fp32
run_harness zero3-bf16 precision=bf16 parallel.backend=deepspeed parallel.zero_stage=3

"$PYTHON" bench/gpu_rows.py "$OUT/plain-bf16.json" "$OUT"/{bf16,bf16-ac,fp16,fp32,zero3-bf16} | tee "$OUT/rows.md"
