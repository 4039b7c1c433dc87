#!/usr/bin/env python3
"""Stage 09: evaluate one or more models side by side -> runs/eval/<run>/ (summary.json,
predictions/<model>.<task>.jsonl) and the report (reports/eval.md + eval.json).

Tasks (configs/eval/default.yaml; overlays add or pick them): held-out perplexity with sliding
windows, math word problems (0-shot through the chat template as the SFT data asks them, exact
match of the final number; few-shot chain of thought: math_cot.yaml), MMLU-style multiple choice
(letter log-likelihood); choice.yaml: PIQA/SIQA/CommonsenseQA/OpenBookQA/BoolQ; code.yaml:
HumanEval pass@1 in a sandbox; lm-eval tasks (task lm_eval). Generation runs in-process or
through a vLLM / transformers server started per model (served.yaml). With several models the
report compares them pairwise on the same items (paired bootstrap CI, McNemar's test).

  python scripts/09_eval.py                                       # the base model, CPU limits
  python scripts/09_eval.py --config configs/eval/default.yaml --config configs/eval/compare.yaml
  python scripts/09_eval.py --set 'models=[{name: base, path: model/smollm2-135m-instruct}]'
  python scripts/09_eval.py --report-from runs/eval/a runs/eval/b  # rebuild the report only
Every key: python scripts/config.py keys eval
"""
import sys

from forgelab import cli
from forgelab.eval.config import EvalConfig
from forgelab.runs import Run, project_path, read_json


def main() -> int:
    p = cli.parser(__doc__, default_config="configs/eval/default.yaml")
    p.add_argument("--report-from", nargs="+", metavar="RUN_DIR",
                   help="rebuild the report from these eval run directories; evaluates nothing")
    p.add_argument("--allow-protocol-mismatch", action="store_true",
                   help="with --report-from: merge runs whose data/prompts/limits differ")
    p.add_argument("--report", default=None, help="report path (default: the config's 'report')")
    args = p.parse_args()
    conf = cli.load_config(EvalConfig, args)
    cli.interrupt_on_sigterm()  # a killed eval still stops the servers it started
    from forgelab.eval.data import EvalDataError
    try:
        return evaluate(conf, args)
    except (FileNotFoundError, EvalDataError, ValueError) as e:  # bad paths/data: one clear line
        print(f"error: {e}", file=sys.stderr)
        return 2


def evaluate(conf: EvalConfig, args) -> int:
    from forgelab.eval import report

    if args.report_from:
        runs = [(str(project_path(d) / "summary.json"), read_json(project_path(d) / "summary.json"))
                for d in args.report_from]
        view = report.merge(runs, args.allow_protocol_mismatch)
        md, js = report.write(view, project_path(args.report or conf.report or "reports/eval.md"))
        print(f"wrote {md} and {js}")
        return 0

    from forgelab.eval.runner import run_eval
    with Run("eval", conf, args.run_name) as run:
        run_eval(conf, run, cli.command_line())
        run.write_summary()  # the report reads the finished summary
        out = args.report or conf.report
        if out:
            view = report.merge([(str(run.summary_path), read_json(run.summary_path))])
            md, js = report.write(view, project_path(out))
            run.summary["report"] = [str(md), str(js)]
            run.log.info("report: %s", md)
    return 0


if __name__ == "__main__":
    cli.run_main(main)
