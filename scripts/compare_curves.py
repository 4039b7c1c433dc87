#!/usr/bin/env python3
"""Compare the loss curves of two trees of training runs, run by run and step by step (loss,
grad norm, learning rate), e.g. before and after a code change:

  python scripts/compare_curves.py runs_before/train runs_after/train            # bit-identical?
  python scripts/compare_curves.py A/train B/train --tolerance 1e-3 --json out.json

Runs are paired by directory name. Exit code 0 when every paired run agrees within the
tolerance (default 0: identical), 1 otherwise.
"""
import argparse
import sys

from forgelab.report.curves import compare_curves
from forgelab.runs import write_json


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="first runs root (holds <run>/metrics.jsonl)")
    p.add_argument("b", help="second runs root")
    p.add_argument("--tolerance", type=float, default=0.0, help="max allowed |difference| (default 0)")
    p.add_argument("--json", metavar="PATH", help="also write the comparison as JSON")
    args = p.parse_args()
    rep = compare_curves(args.a, args.b, args.tolerance)
    for r in rep["runs"]:
        d = r["max_abs_diff"]
        verdict = "identical" if r["identical"] else ("within tolerance" if r["passed"] else "DIFFERS")
        print(f"{r['run']:32s} {r['steps']:4d} steps  max|d| loss {d['loss']:.3g} grad_norm {d['grad_norm']:.3g} "
              f"lr {d['lr']:.3g}  {verdict}" + (f"  missing steps {r['missing_steps']}" if r["missing_steps"] else ""))
    for side in ("a", "b"):
        if rep[f"only_in_{side}"]:
            print(f"only in {rep[side]}: {', '.join(rep[f'only_in_{side}'])}")
    print(f"{len(rep['runs'])} runs compared: {'passed' if rep['passed'] else 'FAILED'}")
    if args.json:
        write_json(args.json, rep)
    return 0 if rep["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
