# Sourced by the GPU batch scripts: repo root, $OUT, the carried wheels (.whl -> /tmp/site),
# the project on PYTHONPATH and run records under runs/ and logs/; `el` prints elapsed time.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-runs/gpu_out}; mkdir -p "$OUT" runs logs
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false FORGELAB_RUNS_DIR=$PWD/runs FORGELAB_LOGS_DIR=$PWD/logs
t0=$(date +%s)
el() { echo "[+$(( $(date +%s) - t0 ))s] $*"; }
