#!/usr/bin/env python3
"""Reference check of the MMLU task against lm-evaluation-harness: the same model and the same
questions through both, accuracies within 1 point expected (per-question predictions,
log-likelihoods and prompt strings are compared too). Writes reports/lm_eval_check.md + .json.

lm-eval runs from its own venv (.venv-lmeval, created by scripts/setup_lmeval_venv.sh with
the main venv's torch and transformers pins) and reads the local MMLU questions as custom
tasks, so nothing is downloaded.

  python scripts/compare_lm_eval.py                       # configs/eval/lm_eval_check.yaml
  python scripts/compare_lm_eval.py --set mmlu.per_subject_limit=20 --few-shot-limit 5
"""
import os
import shlex
import subprocess
import sys

from forgelab import cli
from forgelab.eval.config import EvalConfig
from forgelab.runs import PROJECT_ROOT, Run, project_path


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
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))

    from forgelab.eval.lm_eval_check import run_check, write_report

    venv = project_path(args.lm_eval_venv)
    subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / "setup_lmeval_venv.sh")], check=True,
                   env=dict(os.environ, LMEVAL_VENV=str(venv)))
    command = f"OMP_NUM_THREADS={threads} " + shlex.join(["python", "scripts/compare_lm_eval.py"] + sys.argv[1:])
    with Run("lm_eval_check", conf, args.run_name) as run:
        report = run_check(conf, run, venv, args.few_shot_limit, args.lm_eval_batch_size, threads, command)
        write_report(report, project_path(args.report))
        ok = all(abs(c["diff_macro_points"]) <= 1 and abs(c["diff_micro_points"]) <= 1 for c in report["checks"])
        run.summary.update(report=args.report, within_1_point=ok,
                           checks=[{k: v for k, v in c.items() if k != "subjects"} for c in report["checks"]])
        run.log.info("wrote %s: %s", args.report, "within 1 point" if ok else "DIFFERENCE ABOVE 1 POINT")
    return 0 if ok else 1


if __name__ == "__main__":
    cli.run_main(main)
