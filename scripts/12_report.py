#!/usr/bin/env python3
"""Stage 12: markdown reports (with PNG plots and a JSON twin) built from training run
directories only (runs/train/<run>/), so any report can be rebuilt later.

  python scripts/12_report.py all                      # every report that has runs
  python scripts/12_report.py benchmark                # reports/cpt_benchmark.md (track bench)
  python scripts/12_report.py optimization --metric mfu_steady
  python scripts/12_report.py resume | profile | comms
  python scripts/12_report.py benchmark --runs cpt-bench-single cpt-bench-ddp   # exactly these runs
  python scripts/12_report.py gpu_performance          # targets answered by the runs named in --spec

Runs whose protocol differs (data fingerprint, sequence length, tokens per step) are put in
separate tables, with the differing key named; --allow-mixed-protocols compares them anyway.
Runs named with --runs form one comparison and are refused when their protocols differ.
"""
import argparse
import shlex
import sys

from forgelab.report.builders import KINDS, METRICS, build, build_all
from forgelab.report.runs import ProtocolError, ReportError


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=[*KINDS, "gpu_performance", "all"], help="which report")
    p.add_argument("--spec", default="configs/report/gpu_performance.yaml",
                   help="gpu_performance: which runs answer which target")
    p.add_argument("--runs-root", default=None, help="where the training run dirs are (default runs/train; "
                                                     "gpu_performance: the spec's runs_root)")
    p.add_argument("--runs", nargs="+", metavar="RUN", help="exactly these run dirs (names under --runs-root or paths)")
    p.add_argument("--track", action="append", help="runs of this track (repeatable; default per report: "
                                                    "bench, optimize, resume, profile)")
    p.add_argument("--task", help="only runs of this task (cpt, pretrain, sft)")
    p.add_argument("--out", default="reports", help="output dir (plots go to <out>/img)")
    p.add_argument("--prefix", default="cpt", help="report file prefix: <out>/<prefix>_<kind>.md")
    p.add_argument("--metric", default="tokens_per_s_steady", choices=list(METRICS),
                   help="optimization: what 'best' means")
    p.add_argument("--allow-mixed-protocols", action="store_true",
                   help="compare runs whose data fingerprint, sequence length or tokens per step differ")
    a = p.parse_args()
    command = "python scripts/12_report.py " + shlex.join(sys.argv[1:])
    try:
        if a.kind == "gpu_performance":
            from forgelab.report.gpu_performance import build_gpu_performance
            md, js = build_gpu_performance(a.spec, a.runs_root, a.out, command)
            print(f"{md}\n{js}")
            return 0
        a.runs_root = a.runs_root or "runs/train"
        if a.kind == "all":
            res = build_all(a.runs_root, a.out, a.prefix, a.allow_mixed_protocols, a.task, command=command,
                            log=lambda m: print(m, file=sys.stderr))
            for kind, path in res["written"].items():
                print(f"{kind}: {path}")
            if not res["written"]:
                print("no report written: no run has the files any report reads (see the reasons above)",
                      file=sys.stderr)
            return 0
        md, js = build(a.kind, a.runs_root, a.runs, a.out, a.prefix, a.allow_mixed_protocols, a.task,
                       tuple(a.track) if a.track else None, a.metric, command)
    except ProtocolError as e:
        print(f"report refused: {e}", file=sys.stderr)
        return 2
    except ReportError as e:
        print(f"report error: {e}", file=sys.stderr)
        return 1
    print(f"{md}\n{js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
