#!/usr/bin/env bash
# profile track: torch.profiler traces, time split per step and collectives -> profile_summary.json
# usage: scripts/train/profile.sh [single|ddp|fsdp|zero1|zero2|zero3|zero3_offload] [--task cpt|pretrain|sft_lora|sft_full] [--set key=value ...]
exec bash "$(dirname "$0")/_launch.sh" profile "$@"
