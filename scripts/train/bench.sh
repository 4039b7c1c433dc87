#!/usr/bin/env bash
# bench track: steady-state tokens/s, MFU and memory under a fixed protocol
# usage: scripts/train/bench.sh [single|ddp|fsdp|zero1|zero2|zero3|zero3_offload] [--task cpt|pretrain|sft_lora|sft_full] [--set key=value ...]
exec bash "$(dirname "$0")/_launch.sh" bench "$@"
