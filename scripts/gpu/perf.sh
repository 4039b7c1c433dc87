#!/usr/bin/env bash
# GPU performance batch (one H100 or H200): the levers of reports/gpu_performance.md, each run through
# the project's own launcher (scripts/train/bench.sh), so every train_summary.json records its
# command. Parts (run in the order given; default "cpt17"):
#   cpt17  Qwen3-1.7B shape, seq 2048: the Trainer baseline (LLaMA-Factory / ms-swift defaults)
#          and tuned settings with the same global batch, side by side
#   chunk17  for 80 GB cards: the chunked LM head + loss so that micro batch 8 fits (not run yet)
#   cap80  an 80 GB card emulated (runtime.memory_cap_gib=79.6): micro batch 4, 8, 8 + chunked loss, 16 + chunked loss
#   floor17  the device's floor for the 1.7B step (scripts/kernel_floor.py) and a profile of the
#          regional-compile setting (kernel time per category, idle share)
#   levers17  single levers on the regional-compile 1.7B setting (micro batch 8, cuDNN SDPA, max-autotune)
#   base17  the Trainer baseline alone (the side-by-side partner of the tuned runs on a new device)
#   levers17b  on top of micro batch 8 (needs > 80 GB): micro batch 16, max-autotune, accumulation 4
#   levers17c  at micro batch 16: fused AdamW off, loader workers, checkpointing on, whole-model
#          compile, seq 4096 (same tokens per step; needs .gpu/cpt4096)
#   repeat17  the best 1.7B setting (micro batch 16) a second time, for the noise
#   fp8_17  FP8 linears (runtime.fp8, torchao float8) on that setting: bf16, tensorwise, rowwise and bf16
#          again (the noise), 60 steps each on the same data; $OUT/fp8_compare.json compares them
#   fp8head17  the same protocol: bf16, tensorwise again, tensorwise with the LM head in FP8 too
#          (runtime.fp8_lm_head); $OUT/fp8head_compare.json
#   fp8long17  120 steps, 10-step warm-up, on .gpu/cpt2048L (2,063 blocks): bf16, tensorwise + LM
#          head, tensorwise; $OUT/fp8long_compare.json
#   fp8peer17 the lab's FP8 (tensorwise + LM head) and bf16 at 30 steps, beside titan.sh fp8tw / bf16
#   s8k17  the 1.7B shape at seq 8192, micro batch 4 (beside titan.sh s8k)
#   s16k17  seq 16384, micro batch 2 (beside titan.sh s16k)
#   s8kfp8_17  seq 8192, micro batch 4, FP8 tensorwise + LM head (beside titan.sh s8kfp8)
#   longchunk17  seq 8192 (micro batch 4) and 16384 (micro batch 2) with the chunked LM head + loss
#          (runtime.loss_chunk_tokens=4096): the fp32 logits gone, for peak memory under torchtitan's
#   s16kfp8_17  seq 16384, micro batch 2, FP8 tensorwise + LM head
#   cpt06peer  the 0.6B shape, micro batch 16, 30 steps (beside titan.sh s06)
#   floor2  the kernel floor re-measured (scripts/kernel_floor.py, five calls per timing): 1.7B at
#          micro batch 8 and 16, 0.6B at 16, seq 2048; $OUT/kernel_floor_*_r2.json
#   fp8stable17  the same at lr 3e-4: bf16, tensorwise + LM head, bf16 again; $OUT/fp8stable_compare.json
#   fp8calm17  the same at lr 1e-4; $OUT/fp8calm_compare.json
#   cpt06b  the 0.6B shape at micro batch 4, 8 and 16
#   cpt06  Qwen3-0.6B shape, seq 2048: the tuned settings
#   sft17  Qwen3-1.7B shape, LoRA r=64 all-linear, GSM8K-train lengths: padded batch-8 baseline
#          vs packed rows (flex attention / sdpa, compile)
#   long32k17 the 1.7B shape at seq 32768 (chunked loss; checkpointing off / on); needs .gpu/cpt32k
#   qlora17 QLoRA (lora.quantize_base=nf4) vs bf16 LoRA on the sft17 data, tokens/s and peak memory
#   sftpeer17 the lab's packed SFT LoRA (flex, sdpa) vs TRL's SFTTrainer on the same samples
#          (scripts/gpu/trl_sft_peer.py: bfd packing = padding-free; its defaults, then tuned);
#          needs the trl, datasets, dill, multiprocess, xxhash wheels in .whl
#   pack   the packing check (per-sample logits, packed vs alone) on the GPU, sdpa and flex
# Inputs: .gpu/tok, .gpu/cpt2048 (.gpu/cpt4096 for levers17c), .gpu/sft_gsm_packed, .gpu/sft_gsm_rows (scripts/gpu/README.md),
# .whl (transformers, peft, liger-kernel wheels; torchao for fp8_17, fp8head17). Results: $OUT/perf_runs.tgz + $OUT/perf.log.
# usage: OUT=dir BUDGET_S=560 bash scripts/gpu/perf.sh cpt17 [cpt06 sft17 pack]
set -uo pipefail
source "$(dirname "$0")/_env.sh"
deadline=$(( t0 + ${BUDGET_S:-560} ))
names=()
save() {
  tar czf "$OUT/perf_runs.tgz" --exclude='checkpoint-*' --exclude='final' --exclude='*.safetensors' \
    --exclude='*.pt.trace.json*' --exclude='trace_rank*.json' "${names[@]/#/runs/train/}" 2>/dev/null
}
summary() {  # one line per run from its train_summary.json
  python3 - "$1" <<'EOF'
import json, sys
p = f"runs/train/{sys.argv[1]}/train_summary.json"
try:
    d = json.load(open(p))
except Exception as e:
    print(f"  {sys.argv[1]}: no summary ({e.__class__.__name__})"); sys.exit()
g = lambda k: d.get(k)
print(f"  {sys.argv[1]}: status {g('status')} tok/s {g('tokens_per_s_steady') or 0:,.0f} MFU {g('mfu_steady') or 0:.3f} "
      f"peak {(g('peak_memory_bytes') or 0)/2**30:.1f} GiB loss {g('final_loss')} waste {g('padding_waste')}")
EOF
}
# bench NAME TIMEOUT [bench.sh args...]: one run, bounded by its timeout and the batch's deadline
# (TRACK=profile bench ... runs the profile track instead)
bench() {
  local name=$1 t=$2 track=${TRACK:-bench}; shift 2
  local left=$(( deadline - $(date +%s) - 15 ))
  (( left < 45 )) && { el "skip $name (budget)"; return; }
  (( t > left )) && t=$left
  names+=("$name"); el "run $name (timeout ${t}s)"
  # one inductor cache for the batch: runs of the same block graph skip recompiling (compile time
  # is outside the steady window either way)
  TORCHINDUCTOR_CACHE_DIR=/tmp/inductor timeout "$t" bash "scripts/train/$track.sh" single "$@" \
    --run-name "$name" > "runs/$name.log" 2>&1 || el "  $name exited $? (log tail below)"
  grep -E "Error|error:|OutOfMemory" "runs/$name.log" | tail -3
  cp "runs/$name.log" "runs/train/$name/stdout.log" 2>/dev/null
  summary "$name"; save
}

