#!/usr/bin/env python
"""Mutation testing of the modules behind the lab's guarantees: checkpoint selection and
publish, packing and position ids, config validation, run records, report refusal and the merge
check. Each area's functions are mutated by mutmut (installed into .venv-mut when missing) and
tested with that area's fast tests only; writes reports/mutation.md and reports/mutation.json.

  .venv/bin/python scripts/mutation.py                      # every area, 40 min budget
  .venv/bin/python scripts/mutation.py --modules config runs
  .venv/bin/python scripts/mutation.py --modules src/forgelab/train/packing_check.py --out /tmp/m.md
  .venv/bin/python scripts/mutation.py --dry-run            # what would be mutated, with which tests
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main(argv=None) -> int:
    from forgelab.devtools import mutation as mut
    from forgelab.runs import PROJECT_ROOT

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modules", nargs="+", metavar="AREA_OR_FILE",
                   help="areas (" + ", ".join(a.name for a in mut.AREAS) + ") or mutated source files "
                        "(that file only); default: every area")
    p.add_argument("--out", default="reports/mutation.md", help="markdown report; the JSON goes beside it")
    p.add_argument("--max-minutes", type=float, default=40.0,
                   help="wall-time budget of the whole run; an area cut short is reported as partial")
    p.add_argument("--workers", type=int, default=2, help="mutants tested at once (default 2)")
    p.add_argument("--keep", action="store_true", help="keep the temporary copies (mutmut's mutants/) for a look")
    p.add_argument("--dry-run", action="store_true", help="list areas, mutated functions and tests; mutate nothing")
    args = p.parse_args(argv)
    try:
        areas = mut.select(args.modules)
    except mut.MutationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for a in areas:
            print(f"{a.name}: {a.title}")
            for path, fns in a.targets.items():
                print(f"  mutate {path}: {', '.join(fns)}")
            print(f"  tests: {' '.join(a.tests)} -m 'not slow'")
        return 0
    exe = os.path.relpath(sys.executable, PROJECT_ROOT) if Path(sys.executable).is_relative_to(PROJECT_ROOT) \
        else sys.executable
    command = shlex.join([exe, "scripts/mutation.py", *(argv if argv is not None else sys.argv[1:])])
    try:
        rep = mut.run(args.modules, Path(args.out), args.max_minutes, args.workers, args.keep, command,
                      log=lambda m: print(m, file=sys.stderr))
    except mut.MutationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')} ({rep['wall_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
