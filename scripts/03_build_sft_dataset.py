#!/usr/bin/env python3
"""Stage 03: build the SFT dataset: alpaca / sharegpt / OpenAI-messages sources (jsonl, json
array or parquet) -> one messages schema in data/cleaned/sft/{train,val}.jsonl.

Bad records are reported with file:line and reason, counted in the run summary and listed
in runs/sft_data/<run>/bad_records.jsonl; --set strict=true stops at the first one.
Config keys: python scripts/config.py keys sft_data.  Formats and role mapping: docs/data_sft.md.
"""
from forgelab import cli
from forgelab.data.sft_dataset import SFTDataConfig, SFTDataError, build_sft_dataset
from forgelab.runs import Run


def main() -> int:
    args = cli.parser(__doc__, default_config="configs/data/sft.yaml").parse_args()
    conf = cli.load_config(SFTDataConfig, args)
    with Run("sft_data", conf, args.run_name) as run:
        try:
            build_sft_dataset(conf, run)
        except SFTDataError as e:
            run.log.error("%s", e)
            raise SystemExit(1)
    return 0


if __name__ == "__main__":
    cli.run_main(main)
