#!/usr/bin/env python3
"""Stage 11: benchmark a running OpenAI-compatible server (vLLM, transformers serve, any other).

  scripts/11_benchmark_serving.py                                   # configs/bench/default.yaml
  scripts/11_benchmark_serving.py --config configs/bench/cpu_smoke.yaml --set num_prompts=20
  scripts/11_benchmark_serving.py --set server=vllm --set request_rate=4 --set slo.ttft=500

Streams chat completions under a workload (random tokens or conversations), arrival process
(Poisson / gamma, or all at once) and concurrency limit; reports TTFT, TPOT, ITL, end-to-end
latency, throughput and goodput under SLOs, with failures counted by kind. Writes
runs/bench_serving/<run>/ (report.md, report.json, requests.jsonl, plots) and, with
`report: reports/serving_benchmark`, the committed report. Metric definitions: docs/serving.md.

  scripts/11_benchmark_serving.py --compare runs/bench_serving/A runs/bench_serving/B \
      --out reports/serving_benchmark_backends      # one table; refuses different workloads
"""
import sys

from forgelab import cli
from forgelab.runs import project_path
from forgelab.serve.bench import BenchError
from forgelab.serve.bench_config import BenchServingConfig
from forgelab.serve.bench_report import compare, run_and_report


def main() -> int:
    p = cli.parser(__doc__, default_config="configs/bench/default.yaml")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--goodput", nargs="+", metavar="METRIC:MS", default=[],
                   help="SLOs for goodput, e.g. --goodput ttft:500 tpot:50 (same as --set slo.ttft=500)")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR",
                   help="instead of running: one table over finished runs (same workload only)")
    p.add_argument("--out", default="reports/serving_benchmark_backends",
                   help="path stem of the --compare report (.md and .json)")
    p.add_argument("--force", action="store_true", help="--compare runs whose workloads differ")
    args = p.parse_args()
    if args.compare:
        try:
            print(compare([project_path(d) for d in args.compare], args.out, args.force))
        except BenchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    for item in args.goodput:
        metric, sep, ms = item.partition(":")
        if not sep:
            p.error(f"--goodput {item!r}: expected METRIC:MS, e.g. ttft:500")
        args.overrides.append(f"slo.{metric}={ms}")
    conf = cli.load_config(BenchServingConfig, args)
    try:
        report = run_and_report(conf, args.run_name, progress=not args.no_progress)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if report["summary"]["completed"] else 1


if __name__ == "__main__":
    cli.run_main(main)
