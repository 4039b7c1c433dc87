#!/usr/bin/env bash
# sanity track: a few steps, one checkpoint, the final model: does it run end to end?
# usage: scripts/train/sanity.sh [single|ddp|fsdp|zero1|zero2|zero3|zero3_offload] [--task cpt|pretrain|sft_lora|sft_full] [--set key=value ...]
exec bash "$(dirname "$0")/_launch.sh" sanity "$@"
