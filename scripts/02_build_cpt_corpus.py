#!/usr/bin/env python3
"""Stage 02: build the CPT corpus: read sources, normalize, filter, dedup (exact + MinHash
near-duplicates), mix by ratio with a seeded sample, split off a held-out set.

Writes <out_dir>/train.jsonl and <out_dir>/heldout.jsonl (lines {"id","source","lang","text"});
the run summary counts kept and dropped documents per source and reason, and the mix achieved.
Every key: python scripts/config.py keys corpus
"""
from forgelab import cli
from forgelab.data.corpus import CorpusConfig, CorpusError, build_corpus, format_summary
from forgelab.runs import Run


def main() -> int:
    args = cli.parser(__doc__, default_config="configs/data/corpus.yaml").parse_args()
    conf = cli.load_config(CorpusConfig, args)
    with Run("cpt_corpus", conf, args.run_name) as run:
        try:
            s = build_corpus(conf, run.log)
        except CorpusError as e:  # bad input: one clear line, exit 1, the run recorded as failed
            raise SystemExit(f"error: {e}") from None
        run.summary.update(s)
        run.data_fingerprint = s["output_fingerprint"]
        run.log.info("\n%s", format_summary(s))
    return 0


if __name__ == "__main__":
    cli.run_main(main)
