#!/usr/bin/env python3
"""Train: continued pretraining (cpt), pretraining from scratch (pretrain) or SFT (LoRA or
full), on any backend (single, ddp, fsdp, zero2, zero3_offload) and track.

  python scripts/train.py --config configs/train/cpt.yaml --set steps.max_steps=10
  python scripts/train.py --config configs/train/sft_lora.yaml
      --config configs/train/tracks/sanity.yaml --config configs/train/backends/ddp.yaml
  python scripts/train.py ... --dry-run      # validate config + data, print the plan

The launchers scripts/train/<track>.sh BACKEND compose these overlays for you. Every key:
python scripts/config.py keys train. Guide: docs/training.md.
"""
from forgelab import cli
from forgelab.train.entry import main

if __name__ == "__main__":
    cli.run_main(main)
