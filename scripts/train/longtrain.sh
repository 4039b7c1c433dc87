#!/usr/bin/env bash
# longtrain track: a long run that checkpoints and continues where it stopped when launched again
# usage: scripts/train/longtrain.sh [single|ddp|fsdp|zero1|zero2|zero3|zero3_offload] [--task cpt|pretrain|sft_lora|sft_full] [--set key=value ...]
exec bash "$(dirname "$0")/_launch.sh" longtrain "$@"
