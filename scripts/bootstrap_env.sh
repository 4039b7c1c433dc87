#!/usr/bin/env bash
# Create or refresh .venv from requirements.txt. Idempotent: re-runs are instant when
# requirements.txt has not changed (its hash is stamped into the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "[bootstrap] creating $VENV from requirements.txt (first run takes a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
torch_pin=$(grep -E '^torch==' requirements.txt)
# torch first, then everything else constrained to it, so no dependency can swap in a CUDA build.
"$VENV/bin/python" -m pip install -q "$torch_pin"
echo "$torch_pin" > "$VENV/.torch-constraint.txt"
"$VENV/bin/python" -m pip install -q -r requirements.txt -c "$VENV/.torch-constraint.txt"
"$VENV/bin/python" -m pip install -q --no-deps -e .
echo "$want" > "$stamp"
