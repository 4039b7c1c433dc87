#!/usr/bin/env bash
# Stage 07: SFT with LoRA of the embedded default on the stage-05 store -> runs/train/sft_lora/
# (final/ holds the adapter; scripts/08_merge_lora.py merges it). Full SFT: --task sft_full
# --run-name sft_full.
# usage: scripts/07_train_sft.sh [single|ddp|fsdp|zero2|zero3_offload] [--task sft_full] [--set key=value ...]
backend=single
if [[ $# -gt 0 && $1 != -* ]]; then backend=$1; shift; fi
exec bash "$(dirname "$0")/train/_launch.sh" "" "$backend" --task sft_lora --run-name sft_lora "$@"
