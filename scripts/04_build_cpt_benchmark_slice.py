#!/usr/bin/env python3
"""Stage 04: a fixed CPT benchmark slice: n_blocks chosen by seed from the packed train blocks,
written in the same format (blocks.npy + meta.json) with bench_summary.json (fingerprints,
seed, sizes) and bench_indices.json (the block indices used).

Every key: python scripts/config.py keys bench_slice
"""
from forgelab import cli
from forgelab.data.bench_slice import BenchSliceConfig, SliceError, build_slice
from forgelab.runs import Run


def main() -> int:
    args = cli.parser(__doc__, default_config="configs/data/bench_slice.yaml").parse_args()
    conf = cli.load_config(BenchSliceConfig, args)
    with Run("cpt_bench_slice", conf, args.run_name) as run:
        try:
            s = build_slice(conf, run.log)
        except SliceError as e:  # bad input: one clear line, exit 1, the run recorded as failed
            raise SystemExit(f"error: {e}") from None
        run.summary.update(s)
        run.data_fingerprint = s["data_fingerprint"]
        run.tokenizer_fingerprint = s["tokenizer_fingerprint"]
    return 0


if __name__ == "__main__":
    cli.run_main(main)
