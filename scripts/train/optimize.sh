#!/usr/bin/env bash
# optimize track: a sweep (loader workers x gradient checkpointing x compile), one run each
# usage: scripts/train/optimize.sh [single|ddp|fsdp|zero1|zero2|zero3|zero3_offload] [--task cpt|pretrain|sft_lora|sft_full] [--set key=value ...]
exec bash "$(dirname "$0")/_launch.sh" optimize "$@"
