#!/usr/bin/env bash
# Start NPROC ranks of a harness job on this node with torchrun.
#   launch/local.sh NPROC CONFIG.yaml [key.sub=value ...]
#   launch/local.sh NPROC SCRIPT.py [args ...]     # a script of the Python API (harness.Trainer)
# The config is checked once before any rank starts, so a typo costs a second, not a job.
set -euo pipefail

if [[ $# -lt 2 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: launch/local.sh NPROC CONFIG.yaml [key.sub=value ...] | NPROC SCRIPT.py [args ...]" >&2
  exit 2
fi
NPROC=$1
shift

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
if [[ -x "$ROOT/.venv/bin/python" && -z "${VIRTUAL_ENV:-}" ]]; then
  PYTHON="$ROOT/.venv/bin/python"
fi

if [[ "$1" != *.py ]]; then
  "$PYTHON" -m harness train "$@" --config-only --world-size "$NPROC"
fi

# One intra-op thread pool per rank, sharing the cores instead of oversubscribing them.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  CORES=$(nproc)
  export OMP_NUM_THREADS=$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))
fi

# torchrun, with its traceback-style report suppressed when a rank already explained itself.
exec "$PYTHON" -m harness.cli.launcher "$NPROC" "$@"
