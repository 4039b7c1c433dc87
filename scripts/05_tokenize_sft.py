#!/usr/bin/env python3
"""Stage 05: tokenize the SFT dataset with the model's own chat template: labels only on
assistant turns (their end token included), a truncation policy, and packing of whole samples
into rows of at most seq_len with position ids restarting at 0 per sample.

Writes data/tokenized/sft/{train,val}/ (input_ids / labels / position_ids / row_offsets .npy
and meta.json), read by forgelab.data.sft_store.SFTDataset.
Config keys: python scripts/config.py keys tokenize_sft.  Format and guarantees: docs/data_sft.md.
"""
from forgelab import cli
from forgelab.data.tokenize_sft import SFTTokenizeError, TemplateError, TokenizeSFTConfig, tokenize_sft
from forgelab.runs import Run


def main() -> int:
    args = cli.parser(__doc__, default_config="configs/data/tokenize_sft.yaml").parse_args()
    conf = cli.load_config(TokenizeSFTConfig, args)
    with Run("tokenize_sft", conf, args.run_name) as run:
        try:
            tokenize_sft(conf, run)
        except (SFTTokenizeError, TemplateError) as e:
            run.log.error("%s", e)
            raise SystemExit(1)
    return 0


if __name__ == "__main__":
    cli.run_main(main)
