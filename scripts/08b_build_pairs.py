#!/usr/bin/env python3
"""Stage 08b: on-policy preference pairs from the SFT model's own samples -> data/cleaned/pref_onpolicy/
(samples.jsonl, pairs.jsonl, kto.jsonl) and runs/pairs/<run>/summary.json.

The model samples k answers to each SFT training math problem (asked as the eval and the SFT
data ask it: the problem alone through the chat template); each answer's final number is
checked against the gold one; correct vs wrong answers of a problem become chosen/rejected
pairs (docs/alignment.md). Kill it and run it again: problems already sampled are kept.

  python scripts/08b_build_pairs.py                                   # 64 problems x 4 samples, CPU
  python scripts/08b_build_pairs.py --set generation.backend=vllm --set limit=0

Keys (python scripts/config.py keys pairs): model, problems, format, train_path, limit, k,
temperature, top_p, seed, max_new_tokens, max_pairs_per_prompt, gold_as_chosen, request_seeds, chunk_size,
out_dir, runtime.*, generation.* (backend inprocess|vllm|transformers, serve_config,
serve_overrides, server_threads, concurrency, timeout_s).
"""
from forgelab import cli
from forgelab.align.pairs import PairsConfig, PairsError, build_pairs
from forgelab.runs import Run


def main() -> int:
    p = cli.parser(__doc__, default_config="configs/align/pairs.yaml")
    args = p.parse_args()
    conf = cli.load_config(PairsConfig, args)
    cli.interrupt_on_sigterm()
    with Run("pairs", conf, args.run_name) as run:
        run.summary["command"] = cli.command_line()
        try:
            s = build_pairs(conf, run.log)
        except PairsError as e:
            run.summary.update(error=str(e))
            run.log.error("%s", e)
            raise SystemExit(2)
        run.summary.update(s)
        run.log.info("%d problems, %d samples (%.1f%% correct), %d pairs, kto %d good / %d bad -> %s in %.0f s",
                     s["problems"], s["samples"], 100 * s["correct_share"], s["pairs"], s["kto_good"],
                     s["kto_bad"], s["out_dir"], s["seconds"])
    return 0


if __name__ == "__main__":
    cli.run_main(main)
