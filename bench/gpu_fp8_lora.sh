#!/usr/bin/env bash
# The GPU targets of issues 29 (FP8) and 30 (LoRA), prepared for one H100/H200, in parts that each
# fit one device call (PART=throughput|loss|zero3|lora, default: all in turn):
#   throughput  configs/llama-3b.yaml compiled, same batch: bf16, fp8 tensorwise, fp8 rowwise
#               (median tokens/s after the compile steps, peak memory, the ratio to bf16)
#   loss        bf16 and fp8 tensorwise for LOSS_STEPS (300) steps on the same data: the gap of
#               the mean of the last 10 losses (~5 minutes a run on an H100 by the estimate: run
#               PART=loss-bf16 and PART=loss-fp8 as two calls into the same OUT_DIR)
#   zero3       fp8 and bf16 on DeepSpeed ZeRO-3 beside FSDP2, compiled; the recompiles and graph
#               breaks of compiled ZeRO-3 (TORCH_LOGS) in zero3-compile.log
#   lora        llama-3b's seeded init written as a bf16 pretrained folder, then a full fine-tune
#               and lora.r=16 on it, bf16, compiled: tokens/s and peak memory
# Each run prints one Markdown row; everything lands in OUT_DIR (default runs/gpu-fp8-lora).
#   PART=throughput bench/gpu_fp8_lora.sh [OUT_DIR]      (STEPS=20, LOSS_STEPS=300)
# On a CPU-only machine it runs end to end with the tiny FP8 model, emulated (numbers mean nothing).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${1:-${OUT:-runs/gpu-fp8-lora}}
mkdir -p "$OUT"
source bench/gpu_env.sh
STEPS=${STEPS:-20}
LOSS_STEPS=${LOSS_STEPS:-300}
PART=${PART:-all}
CONFIG=configs/llama-3b.yaml
EXTRA=()
if [[ -n "${GPU_SH_SMOKE:-}" ]] || ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_fp8_lora.sh: no GPU: a smoke run with the tiny FP8 model, emulated (numbers mean nothing)"
  CONFIG=configs/tiny-llama-fp8.yaml
  STEPS=3
  LOSS_STEPS=4
  EXTRA=(train.compile=false)
fi

# One run: NAME, then overrides; prints its row.
run() {
  local name=$1; shift
  "$PYTHON" -m harness train "$CONFIG" "run.dir=$OUT/$name" log.progress=off log.every=1 eval.every=0 \
    checkpoint.final=false "train.steps=$STEPS" "${EXTRA[@]}" "$@" >"$OUT/$name.log" 2>&1
  local code=$?
  "$PYTHON" bench/run_row.py "$name" "$OUT/$name" "$code" "$@"
}

want() { [[ $PART == all || $PART == "$1" ]]; }

{
  date -u +"date: %Y-%m-%d %H:%M UTC"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "device: CPU ($(nproc) cores)"
  "$PYTHON" -c "import torch, torchao, peft; print('torch', torch.__version__, '| torchao', torchao.__version__, '| peft', peft.__version__)"
} | tee "$OUT/device.txt"
"$PYTHON" bench/run_row.py --header

if want throughput; then
  run bf16 precision=bf16
  run fp8-tensorwise precision=fp8 fp8.recipe=tensorwise
  run fp8-rowwise precision=fp8 fp8.recipe=rowwise
fi
if want loss || want loss-bf16; then STEPS=$LOSS_STEPS run loss-bf16 precision=bf16; fi
if want loss || want loss-fp8; then STEPS=$LOSS_STEPS run loss-fp8 precision=fp8; fi
if [[ -f $OUT/loss-bf16/metrics.jsonl && -f $OUT/loss-fp8/metrics.jsonl ]]; then
  "$PYTHON" bench/run_row.py --gap "$OUT/loss-bf16" "$OUT/loss-fp8"
fi
if want zero3; then
  run fsdp2-fp8 precision=fp8
  run zero3-fp8 precision=fp8 parallel.backend=deepspeed parallel.zero_stage=3
  run fsdp2-bf16 precision=bf16
  TORCH_LOGS=recompiles,graph_breaks run zero3-compile precision=bf16 parallel.backend=deepspeed parallel.zero_stage=3
fi
if want lora; then
  BASE=$OUT/base
  [[ -f $BASE/config.json ]] || "$PYTHON" bench/lora_memory.py --write-base "$CONFIG" "$BASE"
  run full-ft precision=bf16 "model.pretrained=$BASE" "model.config={}" data.tokenizer=bundled:gpt2
  run lora-r16 precision=bf16 "model.pretrained=$BASE" "model.config={}" data.tokenizer=bundled:gpt2 lora.r=16 lora.alpha=32
fi
