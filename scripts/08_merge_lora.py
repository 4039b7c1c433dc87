#!/usr/bin/env python3
"""Stage 08: merge the SFT LoRA adapter into its base model and save a plain model dir
(safetensors, tokenizer + chat template, generation config) for eval and serving.

The merged model's logits are checked against the PEFT model on real prompts (evaluated in
float64, check_dtype); when they differ by more than max_abs_diff (1e-4) nothing is
published and the stage fails.
The difference goes to <output>/merge_check.json and the run summary.

  python scripts/08_merge_lora.py --set adapter=runs/train/sft_lora/final
  python scripts/08_merge_lora.py --verify model/merged-sft     # re-check a published merge
"""
from forgelab import cli
from forgelab.runs import Run
from forgelab.train.merge import MergeCheckError, MergeConfig, merge_lora, verify_merge


def main() -> int:
    p = cli.parser(__doc__, default_config="configs/merge.yaml")
    p.add_argument("--verify", metavar="DIR", help="only re-check a merged dir against its adapter")
    args = p.parse_args()
    conf = cli.load_config(MergeConfig, args)
    with Run("merge", conf, args.run_name) as run:
        try:
            if args.verify:
                s = verify_merge(args.verify, threshold=conf.max_abs_diff, check_dtype=conf.check_dtype)
            else:
                s = merge_lora(conf, run.log)
        except MergeCheckError as e:
            run.summary.update(passed=False, error=str(e))
            run.log.error("%s", e)
            raise SystemExit(1)
        run.summary.update(s)
    return 0


if __name__ == "__main__":
    cli.run_main(main)
