#!/usr/bin/env bash
# Start a harness job through the deepspeed launcher.
#   launch/deepspeed.sh [--hostfile FILE] [--num_gpus N] [other deepspeed launcher flags] CONFIG.yaml [key.sub=value ...]
# Single node: --num_gpus N local ranks (also on a CPU-only node, where it defaults to 1).
# Multi-node: --hostfile FILE ("host slots=N" per line), ranks started over ssh/pdsh by deepspeed.
# Launcher flags go before the config; everything after it goes to harness.train.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
if [[ -x "$ROOT/.venv/bin/python" && -z "${VIRTUAL_ENV:-}" ]]; then
  PYTHON="$ROOT/.venv/bin/python"
fi

LAUNCHER_ARGS=()
HAS_RANKS_FLAG=0
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --hostfile|--num_gpus|--num_accelerators|--num_nodes|--include|--exclude|--master_port|--master_addr|--launcher|--launcher_args|--ssh_port)
      [[ $# -ge 2 ]] || { echo "launch/deepspeed.sh: $1 needs a value" >&2; exit 2; }
      [[ "$1" =~ ^--(hostfile|num_gpus|num_accelerators|num_nodes|include)$ ]] && HAS_RANKS_FLAG=1
      LAUNCHER_ARGS+=("$1" "$2"); shift 2 ;;
    --hostfile=*|--num_gpus=*|--num_nodes=*|--include=*)
      HAS_RANKS_FLAG=1; LAUNCHER_ARGS+=("$1"); shift ;;
    *) LAUNCHER_ARGS+=("$1"); shift ;;
  esac
done
if [[ $# -lt 1 ]]; then
  echo "usage: launch/deepspeed.sh [--hostfile FILE] [--num_gpus N] CONFIG.yaml [key.sub=value ...]" >&2
  exit 2
fi

# A CPU-only node has no devices for deepspeed to count: one rank unless told otherwise.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  [[ $HAS_RANKS_FLAG -eq 1 ]] || LAUNCHER_ARGS+=(--num_gpus 1)
fi

"$PYTHON" -m harness train "$@" --config-only

if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  export OMP_NUM_THREADS=1
fi
DEEPSPEED="$(dirname "$PYTHON")/deepspeed"
[[ -x "$DEEPSPEED" ]] || DEEPSPEED=deepspeed
# --no_local_rank: harness reads LOCAL_RANK from the environment, not from --local_rank.
exec "$DEEPSPEED" "${LAUNCHER_ARGS[@]}" --no_local_rank --module harness train "$@"
