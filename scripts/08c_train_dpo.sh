#!/usr/bin/env bash
# Stage 08c: DPO of the merged SFT model with LoRA adapters on stage 08b's on-policy pairs
# (configs/train/dpo.yaml) -> runs/train/dpo/ (final/ holds the adapter; merge it with
# python scripts/08_merge_lora.py --config configs/merge_dpo.yaml -> model/merged-dpo).
# Other methods: --task orpo|simpo|kto|grpo (docs/alignment.md).
# usage: scripts/08c_train_dpo.sh [single|ddp|fsdp|zero2|zero3_offload] [--task ...] [--set key=value ...]
backend=single
if [[ $# -gt 0 && $1 != -* ]]; then backend=$1; shift; fi
exec bash "$(dirname "$0")/train/_launch.sh" "" "$backend" --task dpo --run-name dpo "$@"
