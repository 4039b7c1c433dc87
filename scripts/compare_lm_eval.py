#!/usr/bin/env python3
"""Reference check of the MMLU and math tasks against lm-evaluation-harness: the same model and
the same questions through both, accuracies within 1 point expected (MMLU: per-question
predictions, log-likelihoods and prompt strings compared too; math: predictions, generated texts
and prompt strings). Writes reports/lm_eval_check.md + .json.

lm-eval runs from its own venv (.venv-lmeval, created by scripts/setup_lmeval_venv.sh with
the main venv's torch and transformers pins) and reads the local questions as custom tasks, so
nothing is downloaded. The parts run are the config's tasks (mmlu, math); a part not run this
time is carried over from the existing report's JSON twin, with the date and command that
produced it.

  python scripts/compare_lm_eval.py                       # configs/eval/lm_eval_check.yaml: both parts
  python scripts/compare_lm_eval.py --config configs/eval/lm_eval_check_math.yaml   # math only
  python scripts/compare_lm_eval.py --set mmlu.per_subject_limit=20 --few-shot-limit 5
"""
import os
import shlex
import subprocess
import sys

from forgelab import cli
from forgelab.eval.config import EvalConfig
from forgelab.runs import PROJECT_ROOT, Run, project_path, read_json

PARTS = ("mmlu", "math")


def main() -> int:
    p = cli.parser(__doc__, default_config="configs/eval/lm_eval_check.yaml")
    p.add_argument("--few-shot-limit", type=int, default=15,
                   help="questions per subject for the settings with shots > 0 (the first ones of "
                        "the 0-shot subset; lm-eval re-encodes every few-shot prompt in full)")
    p.add_argument("--lm-eval-venv", default=".venv-lmeval", help="venv with lm-eval (created if missing)")
    p.add_argument("--lm-eval-batch-size", type=int, default=8, help="lm-eval --batch_size")
    p.add_argument("--report", default="reports/lm_eval_check.md", help="markdown report (+ .json twin)")
    args = p.parse_args()
    conf = cli.load_config(EvalConfig, args)
    parts = [t for t in PARTS if t in conf.tasks]
    if not parts:
        raise SystemExit(f"config error: tasks {conf.tasks} has none of {list(PARTS)}, the parts of the check")
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))

    from forgelab.eval.lm_eval_check import run_check, run_math_check, write_report

    venv = project_path(args.lm_eval_venv)
    subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / "setup_lmeval_venv.sh")], check=True,
                   env=dict(os.environ, LMEVAL_VENV=str(venv)))
    command = f"OMP_NUM_THREADS={threads} " + shlex.join(["python", "scripts/compare_lm_eval.py"] + sys.argv[1:])
    md_path = project_path(args.report)
    previous = read_json(md_path.with_suffix(".json")) if md_path.with_suffix(".json").exists() else {}
    with Run("lm_eval_check", conf, args.run_name) as run:
        # the MMLU part lives at the top level of the report (its original layout), math under "math"
        report = {k: v for k, v in previous.items() if k != "math"}
        if "mmlu" in parts:
            report = run_check(conf, run, venv, args.few_shot_limit, args.lm_eval_batch_size, threads, command)
        report["math"] = (run_math_check(conf, run, venv, args.lm_eval_batch_size, threads, command)
                          if "math" in parts else previous.get("math"))
        write_report(report, md_path)
        diffs = [d for c in report.get("checks", []) for d in (c["diff_macro_points"], c["diff_micro_points"])]
        diffs += [d["diff_points"] for d in (report["math"] or {}).get("datasets", [])]
        ok = all(abs(d) <= 1 for d in diffs)
        run.summary.update(report=args.report, parts_run=parts, within_1_point=ok,
                           checks=[{k: v for k, v in c.items() if k != "subjects"} for c in report.get("checks", [])],
                           math=[{k: v for k, v in d.items() if k not in ("rows", "example_prompt")}
                                 for d in (report["math"] or {}).get("datasets", [])])
        run.log.info("wrote %s (ran %s): %s", args.report, ", ".join(parts),
                     "within 1 point" if ok else "DIFFERENCE ABOVE 1 POINT")
    return 0 if ok else 1


if __name__ == "__main__":
    cli.run_main(main)
