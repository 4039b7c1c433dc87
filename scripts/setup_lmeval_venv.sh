#!/usr/bin/env bash
# Create .venv-lmeval: lm-evaluation-harness in its own environment (the reference for the MMLU
# check in scripts/compare_lm_eval.py), so the main requirements stay lean. torch and
# transformers are pinned to the main environment's versions, so both sides run the same model
# code. Idempotent: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LMEVAL_VENV:-.venv-lmeval}
LMEVAL_VERSION=${LMEVAL_VERSION:-0.4.13}
torch_pin=$(grep -E '^torch==' requirements.txt)
tf_pin=$(grep -E '^transformers(\[[a-z]+\])?==' requirements.txt | sed 's/\[.*\]//')
want="lm-eval[hf,api]==$LMEVAL_VERSION $torch_pin $tf_pin"
stamp="$VENV/.forgelab-lmeval"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "[lm-eval] creating $VENV with $want" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, then the rest constrained to it, so nothing swaps in a CUDA build.
"$VENV/bin/python" -m pip install -q "$torch_pin"
printf '%s\n%s\n' "$torch_pin" "$tf_pin" > "$VENV/constraints.txt"
"$VENV/bin/python" -m pip install -q "lm-eval[hf,api]==$LMEVAL_VERSION" "$tf_pin" -c "$VENV/constraints.txt"
echo "$want" > "$stamp"