fp8_lr_curves() {  # TAG LR NAME: fp8long17's 120-step protocol at lr LR, bf16 twice around
  # tensorwise + LM head (runs p17-fp8TAG-*), compared into $OUT/NAME_compare.json
  local tag=$1 lr=$2 out=$3
  local C=("${F17[@]}" --set data.train=.gpu/cpt2048L/train --set steps.max_steps=120 --set optim.warmup_steps=10
           --set metrics.steady_skip_steps=10 --set optim.lr="$lr")
  bench "p17-fp8$tag-bf16" 200 "${C[@]}"
  bench "p17-fp8$tag-tensorwise-head" 170 "${C[@]}" "${FP8H[@]}"
  bench "p17-fp8$tag-bf16-r2" 180 "${C[@]}"
  python3 scripts/gpu/fp8_compare.py runs/train "p17-fp8$tag-bf16" "p17-fp8$tag-tensorwise-head" \
    "p17-fp8$tag-bf16-r2" --json "$OUT/${out}_compare.json"
}

P17=(--task pretrain --set model.preset=qwen3-1.7b --set model.tokenizer=.gpu/tok --set data.train=.gpu/cpt2048/train
     --set steps.max_steps=14 --set optim.warmup_steps=2 --set metrics.steady_skip_steps=4)
