#!/usr/bin/env python3
"""Stage 03b: build the preference dataset: pair records, LLaMA-Factory ranking datasets
(alpaca or sharegpt) and KTO-labelled records (jsonl, json array or parquet) -> TRL's
conversational schemas in data/cleaned/pref/{pairs,kto}_{train,val}.jsonl.

Malformed records and identical chosen/rejected answers are dropped and counted by reason
with their first file:line; every record must pass the chat-template prefix check
(prompt + answer starts with the prompt's generation-prompt ids). --set strict=true stops
at the first malformed record. Config keys: python scripts/config.py keys pref_data.
Formats: docs/data_pref.md.
"""
from forgelab import cli
from forgelab.data.pref_dataset import PrefDataConfig, PrefDataError, build_pref_dataset
from forgelab.runs import Run


def main() -> int:
    args = cli.parser(__doc__, default_config="configs/data/pref.yaml").parse_args()
    conf = cli.load_config(PrefDataConfig, args)
    with Run("pref_data", conf, args.run_name) as run:
        try:
            build_pref_dataset(conf, run)
        except PrefDataError as e:
            run.log.error("%s", e)
            raise SystemExit(1)
    return 0


if __name__ == "__main__":
    cli.run_main(main)
