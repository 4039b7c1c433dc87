#!/usr/bin/env python3
"""Turn an intermediate checkpoint of any backend into a plain Hugging Face model directory.

  python scripts/checkpoint_to_model.py runs/train/cpt/checkpoint-200 model/cpt-step200
  forgelab checkpoint-to-model runs/train/sft-zero2/checkpoint-50 /tmp/sft50 --overwrite

DeepSpeed ZeRO checkpoints (any stage, any number of ranks) give their fp32 master weights,
FSDP sharded checkpoints are merged with torch.distributed.checkpoint, the others are copied
through transformers; a LoRA checkpoint gives its adapter. The checkpoint is verified against
its manifest first; the output gets a manifest and forgelab_source.json (what was converted, how).
docs/training.md, "Which backend resumes which checkpoint".
"""
import argparse

from forgelab import cli
from forgelab.train.ckpt_model import convert


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint-N directory of a training run")
    p.add_argument("out", help="the model directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    a = p.parse_args()
    rec = convert(a.checkpoint, a.out, overwrite=a.overwrite)
    print(f"{a.out}: step {rec['step']}, {rec['how']} (checkpoint manifest: {rec['checkpoint_manifest']})")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
