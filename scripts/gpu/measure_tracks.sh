#!/usr/bin/env bash
# GPU measurement batch (one H100/H200): sanity and bench tracks for single, zero2 and
# zero3_offload (world size 1) on a Qwen3-0.6B-shaped model, then an SFT LoRA on top of the
# sanity model, the LoRA merge, and the serving benchmark of the merged model behind
# `transformers serve` with continuous batching off and on.
#
# Inputs (paths relative to the repo root; build them on a CPU machine first):
#   .gpu/tok      tokenizer files of model/smollm2-135m-instruct
#   .gpu/cpt2048  `04_tokenize_cpt.py --set tokenizer=.gpu/tok --set out_dir=.gpu/cpt2048 --set seq_len=2048`
#   .gpu/sft      data/tokenized/sft (stage 05 with the same tokenizer)
#   .whl          optional wheels (deepspeed, liger-kernel, serving stack) installed into /tmp/site
# Results: OUT (default runs/gpu_out) gets one tarball of the run records and a log.
set -uo pipefail
source "$(dirname "$0")/_env.sh"
MODEL=(--task pretrain --set model.preset=qwen3-0.6b --set model.tokenizer=.gpu/tok --set data.train=.gpu/cpt2048/train)
save() { tar czf "$OUT/runs.tgz" --exclude='checkpoint-*' --exclude='checkpoints' --exclude='final' --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt.trace.json*' runs logs reports 2>/dev/null; }

for b in single zero2 zero3_offload; do
  el "sanity $b"; timeout 240 bash scripts/train/sanity.sh $b "${MODEL[@]}" --set run_name=gpu-sanity-$b 2>&1 | grep -E "INFO|Error|error" | tail -4; save
done
for b in single zero2 zero3_offload; do
  el "bench $b"; timeout 240 bash scripts/train/bench.sh $b "${MODEL[@]}" --set run_name=gpu-bench-$b --set steps.max_steps=15 2>&1 | grep -E "done:|Error|error" | tail -3; save
done

el "sft lora on the sanity model"
timeout 180 bash scripts/train/sanity.sh single --task sft_lora --set model.path=runs/train/gpu-sanity-single/final \
  --set data.train=.gpu/sft/train --set run_name=gpu-sft-lora --set steps.max_steps=6 2>&1 | grep -E "done:|Error|error" | tail -3
el "merge"; timeout 240 python3 scripts/08_merge_lora.py --set adapter=runs/train/gpu-sft-lora/final --set output=runs/gpu-merged 2>&1 | tail -3
save
for cb in false true; do
  el "serve cb=$cb"
  python3 scripts/10_serve.py start transformers runs/gpu-merged --name gpu-tf --set transformers.device=cuda:0 \
    --set transformers.continuous_batching=$cb --set startup_timeout_s=180 2>&1 | tail -2
  timeout 150 python3 scripts/11_benchmark_serving.py --no-progress --set server=gpu-tf --set num_prompts=64 \
    --set max_concurrency=16 --set random.input_len=256 --set random.output_len=64 --set slo.ttft=1000 --set slo.tpot=100 --set max_duration_s=100 \
    --run-name gpu-tf-cb-$cb 2>&1 | tail -3
  python3 scripts/10_serve.py stop gpu-tf 2>&1 | tail -1
  save
done
el "reports"; python3 scripts/12_report.py benchmark 2>&1 | tail -3
save; el done
