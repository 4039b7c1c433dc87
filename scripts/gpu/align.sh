#!/usr/bin/env bash
# GPU alignment batch (one H200): DPO with LoRA on the Qwen3-1.7B shape, the lab's runs through
# its own launcher (scripts/train/bench.sh) and TRL's own DPOTrainer with its defaults
# (scripts/gpu/trl_dpo_peer.py) side by side on the same pairs, seed and adapters; then the
# memory terms of the estimator on runs that have them (a full-weight DPO: the reference copy; a
# GRPO run: the generation KV cache). Parts, in the order given (default: all):
#   trl17       TRL DPOTrainer defaults: gradient checkpointing on, batch 8, no compile
#   lab17_trl   the lab with TRL's settings (checkpointing on, batch 8, eager): the glue's own cost
#   lab17       the lab's tuned settings: checkpointing off, batch 8
#   lab17_b16   tuned, batch 16
#   full06      full-weight DPO, Qwen3-0.6B shape: the reference model's weights in the estimate
#   grpo06      GRPO LoRA, Qwen3-0.6B shape, 8 answers x 4 prompts of 256 tokens: the KV cache term
# Inputs: .gpu/tok, .gpu/pref_gsm.jsonl + .gpu/pref_gsm_prompts.jsonl (scripts/gpu/build_pref_bench.py),
# .whl (transformers 5.23, peft 0.21.2, trl 1.16, datasets 5.2, dill, multiprocess). Results:
# $OUT/align_runs.tgz, $OUT/*.json (the peer), $OUT/align.log.
# usage: OUT=dir BUDGET_S=560 bash scripts/gpu/align.sh [PART ...]
set -uo pipefail
source "$(dirname "$0")/_env.sh"
deadline=$(( t0 + ${BUDGET_S:-560} ))
names=()
save() {
  tar czf "$OUT/align_runs.tgz" --exclude='checkpoint-*' --exclude='final' --exclude='*.safetensors' \
    "${names[@]/#/runs/train/}" 2>/dev/null
}
left() { echo $(( deadline - $(date +%s) - 15 )); }
lab() {  # lab NAME TIMEOUT TASK [bench.sh args]
  local name=$1 t=$2 task=$3; shift 3
  (( $(left) < 60 )) && { el "skip $name (budget)"; return; }
  (( t > $(left) )) && t=$(left)
  names+=("$name"); el "run $name (timeout ${t}s)"
  TORCHINDUCTOR_CACHE_DIR=/tmp/inductor timeout "$t" bash scripts/train/bench.sh single --task "$task" "$@" \
    --run-name "$name" > "runs/$name.log" 2>&1 || el "  $name exited $?"
  grep -E "Error|error:|OutOfMemory" "runs/$name.log" | tail -3
  cp "runs/$name.log" "runs/train/$name/stdout.log" 2>/dev/null
  python3 - "$name" <<'PY'
import json, sys
try:
    d = json.load(open(f"runs/train/{sys.argv[1]}/train_summary.json"))
except Exception as e:
    print(f"  {sys.argv[1]}: no summary ({e})"); sys.exit()
est = ((d.get("estimate") or {}).get("predicted") or {}).get("peak_memory_bytes") or 0
print(f"  {sys.argv[1]}: tok/s {d.get('tokens_per_s_steady') or 0:,.0f} MFU {d.get('mfu_steady') or 0:.3f} "
      f"peak {(d.get('peak_memory_bytes') or 0)/2**30:.1f} GiB (estimate {est/2**30:.1f}) loss {d.get('final_loss')}")
PY
  save
}
M17=(--set model.path=null --set model.preset=qwen3-1.7b --set model.tokenizer=.gpu/tok --set data.train=.gpu/pref_gsm.jsonl
     --set lora.r=64 --set lora.alpha=128 --set lora.dropout=0.0 --set steps.max_steps=16 --set optim.warmup_steps=2
     --set metrics.steady_skip_steps=6 --set align.max_length=1024 --set steps.grad_accum=1)
TRLSET=(--set runtime.gradient_checkpointing=true --set runtime.torch_compile=false --set steps.micro_batch_size=8)
# tuned: no recomputation (the H200 holds the activations); eager: TRL's batches are padded to their own
# longest pair, so a compiled block recompiles on new lengths (measured: 25-35 s per new shape, and
# dynamic-shape graphs ran slower than eager)
TUNED=(--set runtime.gradient_checkpointing=false --set runtime.torch_compile=false)
M06=(--set model.path=null --set model.preset=qwen3-0.6b --set model.tokenizer=.gpu/tok --set steps.max_steps=10
     --set optim.warmup_steps=2 --set metrics.steady_skip_steps=4 --set steps.grad_accum=1 "${TUNED[@]}")
python3 -c "import pyarrow, torch; print('pyarrow', pyarrow.__version__, 'torch', torch.__version__)"
for part in "${@:-trl17 lab17_trl lab17 lab17_b16 full06 grpo06}"; do
  case $part in
    trl17)
      (( $(left) < 90 )) && { el "skip trl17 (budget)"; continue; }
      el "run trl17"
      timeout "$(left)" python3 scripts/gpu/trl_dpo_peer.py --out "$OUT" --name trl-dpo17 --preset qwen3-1.7b \
        --tok .gpu/tok --data .gpu/pref_gsm.jsonl --steps 16 --skip 6 --batch 8 --r 64 > runs/trl-dpo17.log 2>&1 \
        || el "  trl17 exited $?"
      tail -2 runs/trl-dpo17.log; cp runs/trl-dpo17.log "$OUT/" ;;
    lab17_trl) lab dpo17-trlsettings 240 dpo "${M17[@]}" "${TRLSET[@]}" ;;
    lab17)     lab dpo17-tuned 240 dpo "${M17[@]}" "${TUNED[@]}" --set steps.micro_batch_size=8 ;;
    lab17_b16) lab dpo17-tuned-b16 240 dpo "${M17[@]}" "${TUNED[@]}" --set steps.micro_batch_size=16 ;;
    full06)    lab dpo06-full 200 dpo_full "${M06[@]}" --set data.train=.gpu/pref_gsm.jsonl --set steps.micro_batch_size=8 ;;
    grpo06)    lab grpo06 200 grpo "${M06[@]}" --set runtime.torch_compile=false --set data.train=.gpu/pref_gsm_prompts.jsonl --set lora.r=64 \
                 --set lora.alpha=128 --set align.num_generations=8 --set align.max_completion_length=256 \
                 --set steps.micro_batch_size=8 --set steps.grad_accum=4 --set align.reward_weights=null \
                 --set 'align.rewards=[forgelab.align.rewards:math_exact_match]' ;;
    *) el "unknown part $part" ;;
  esac
done
el "done"
