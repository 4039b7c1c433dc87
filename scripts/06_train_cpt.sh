#!/usr/bin/env bash
# Stage 06: continued pretraining of the embedded default (SmolLM2-135M-Instruct) on the
# stage-04 blocks -> runs/train/cpt/ (final/ holds the model).
# usage: scripts/06_train_cpt.sh [single|ddp|fsdp|zero2|zero3_offload] [--set key=value ...]
backend=single
if [[ $# -gt 0 && $1 != -* ]]; then backend=$1; shift; fi
exec bash "$(dirname "$0")/train/_launch.sh" "" "$backend" --task cpt --run-name cpt "$@"
