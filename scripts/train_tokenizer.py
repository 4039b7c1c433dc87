#!/usr/bin/env python3
"""Train a byte-level BPE tokenizer (vocab size, special tokens, ChatML chat template) on the
CPT corpus and save it as a transformers tokenizer directory, for pretraining from scratch.

  python scripts/train_tokenizer.py                                   # configs/tokenizer/default.yaml
  python scripts/train_tokenizer.py --set vocab_size=8192 --set output=model/tok8k

The run record (runs/tokenizer/<run>/summary.json) holds the tokenizer fingerprint, the
sources used (and whether the fallback was), and the round-trip check.
"""
from forgelab import cli
from forgelab.model.tokenizer_train import TokenizerTrainConfig, train_tokenizer
from forgelab.runs import Run


def main() -> int:
    args = cli.parser(__doc__, default_config="configs/tokenizer/default.yaml").parse_args()
    conf = cli.load_config(TokenizerTrainConfig, args)
    with Run("tokenizer", conf, args.run_name) as run:
        s = train_tokenizer(conf, run.log)
        run.summary.update(s)
        run.tokenizer_fingerprint = s["tokenizer_fingerprint"]
        run.data_fingerprint = s.get("data_fingerprint")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
