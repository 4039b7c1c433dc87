#!/usr/bin/env bash
# resume track: uninterrupted vs stopped-and-resumed runs -> resume_validation.json
# usage: scripts/train/resume.sh [single|ddp|fsdp|zero1|zero2|zero3|zero3_offload] [--task cpt|pretrain|sft_lora|sft_full] [--set key=value ...]
exec bash "$(dirname "$0")/_launch.sh" resume "$@"
