#!/usr/bin/env bash
# Issue 12's open targets on one GPU (bf16 MFU >= 50%, ZeRO-3 >= 0.9x FSDP2), in one call sized for
# a short lease: configs/llama-1b.yaml at micro-batch 8 x grad_accum 1 (16,384 tokens per step).
#   1. FSDP2 eager / compile / compile at micro-batch 16, and DeepSpeed ZeRO-3 eager / compile with
#      whole blocks as its units (parallel.zero3_unit=block, the default), with DeepSpeed's own
#      per-module units (zero3_unit=module), and blocks with bench/zero3-prefetch.json (a
#      block-sized prefetch bucket, larger persistence threshold);
#   2. the same FSDP2 eager / compile pinned to cuDNN's attention kernels (--sdpa cudnn);
#   3. bench/profile_step.py on the compiled FSDP2 step: device time by kernel kind.
#   bench/gpu_tune.sh [OUT_DIR]       (STEPS=5 by default; on a CPU a tiny smoke run)
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${1:-${OUT:-runs/gpu-tune}}
mkdir -p "$OUT"
source bench/gpu_env.sh
STEPS=${STEPS:-5}
CONFIG=configs/llama-1b.yaml
SHAPE=(--override train.micro_batch_size=8 --override train.grad_accum=1)
PROFILE_SHAPE=(train.micro_batch_size=8 train.grad_accum=1)
MB16="train.micro_batch_size=16"
if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_tune.sh: no GPU: a smoke run with a tiny model (numbers mean nothing)"
  CONFIG=configs/tiny.yaml STEPS=1
  SHAPE=(--override train.seq_len=32 --override train.micro_batch_size=2 --override train.grad_accum=1)
  PROFILE_SHAPE=(train.seq_len=32 train.micro_batch_size=2 train.grad_accum=1)
  MB16="train.micro_batch_size=4"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/device.txt"
BF16="precision=bf16"
ZERO3="$BF16;parallel.backend=deepspeed;parallel.zero_stage=3"
TUNED="parallel.deepspeed_config=bench/zero3-prefetch.json"

echo "== 1. FSDP2 and ZeRO-3: block or module units, default and tuned buckets"
"$PYTHON" bench/switches.py --config "$CONFIG" --set gpu --only compile,zero3 --no-plain --steps "$STEPS" --rounds 2 \
  "${SHAPE[@]}" --extra "compile_mb16=$BF16;train.compile=true;$MB16" --extra "zero3_compile=$ZERO3;train.compile=true" \
  --extra "zero3_module=$ZERO3;parallel.zero3_unit=module" \
  --extra "zero3_prefetch=$ZERO3;$TUNED" --extra "zero3_prefetch_compile=$ZERO3;$TUNED;train.compile=true" \
  2>&1 | grep -v -i "warn" | tee "$OUT/tune.log" | grep -E '^\||^config|"variant"'

[[ "$CONFIG" == configs/tiny.yaml ]] || {
echo "== 2. cuDNN attention"
"$PYTHON" bench/switches.py --config "$CONFIG" --set gpu --only compile --no-plain --steps "$STEPS" --rounds 2 \
  --sdpa cudnn "${SHAPE[@]}" 2>&1 | grep -v -i "warn" | tee "$OUT/cudnn.log" | grep -E '^\||^config|"variant"'
}

echo "== 3. profile of the compiled FSDP2 step"
"$PYTHON" bench/profile_step.py "$CONFIG" precision=bf16 train.compile=true "${PROFILE_SHAPE[@]}" --steps 3 \
  2>&1 | grep -v -i "warn" | tee "$OUT/profile.log" | grep -E '^\||steps, wall'
