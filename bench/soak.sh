#!/usr/bin/env bash
# The soak (issue 15): 3,000 tiny steps on 2 ranks, async checkpoints every 50, keep_last=2, RSS /
# file descriptors / threads sampled every 100 steps. Arguments go to bench/soak.py, e.g.
#   bench/soak.sh --steps 120 --checkpoint-every 20 --sample-every 20   (the suite's short form)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
[[ -x "$ROOT/.venv/bin/python" && -z "${VIRTUAL_ENV:-}" ]] && PYTHON="$ROOT/.venv/bin/python"
exec "$PYTHON" "$ROOT/bench/soak.py" "$@"
