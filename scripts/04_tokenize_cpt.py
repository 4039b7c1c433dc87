#!/usr/bin/env python3
"""Stage 04 (CPT): tokenize the CPT corpus, EOS after every document, pack into fixed-length
blocks: <out_dir>/<split>/blocks.npy (int32 [n_blocks, seq_len], np.load(mmap_mode="r"))
and meta.json. Read them with forgelab.data.cpt_dataset.CPTBlockDataset.

For a GPU run: --set seq_len=2048. Every key: python scripts/config.py keys tokenize_cpt
"""
from forgelab import cli
from forgelab.data.tokenize_cpt import TokenizeCPTConfig, TokenizeError, run_tokenize
from forgelab.runs import Run


def main() -> int:
    args = cli.parser(__doc__, default_config="configs/data/tokenize_cpt.yaml").parse_args()
    conf = cli.load_config(TokenizeCPTConfig, args)
    with Run("tokenize_cpt", conf, args.run_name) as run:
        try:
            metas = run_tokenize(conf, run.log)
        except TokenizeError as e:  # bad input: one clear line, exit 1, the run recorded as failed
            raise SystemExit(f"error: {e}") from None
        run.summary["splits"] = metas
        first = next(iter(metas.values()))
        run.data_fingerprint = first["data_fingerprint"]
        run.tokenizer_fingerprint = first["tokenizer_fingerprint"]
    return 0


if __name__ == "__main__":
    cli.run_main(main)
