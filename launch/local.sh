#!/usr/bin/env bash
# Start NPROC ranks of a harness job on this node with torchrun.
#   launch/local.sh NPROC CONFIG.yaml [key.sub=value ...]
# The config is checked once before any rank starts, so a typo costs a second, not a job.
set -euo pipefail

if [[ $# -lt 2 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: launch/local.sh NPROC CONFIG.yaml [key.sub=value ...]" >&2
  exit 2
fi
NPROC=$1
shift

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
if [[ -x "$ROOT/.venv/bin/python" && -z "${VIRTUAL_ENV:-}" ]]; then
  PYTHON="$ROOT/.venv/bin/python"
fi

"$PYTHON" -m harness train "$@" --check --world-size "$NPROC" >/dev/null

# One intra-op thread pool per rank, sharing the cores instead of oversubscribing them.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  CORES=$(nproc)
  export OMP_NUM_THREADS=$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))
fi

# torchrun, with its traceback-style report suppressed when a rank already explained itself.
exec "$PYTHON" -m harness.cli.launcher "$NPROC" "$@"