P06=(--task pretrain --set model.preset=qwen3-0.6b --set model.tokenizer=.gpu/tok --set data.train=.gpu/cpt2048/train
     --set steps.max_steps=14 --set optim.warmup_steps=2 --set metrics.steady_skip_steps=4)
S17=(--task sft_lora --set model.path=null --set model.preset=qwen3-1.7b --set model.tokenizer=.gpu/tok
     --set lora.r=64 --set lora.alpha=128 --set lora.dropout=0.05 --set lora.target_modules=all-linear
     --set optim.lr=1e-4 --set steps.max_steps=12 --set optim.warmup_steps=2 --set metrics.steady_skip_steps=4)
TUNED=(--set runtime.torch_compile=true --set runtime.gradient_checkpointing=false)
# the FP8 parts: the best bf16 1.7B setting, 60 steps (60 x 16 rows stay inside the 1,020 blocks)
F17=("${P17[@]}" "${TUNED[@]}" --set runtime.compile_scope=blocks --set runtime.sdpa_backend=cudnn
     --set steps.micro_batch_size=16 --set steps.grad_accum=1 --set steps.max_steps=60 --set metrics.steady_skip_steps=10)
FP8H=(--set runtime.fp8=tensorwise --set runtime.fp8_lm_head=true)  # the lab's FP8 setting: tensorwise + LM head
# long17 NAME SEQ MICRO [bench.sh args...]: F17 at another length (.gpu/cptSEQ), 20 steps, steady after 6
long17() {
  local name=$1 seq=$2 micro=$3; shift 3
  bench "$name" 220 "${F17[@]}" --set data.train=.gpu/cpt$seq/train --set steps.micro_batch_size="$micro" \
    --set steps.max_steps=20 --set metrics.steady_skip_steps=6 "$@"
}

