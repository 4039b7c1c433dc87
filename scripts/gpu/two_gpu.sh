#!/usr/bin/env bash
# Two-GPU batch (one host, 2 GPUs, NVLink multicast off): the bench track for the native family
# (single vs ddp) and the DeepSpeed family (zero2 vs zero3_offload) on the Qwen3-1.7B shape, the
# resume track with two ranks, and the profile track's communication report for ddp and zero2.
# Inputs as in scripts/gpu/README.md (.gpu/tok, .gpu/cpt2048, .whl with deepspeed and its needs).
# Results: $OUT/two_gpu_runs.tgz; then, here:
#   python scripts/12_report.py benchmark --runs g2-single g2-ddp g2-zero2 g2-zero3_offload --prefix cpt_2gpu
#   python scripts/12_report.py resume --runs g2-resume-ddp-resumed --prefix cpt_2gpu
#   python scripts/12_report.py comms --runs g2-profile-ddp g2-profile-zero2 --prefix cpt_2gpu
# usage: OUT=dir BUDGET_S=560 bash scripts/gpu/two_gpu.sh
set -uo pipefail
source "$(dirname "$0")/_env.sh"
# multicast can take the host's shared GPUs down: keep it off in every process we start
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
deadline=$(( t0 + ${BUDGET_S:-560} ))
names=()
save() {
  tar czf "$OUT/two_gpu_runs.tgz" --exclude='checkpoint-*' --exclude='final' --exclude='*.safetensors' \
    --exclude='*.pt.trace.json*' runs/train/g2-* 2>/dev/null
}
# launch TRACK BACKEND NAME TIMEOUT [args...]: one plan (a run, or the resume track's three)
launch() {
  local track=$1 backend=$2 name=$3 t=$4; shift 4
  local left=$(( deadline - $(date +%s) - 15 ))
  (( left < 45 )) && { el "skip $name (budget)"; return; }
  (( t > left )) && t=$left
  el "$track $backend -> $name (timeout ${t}s)"
  timeout "$t" bash "scripts/train/$track.sh" "$backend" "$@" --run-name "$name" > "runs/$name.log" 2>&1 \
    || el "  $name exited $?"
  grep -E "done:|resume validation|Error|error:" "runs/$name.log" | tail -3
  save
}
python3 -c 'import torch; n = torch.cuda.device_count(); print(f"{n} GPUs"); raise SystemExit(n < 2)' \
  || { echo "needs 2 GPUs" >&2; exit 2; }

P17=(--task pretrain --set model.preset=qwen3-1.7b --set model.tokenizer=.gpu/tok --set data.train=.gpu/cpt2048/train
     --set steps.max_steps=12 --set optim.warmup_steps=2 --set metrics.steady_skip_steps=4
     --set steps.micro_batch_size=4 --set steps.grad_accum=4)
FAST=(--set runtime.torch_compile=true --set runtime.compile_scope=blocks --set runtime.gradient_checkpointing=false)
P06=(--task pretrain --set model.preset=qwen3-0.6b --set model.tokenizer=.gpu/tok --set data.train=.gpu/cpt2048/train)

NPROC=1 launch bench single g2-single 150 "${P17[@]}" "${FAST[@]}"
launch bench ddp g2-ddp 150 "${P17[@]}" "${FAST[@]}"
launch bench zero2 g2-zero2 150 "${P17[@]}" --set runtime.gradient_checkpointing=true
launch bench zero3_offload g2-zero3_offload 200 "${P17[@]}" --set runtime.gradient_checkpointing=true \
  --set steps.max_steps=8 --set metrics.steady_skip_steps=3
launch resume ddp g2-resume-ddp 150 "${P06[@]}" --set steps.micro_batch_size=4
launch profile ddp g2-profile-ddp 120 "${P06[@]}" --set steps.micro_batch_size=4
launch profile zero2 g2-profile-zero2 120 "${P06[@]}" --set steps.micro_batch_size=4
save; el done
