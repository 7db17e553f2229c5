# Sourced by bench/gpu.sh and bench/gpu_tune.sh (from the repository root, ROOT set): the Python
# to use, and the wheels a GPU image lacks (datasets, deepspeed, ...) installed from .whl/ when
# they are missing (the device tool's README says how to download them).
PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python && -z "${VIRTUAL_ENV:-}" ]] && PYTHON=.venv/bin/python
if ! "$PYTHON" -c "import datasets, deepspeed" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/harness-site .whl/*.whl \
    || { echo "$(basename "$0"): installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/harness-site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
export HARNESS_CACHE=${HARNESS_CACHE:-/tmp/harness-cache} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