for part in "${@:-cpt17}"; do
  case $part in
    cpt17)
      bench p17-trainer-default 150 "${P17[@]}" --set runtime.gradient_checkpointing=true \
        --set steps.micro_batch_size=2 --set steps.grad_accum=8
      bench p17-compile-b4 210 "${P17[@]}" "${TUNED[@]}" --set steps.micro_batch_size=4 --set steps.grad_accum=4
      bench p17-compile-b4-cudnn 210 "${P17[@]}" "${TUNED[@]}" --set runtime.sdpa_backend=cudnn \
        --set steps.micro_batch_size=4 --set steps.grad_accum=4
      bench p17-compile-b8-cudnn 210 "${P17[@]}" "${TUNED[@]}" --set runtime.sdpa_backend=cudnn \
        --set steps.micro_batch_size=8 --set steps.grad_accum=2
      bench p17-blocks-b4-cudnn 150 "${P17[@]}" "${TUNED[@]}" --set runtime.compile_scope=blocks \
        --set runtime.sdpa_backend=cudnn --set steps.micro_batch_size=4 --set steps.grad_accum=4
      ;;
    cap80)  # an 80 GB card (H100) emulated on the H200: the allocator capped at 79.6 GiB (runtime.memory_cap_gib)
      C80=("${P17[@]}" "${TUNED[@]}" --set runtime.compile_scope=blocks --set runtime.memory_cap_gib=79.6)
      bench p17-cap80-b4 150 "${C80[@]}" --set steps.micro_batch_size=4 --set steps.grad_accum=4
      bench p17-cap80-b8 150 "${C80[@]}" --set steps.micro_batch_size=8 --set steps.grad_accum=2
      bench p17-cap80-b8-chunk 150 "${C80[@]}" --set steps.micro_batch_size=8 --set steps.grad_accum=2 \
        --set runtime.loss_chunk_tokens=4096
      bench p17-cap80-b16-chunk 150 "${C80[@]}" --set steps.micro_batch_size=16 --set steps.grad_accum=1 \
        --set runtime.loss_chunk_tokens=4096
      ;;
    chunk17)  # for 80 GB cards: the chunked LM head + loss (no full logits) so that micro batch 8 fits
      bench p17-blocks-b4-chunkloss 150 "${P17[@]}" "${TUNED[@]}" --set runtime.compile_scope=blocks \
        --set steps.micro_batch_size=4 --set steps.grad_accum=4 --set runtime.loss_chunk_tokens=4096
      bench p17-blocks-b8-chunkloss 180 "${P17[@]}" "${TUNED[@]}" --set runtime.compile_scope=blocks \
        --set steps.micro_batch_size=8 --set steps.grad_accum=2 --set runtime.loss_chunk_tokens=4096
      ;;
    floor17)  # the device's floor for the 1.7B step (matmuls + attention alone) and where a tuned step's time goes
      el "kernel floor"
      [[ ${SKIP_FLOOR-} ]] || timeout 120 python3 scripts/kernel_floor.py --preset qwen3-1.7b --micro-batch 4 8 --seq 2048 \
        --out "$OUT/kernel_floor_1.7b.json" 2>&1 | grep -v -i warn
      TRACK=profile bench p17-profile-blocks-b4 180 "${P17[@]}" "${TUNED[@]}" --set runtime.compile_scope=blocks \
        --set steps.micro_batch_size=4 --set steps.grad_accum=4 --set steps.max_steps=5 --set profile.wait=2 \
        --set profile.warmup=1 --set profile.active=2 --set profile.time_split=false
      cp runs/train/p17-profile-blocks-b4/profile_summary.json "$OUT/" 2>/dev/null
      ;;
    levers17)  # single levers on the regional-compile 1.7B setting, one at a time
      B4=("${P17[@]}" "${TUNED[@]}" --set runtime.compile_scope=blocks --set steps.micro_batch_size=4)
      bench p17-blocks-b4 150 "${B4[@]}" --set steps.grad_accum=4
      bench p17-blocks-b8 180 "${P17[@]}" "${TUNED[@]}" --set runtime.compile_scope=blocks \
        --set steps.micro_batch_size=8 --set steps.grad_accum=2
      bench p17-blocks-b4-cudnn 150 "${B4[@]}" --set steps.grad_accum=4 --set runtime.sdpa_backend=cudnn
      bench p17-blocks-b4-autotune 300 "${B4[@]}" --set steps.grad_accum=4 --set runtime.compile_mode=max-autotune-no-cudagraphs
      ;;
    base17)  # the Trainer as LLaMA-Factory / ms-swift run it: the side-by-side baseline (same data, global batch 16)
      bench p17-trainer-default 150 "${P17[@]}" --set runtime.gradient_checkpointing=true \
        --set steps.micro_batch_size=2 --set steps.grad_accum=8
      ;;
    levers17b)  # on top of micro batch 8 (H200 memory): larger micro batch, autotuned matmuls, accumulation, CUDA graphs
      B8=("${P17[@]}" "${TUNED[@]}" --set runtime.compile_scope=blocks --set steps.micro_batch_size=8)
      bench p17-blocks-b8-r2 150 "${B8[@]}" --set steps.grad_accum=2
      bench p17-blocks-b16 180 "${P17[@]}" "${TUNED[@]}" --set runtime.compile_scope=blocks \
        --set steps.micro_batch_size=16 --set steps.grad_accum=1
      bench p17-blocks-b8-autotune 300 "${B8[@]}" --set steps.grad_accum=2 --set runtime.compile_mode=max-autotune-no-cudagraphs
      bench p17-blocks-b8-acc4 180 "${B8[@]}" --set steps.grad_accum=4
      ;;
    repeat17)  # the best setting again: the spread of two identical runs is the noise
      bench p17-blocks-b16-r2 180 "${P17[@]}" "${TUNED[@]}" --set runtime.compile_scope=blocks \
        --set steps.micro_batch_size=16 --set steps.grad_accum=1
      ;;
    fp8_17)  # FP8 linears against bf16 on the best 1.7B setting: same data, seed and steps (no row seen
      # twice); MFU of every run by the bf16 formula
      bench p17-fp8-bf16 150 "${F17[@]}"
      bench p17-fp8-tensorwise 180 "${F17[@]}" --set runtime.fp8=tensorwise
      bench p17-fp8-rowwise 180 "${F17[@]}" --set runtime.fp8=rowwise
      bench p17-fp8-bf16-r2 150 "${F17[@]}"
      python3 scripts/gpu/fp8_compare.py runs/train p17-fp8-bf16 p17-fp8-tensorwise p17-fp8-rowwise \
        p17-fp8-bf16-r2 --json "$OUT/fp8_compare.json"
      ;;
    fp8head17)  # the fp8_17 protocol again on another machine, and the LM head in FP8 as the next lever
      bench p17-fp8b-bf16 150 "${F17[@]}"
      bench p17-fp8b-tensorwise 180 "${F17[@]}" --set runtime.fp8=tensorwise
      bench p17-fp8b-tensorwise-head 180 "${F17[@]}" "${FP8H[@]}"
      python3 scripts/gpu/fp8_compare.py runs/train p17-fp8b-bf16 p17-fp8b-tensorwise p17-fp8b-tensorwise-head \
        --json "$OUT/fp8head_compare.json"
      ;;
    fp8peer17)  # beside torchtitan's FP8 (titan.sh fp8tw / bf16, same call): the lab's best FP8 setting and bf16,
      # 30 steps of micro batch 16 on .gpu/cpt2048 (scripts/gpu/reblock.py cuts it from .gpu/cpt32k)
      P=("${F17[@]}" --set steps.max_steps=30 --set metrics.steady_skip_steps=8)
      bench p17-fp8peer-tensorwise-head 200 "${P[@]}" "${FP8H[@]}"
      bench p17-fp8peer-bf16 200 "${P[@]}"
      ;;
    s8k17)  # beside torchtitan at seq 8192 (titan.sh s8k, same call): micro batch 4, the best bf16 setting
      # on .gpu/cpt8192 (scripts/gpu/reblock.py cuts it from .gpu/cpt2048L or .gpu/cpt32k)
      long17 p17-s8k-b4 8192 4 ;;
    s16k17)  # beside torchtitan at seq 16384 (titan.sh s16k, same call): micro batch 2
      long17 p17-s16k-b2 16384 2 ;;
    s8kfp8_17)  # beside torchtitan's float8 at seq 8192 (titan.sh s8kfp8): the lab's FP8 setting
      long17 p17-s8k-b4-fp8 8192 4 "${FP8H[@]}" ;;
    s16kfp8_17)  # beside titan.sh s16kfp8
      long17 p17-s16k-b2-fp8 16384 2 "${FP8H[@]}" ;;
    longchunk17)
      long17 p17-s8k-b4-chunk 8192 4 --set runtime.loss_chunk_tokens=4096
      long17 p17-s16k-b2-chunk 16384 2 --set runtime.loss_chunk_tokens=4096
      ;;
    cpt06peer)  # beside torchtitan's 0.6B flavor (titan.sh s06): micro batch 16, 30 steps, steady after 8
      bench p06-peer-b16 180 "${P06[@]}" "${TUNED[@]}" --set runtime.compile_scope=blocks --set runtime.sdpa_backend=cudnn \
        --set steps.micro_batch_size=16 --set steps.grad_accum=1 --set steps.max_steps=30 --set metrics.steady_skip_steps=8
      ;;
    floor2)  # the floor again, with five back-to-back calls per timing (the 2026-12-01 record timed one)
      for spec in "qwen3-1.7b 8 16" "qwen3-0.6b 16"; do
        set -- $spec; left=$(( deadline - $(date +%s) - 10 )); (( left < 30 )) && { el "skip floor $1 (budget)"; continue; }
        el "kernel floor $spec"; p=$1; shift
        timeout $(( left < 100 ? left : 100 )) python3 scripts/kernel_floor.py --preset "$p" --micro-batch "$@" --seq 2048 \
          --out "$OUT/kernel_floor_${p#qwen3-}_r2.json" 2>&1 | grep -v -i warn | tail -8
      done
      ;;
    fp8long17)  # the FP8 loss curve over 120 steps with a 10-step warm-up on the larger store
      # (.gpu/cpt2048L: 2,063 blocks, no row seen twice): bf16, tensorwise + LM head, tensorwise
      L17=("${F17[@]}" --set data.train=.gpu/cpt2048L/train --set steps.max_steps=120 --set optim.warmup_steps=10
           --set metrics.steady_skip_steps=10)
      bench p17-fp8L-bf16 200 "${L17[@]}"
      bench p17-fp8L-tensorwise-head 190 "${L17[@]}" "${FP8H[@]}"
      bench p17-fp8L-tensorwise 190 "${L17[@]}" --set runtime.fp8=tensorwise
      python3 scripts/gpu/fp8_compare.py runs/train p17-fp8L-bf16 p17-fp8L-tensorwise-head p17-fp8L-tensorwise \
        --json "$OUT/fp8long_compare.json"
      ;;
    fp8stable17)  # fp8long17 at lr 3e-4, where the reference should not spike: bf16 twice (the noise)
      # and tensorwise + LM head
      fp8_lr_curves S 3e-4 fp8stable
      ;;
    fp8calm17)  # the same at lr 1e-4, below the lr where bf16 itself spikes (step 46 at 3e-4, in both
      # bf16 runs)
      fp8_lr_curves C 1e-4 fp8calm
      ;;
    levers17c)  # at micro batch 16: fused AdamW off, checkpointing on, whole-model compile, loader workers, seq 4096
      B16=("${P17[@]}" "${TUNED[@]}" --set runtime.compile_scope=blocks --set steps.micro_batch_size=16 --set steps.grad_accum=1)
      bench p17-blocks-b16-unfused 150 "${B16[@]}" --set optim.fused=off
      bench p17-blocks-b16-ckpt 180 "${B16[@]}" --set runtime.gradient_checkpointing=true
      bench p17-model-b16 240 "${P17[@]}" "${TUNED[@]}" --set steps.micro_batch_size=16 --set steps.grad_accum=1
      bench p17-blocks-s4096-b8 180 "${P17[@]}" "${TUNED[@]}" --set runtime.compile_scope=blocks \
        --set data.train=.gpu/cpt4096/train --set steps.micro_batch_size=8 --set steps.grad_accum=1
      bench p17-blocks-b16-workers2 150 "${B16[@]}" --set data.num_workers=2
      ;;
    cpt06b)  # the 0.6B shape: micro batch 4 (as on the H100), 8 and 16
      B06=("${P06[@]}" "${TUNED[@]}" --set runtime.compile_scope=blocks)
      bench p06-blocks-b4 150 "${B06[@]}" --set steps.micro_batch_size=4 --set steps.grad_accum=4
      bench p06-blocks-b8 150 "${B06[@]}" --set steps.micro_batch_size=8 --set steps.grad_accum=2
      bench p06-blocks-b16 150 "${B06[@]}" --set steps.micro_batch_size=16 --set steps.grad_accum=1
      ;;
    cpt06)
      bench p06-blocks-b4 150 "${P06[@]}" "${TUNED[@]}" --set runtime.compile_scope=blocks \
        --set steps.micro_batch_size=4 --set steps.grad_accum=4
      ;;
    sft17)
      bench s17-lora-padded-b8-ckpt 120 "${S17[@]}" --set data.train=.gpu/sft_gsm_rows/train \
        --set runtime.gradient_checkpointing=true --set steps.micro_batch_size=8 --set steps.grad_accum=1
      bench s17-lora-packed-flex-blocks 150 "${S17[@]}" "${TUNED[@]}" --set runtime.compile_scope=blocks \
        --set data.train=.gpu/sft_gsm_packed/train --set data.pad_to_multiple_of=4096 \
        --set model.attn_implementation=flex_attention --set steps.micro_batch_size=2 --set steps.grad_accum=1
      bench s17-lora-packed-sdpa-blocks 150 "${S17[@]}" "${TUNED[@]}" --set runtime.compile_scope=blocks \
        --set data.train=.gpu/sft_gsm_packed/train --set data.pad_to_multiple_of=4096 \
        --set steps.micro_batch_size=2 --set steps.grad_accum=1
      ;;
    long32k17)  # seq 32768 on one H200, micro batch 1: chunked loss (no 20 GB of fp32 logits), without
      # and with activation checkpointing; the pre-flight estimate is in each train_summary
      L=("${P17[@]}" "${TUNED[@]}" --set runtime.compile_scope=blocks --set data.train=.gpu/cpt32k/train
         --set steps.micro_batch_size=1 --set steps.grad_accum=1 --set steps.max_steps=8
         --set metrics.steady_skip_steps=3 --set runtime.loss_chunk_tokens=4096 --set runtime.sdpa_backend=cudnn)
      bench l17-s32k-chunk 240 "${L[@]}"
      bench l17-s32k-chunk-ckpt 240 "${L[@]}" --set runtime.gradient_checkpointing=true
      ;;
    qlora17)  # QLoRA (NF4 base, bitsandbytes) vs the bf16-autocast LoRA, same packed GSM8K-train rows,
      # both eager (bitsandbytes' 4-bit layers are not compiled); needs the bitsandbytes wheel in .whl
      # checkpointing off (speed) and on (activations small: the weights' memory shows)
      for ck in false true; do for q in none nf4; do
        bench s17-qlora-$q-ckpt-$ck 200 "${S17[@]}" --set runtime.gradient_checkpointing=$ck \
          --set data.train=.gpu/sft_gsm_packed/train --set data.pad_to_multiple_of=4096 \
          --set steps.micro_batch_size=2 --set steps.grad_accum=1 --set lora.quantize_base=$q
      done; done
      ;;
    sftpeer17)
      peer() {  # peer NAME TIMEOUT [trl_sft_peer.py args]
        local name=$1 t=$2 left=$(( deadline - $(date +%s) - 15 )); shift 2
        (( left < 60 )) && { el "skip $name (budget)"; return; }
        (( t > left )) && t=$left
        el "run $name (timeout ${t}s)"
        TORCHINDUCTOR_CACHE_DIR=/tmp/inductor timeout "$t" python3 scripts/gpu/trl_sft_peer.py --out "$OUT" \
          --name "$name" --preset qwen3-1.7b --tok .gpu/tok --data .gpu/sft_gsm_packed/train --steps 12 --skip 4 \
          "$@" > "$OUT/$name.log" 2>&1 || el "  $name exited $?"
        grep -E "tokens/s|Error|error:" "$OUT/$name.log" | tail -3
      }
      peer trl-sft17-defaults 150 --batch 2
      peer trl-sft17-nockpt 150 --batch 2 --set gradient_checkpointing=false
      peer trl-sft17-nockpt-flex 150 --batch 2 --attn flex_attention --set gradient_checkpointing=false
      bench s17-lora-packed-flex-blocks 150 "${S17[@]}" "${TUNED[@]}" --set runtime.compile_scope=blocks \
        --set data.train=.gpu/sft_gsm_packed/train --set data.pad_to_multiple_of=4096 \
        --set model.attn_implementation=flex_attention --set steps.micro_batch_size=2 --set steps.grad_accum=1
      bench s17-lora-packed-sdpa-blocks 150 "${S17[@]}" "${TUNED[@]}" --set runtime.compile_scope=blocks \
        --set data.train=.gpu/sft_gsm_packed/train --set data.pad_to_multiple_of=4096 \
        --set steps.micro_batch_size=2 --set steps.grad_accum=1
      peer trl-sft17-nockpt-compile 200 --batch 2 --set gradient_checkpointing=false --set torch_compile=true
      ;;
    pack)
      el "packing check"
      timeout $(( deadline - $(date +%s) - 10 )) python3 scripts/check_packing.py --data .gpu/sft_gsm_packed/train \
        --preset qwen3-0.6b --tokenizer .gpu/tok --device cuda --attn sdpa flex_attention --max-samples 12 \
        --out "$OUT/packing_check_gpu.json" 2>&1 | grep -vi warn | tail -4
      ;;
    serve)  # transformers serve without continuous batching, on the model merge of measure_tracks.sh
      if [[ -d runs/gpu-merged ]]; then
        el "serve cb=false"
        python3 scripts/10_serve.py start transformers runs/gpu-merged --name gpu-tf --set transformers.device=cuda:0 \
          --set transformers.continuous_batching=false --set startup_timeout_s=120 2>&1 | tail -1
        timeout $(( deadline - $(date +%s) - 20 )) python3 scripts/11_benchmark_serving.py --no-progress --set server=gpu-tf \
          --set num_prompts=16 --set max_concurrency=4 --set random.input_len=256 --set random.output_len=64 \
          --set slo.ttft=1000 --set slo.tpot=100 --set max_duration_s=100 --run-name gpu-tf-cb-false-small 2>&1 | tail -2
        python3 scripts/10_serve.py stop gpu-tf 2>&1 | tail -1
        tar czf "$OUT/serve_runs.tgz" runs/bench_serving runs/serve 2>/dev/null
      else
        el "skip serve: runs/gpu-merged is not on this machine (scripts/gpu/measure_tracks.sh makes it)"
      fi
      ;;
    *) echo "unknown part $part (cpt17 chunk17 floor17 levers17 base17 levers17b levers17c repeat17 fp8_17 fp8head17 cpt06 cpt06b sft17 sftpeer17 fp8peer17 s8k17 s16k17 s8kfp8_17 s16kfp8_17 longchunk17 cpt06peer floor2 pack serve)" >&2 ;;
  esac
done
save; el "done"
