#!/usr/bin/env bash
# Stage 09: evaluate models side by side (perplexity, GSM8K-style math, MMLU-style multiple
# choice) -> runs/eval/<run>/ and reports/eval.md. Arguments go to scripts/09_eval.py, e.g.
#   scripts/09_eval.sh --config configs/eval/default.yaml --config configs/eval/compare.yaml
# One thread per process is the fastest setting on a small shared CPU; set OMP_NUM_THREADS to change it.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-.venv/bin/python}" scripts/09_eval.py "$@"
